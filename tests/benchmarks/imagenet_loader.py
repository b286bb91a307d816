"""What kdexp's ImageNet loader (kdexp/data/imagenet.py) delivers per CPU core: decoded + augmented
training images per second, per DataLoader worker, on generated JPEGs of ImageNet's typical size
(kdexp/data/fake_imagenet.py at ~400 x 350 pixels; ILSVRC-2012's training images average about that),
and from it the workers that keep one GPU fed. A benchmark, not a test: numbers depend on the machine
and its load, so it reports them and judges nothing.

Measured: the main process alone (num_workers=0: one core decoding and augmenting, the per-worker
rate), then N workers, and the split of one image's time between JPEG decoding and the transforms
(RandomResizedCrop 224, flip, ToTensor, Normalize), which says what GPU decoding could save.

Usage: python tests/benchmarks/imagenet_loader.py [--images 320] [--workers 2] [--gpu-img-s 3000]
       [--root /tmp/kdexp_imagenet_bench] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torchvision.datasets.folder import default_loader  # noqa: E402

from kdexp.data.fake_imagenet import write_fake_imagenet  # noqa: E402
from kdexp.data.imagenet import FolderTrainBatches, load_folders, train_transform  # noqa: E402

SIDES = (350, 450)  # pixels per side: ILSVRC-2012's training images average about 400 x 350
CROP = 224
BATCH = 64


def loader_rate(splits, workers: int) -> float:
    """Training images per second through FolderTrainBatches (its second epoch: the first starts the
    workers and warms the page cache)."""
    batches = FolderTrainBatches(splits, BATCH, 0, torch.device("cpu"), image_size=CROP, num_workers=workers)
    for _ in batches.epoch(1):
        pass
    start, seen = time.perf_counter(), 0
    for batch in batches.epoch(2):
        seen += len(batch.y)
    return seen / (time.perf_counter() - start)


def decode_share(splits, images: int) -> tuple[float, float]:
    """(ms to decode one image, ms to transform it) in this process."""
    transform, files = train_transform(CROP), [path for path, _ in splits.train[:images]]
    start = time.perf_counter()
    decoded = [default_loader(f) for f in files]
    decode = time.perf_counter() - start
    start = time.perf_counter()
    for image in decoded:
        transform(image)
    return 1000 * decode / images, 1000 * (time.perf_counter() - start) / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=320, help="training images to generate and read")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the second measurement")
    parser.add_argument("--gpu-img-s", type=float, default=3000.0, help="the GPU's training rate to feed")
    parser.add_argument("--root", type=Path, default=Path("/tmp/kdexp_imagenet_bench"))
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    root = write_fake_imagenet(args.root / f"{args.images}_{SIDES[0]}-{SIDES[1]}px", args.images, 8, num_classes=8,
                               sides=SIDES)
    splits = load_folders(root, 0, 1234)
    size_kb = sum(os.path.getsize(p) for p, _ in splits.train) / len(splits.train) / 1024
    decode_ms, transform_ms = decode_share(splits, min(64, args.images))
    one = loader_rate(splits, 0)
    many = loader_rate(splits, args.workers)
    workers = math.ceil(args.gpu_img_s / one)
    result = {"images": args.images, "mean_jpeg_kb": round(size_kb, 1), "cpus": os.cpu_count(),
              "load_avg_1min": round(os.getloadavg()[0], 2), "decode_ms": round(decode_ms, 2),
              "transform_ms": round(transform_ms, 2), "img_s_main_process": round(one, 1),
              f"img_s_{args.workers}_workers": round(many, 1), "gpu_img_s": args.gpu_img_s,
              "workers_to_feed_gpu": workers}
    print(f"{args.images} JPEGs of {SIDES[0]}-{SIDES[1]} px ({size_kb:.0f} KB each), {os.cpu_count()} CPUs, "
          f"load {result['load_avg_1min']}")
    print(f"one image: decode {decode_ms:.1f} ms + RandomResizedCrop/flip/ToTensor/Normalize {transform_ms:.1f} ms")
    print(f"one core (num_workers=0): {one:.0f} img/s; {args.workers} workers: {many:.0f} img/s")
    print(f"to feed {args.gpu_img_s:.0f} img/s: {workers} workers at this per-core rate")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
