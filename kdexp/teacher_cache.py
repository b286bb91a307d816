"""The exact teacher-logit cache for logit-only distillation.

Training augmentation has 162 views per image (9 x 9 crop offsets x 2 flips) and an eval-mode
teacher is a fixed function, so every logit the teacher can produce during training is computed
once, stored next to the teacher checkpoint and looked up by (image index, dy, dx, flip) instead of
running the teacher every step (50,000 images: 324 MB in fp32, 162 MB in bf16).

The file is keyed by everything the logits depend on: the teacher checkpoint's bytes, the training
split's images (so the val split and its seed are covered), the augmentation and normalisation, the
precision and the device type (CUDA fp32 convolutions run in TF32). Many jobs may want it at once:
one builds it under a lock file while the others wait, and the write is an atomic rename, so even
where locks do not work (some network file systems) no job reads a partial file.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from kdexp import checkpoint
from kdexp.data.cifar import CIFAR10_LAYOUT, Layout
from kdexp.data.loaders import PAD, SIZE, Batch, augment
from kdexp.execution import Execution

log = logging.getLogger(__name__)

FORMAT = "kdexp-teacher-logits-v1"
OFFSETS = 2 * PAD + 1  # crop offsets per axis
VIEWS = OFFSETS * OFFSETS * 2
BUILD_BATCH = 1024


def lookup(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The cached teacher logits of the batch's views."""
    return logits[batch.index, batch.dy, batch.dx, batch.flip.long()]  # flip as an index, not a mask


@torch.no_grad()
def build(teacher: nn.Module, images: torch.Tensor, execution: Execution, image_size: int = SIZE,
          batch_size: int = BUILD_BATCH, layout: Layout = CIFAR10_LAYOUT) -> torch.Tensor:
    """Teacher logits for every view of every image, (N, 9, 9, 2, classes), computed as the live
    path computes them (same augmentation, resize to `image_size` and layout, same autocast) and
    kept in its dtype."""
    device = next(teacher.parameters()).device
    images = images.to(device)
    out = None
    for dy, dx, flip in itertools.product(range(OFFSETS), range(OFFSETS), (0, 1)):
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            dy_, dx_, flip_ = (torch.full((len(chunk),), v, device=device) for v in (dy, dx, bool(flip)))
            with execution.autocast(device):
                logits = teacher(augment(chunk, dy_, dx_, flip_, execution.channels_last, image_size, layout))
            if out is None:
                out = torch.empty(len(images), OFFSETS, OFFSETS, 2, logits.shape[1], dtype=logits.dtype, device=device)
            out[start:start + len(chunk), dy, dx, flip] = logits
    return out


def load_or_build(teacher_ckpt: Path, teacher: nn.Module, images: torch.Tensor, execution: Execution,
                  image_size: int = SIZE, layout: Layout = CIFAR10_LAYOUT) -> torch.Tensor:
    """The cache for this teacher, split, input size, normalisation and execution: read from next to
    the checkpoint, or built and stored there (by one job at a time)."""
    device = next(teacher.parameters()).device
    spec = _spec(teacher_ckpt, images, execution, device, image_size, layout)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = teacher_ckpt.with_name(f"{teacher_ckpt.stem}.logits-{key}.pt")
    logits = _read(path, spec, device)
    if logits is not None:
        return logits
    with _exclusive(path.with_name(path.name + ".lock")):
        logits = _read(path, spec, device)  # another job may have built it while this one waited
        if logits is not None:
            return logits
        start = time.perf_counter()
        logits = build(teacher, images, execution, image_size, layout=layout)
        log.info("built teacher logits for %d images x %d views in %.1f s", len(images), VIEWS,
                 time.perf_counter() - start)
        try:
            checkpoint.save(path, {"format": FORMAT, "spec": spec, "logits": logits.cpu()})
        except OSError as err:  # a read-only teachers dir: this run still uses the logits it built
            log.warning("cannot store the teacher-logit cache at %s (%s)", path, err)
        return logits


def _spec(teacher_ckpt: Path, images: torch.Tensor, execution: Execution, device: torch.device,
          image_size: int, layout: Layout) -> dict:
    # Resized views are another cache; at the stored size the spec (and so every existing file's
    # key) stays what it was before inputs could be resized.
    resized = {"image_size": image_size} if image_size != SIZE else {}
    return {**resized, "format": FORMAT, "teacher_sha256": checkpoint.file_sha256(teacher_ckpt),
            "images_sha256": hashlib.sha256(images.cpu().contiguous().numpy()).hexdigest(), "images": len(images),
            "pad": PAD, "size": SIZE, "flips": 2, "mean": list(layout.mean), "std": list(layout.std),
            "precision": execution.precision, "device": device.type}


def _read(path: Path, spec: dict, device: torch.device) -> torch.Tensor | None:
    """The stored logits, or None when there are none (or they are unreadable or another spec's)."""
    if not path.exists():
        return None
    try:
        state = checkpoint.load(path, map_location=device)
    except checkpoint.CheckpointError as err:
        log.warning("rebuilding the teacher-logit cache: %s", err)
        return None
    if not isinstance(state, dict) or state.get("spec") != spec:
        return None
    log.info("teacher logits from %s", path)
    return state["logits"]


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path`; where the file system cannot lock, go on without."""
    try:
        f = open(lock_path, "a")
    except OSError:  # a read-only teachers dir
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job to build %s", lock_path.with_suffix(""))
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
