"""An ImageNet look-alike drawn from a known generator, written as JPEG files in ILSVRC-2012's
folder layout (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`), so the real reader (ImageFolder), JPEG
decoding and the ImageNet transforms are all exercised.

Each image shows stripes over a random background colour under pixel noise, at a random size (each
side drawn from `sides`, as ImageNet's photos vary). The class is the stripes' tint and orientation
(kdexp.data.fake's TINTS, horizontal or vertical: both survive random-resized crops and flips, up to
2 x 10 classes); the background also takes a faint cast of the tint, which a crop of any size keeps
but the background's own spread of colours hides in part. The stripes' period is drawn per image
and is no part of the class (a random-resized crop rescales it). As in kdexp.data.fake, each
image's stripe contrast is drawn from invisible to clear under pixel noise (NOISE), and LABEL_NOISE
of the labels (the folder an image is filed in) are redrawn (kdexp.data.fake's draw_labels), so no
classifier reaches 100 %.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from kdexp.data.fake import NOISE, ORIENTATIONS, TINTS, balanced_classes, draw_labels
from kdexp.data.imagenet import SPLITS

MAX_CLASSES = len(TINTS) * len(ORIENTATIONS)
PERIODS = (6.0, 16.0)  # pixels: each image's stripe period is uniform in this range
MAX_CONTRAST = 100.0  # each image's stripe amplitude is uniform in [0, MAX_CONTRAST] grey levels (a random-
                      # resized crop upsamples a patch as small as 8 % of the image: the stripes need more than
                      # kdexp.data.fake's 60 to stay learnable)
MAX_CAST = 60.0  # each image's colour cast along its tint is uniform in [0, MAX_CAST] grey levels
JPEG_QUALITY = 90


def wnids(num_classes: int) -> list[str]:
    """Class folder names shaped like ImageNet's WordNet ids (`n00000003`)."""
    return [f"n{c:08d}" for c in range(num_classes)]


def draw_image(cls: int, sides: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One image of class `cls` (tint, orientation), HWC uint8, of random height and width in `sides`."""
    h, w = rng.integers(sides[0], sides[1] + 1, 2)
    tint, orientation = divmod(cls, len(ORIENTATIONS))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    along = yy if ORIENTATIONS[orientation] == "horizontal" else xx  # horizontal stripes vary down the image
    period, phase, contrast = rng.uniform(*PERIODS), rng.uniform(0, 2 * np.pi), rng.uniform(0, MAX_CONTRAST)
    stripes = contrast * np.sin(2 * np.pi * along / period + phase)
    colour = np.array(list(TINTS.values())[tint], dtype=np.float32)
    background = rng.uniform(60, 195, 3).astype(np.float32) + rng.uniform(0, MAX_CAST) * colour
    noise = NOISE * rng.standard_normal((h, w, 3), dtype=np.float32)
    return np.clip(background + stripes[:, :, None] * colour + noise, 0, 255).astype(np.uint8)


def _write_split(folder: Path, split: str, size: int, num_classes: int, sides: tuple[int, int],
                 rng: np.random.Generator) -> None:
    classes = balanced_classes(size, rng, num_classes)
    labels = draw_labels(classes, rng, num_classes)
    first = np.unique(classes, return_index=True)[1]
    labels[first] = classes[first]  # each class keeps an image: no folder is empty (ImageFolder refuses one)
    names = wnids(num_classes)
    for name in names:
        (folder / split / name).mkdir(parents=True)
    for i, (cls, label) in enumerate(zip(classes, labels)):
        file = f"ILSVRC2012_val_{i + 1:08d}.JPEG" if split == "val" else f"{names[label]}_{i}.JPEG"
        Image.fromarray(draw_image(int(cls), sides, rng)).save(folder / split / names[label] / file, "JPEG",
                                                               quality=JPEG_QUALITY)


def _complete(root: Path) -> bool:
    return all((root / split).is_dir() for split in SPLITS)


def write_fake_imagenet(root: str | Path, train_size: int = 240, test_size: int = 80, num_classes: int = 8,
                        seed: int = 0, sides: tuple[int, int] = (64, 96)) -> Path:
    """Write the dataset once as `root/train/<wnid>/*.JPEG` and `root/val/<wnid>/*.JPEG`; an existing
    copy is kept, whatever its size (conf/data/fake_imagenet.yaml's root names the sizes).

    The whole tree is written into a temporary folder beside `root` and renamed to `root` in one
    step, so a half-written copy is never taken for a complete one; of several jobs writing at
    once, the first rename wins and the others keep its copy (the same images: same seed)."""
    root = Path(root)
    if _complete(root):
        return root
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"data.num_classes={num_classes}: generated ImageNet has 2 to {MAX_CLASSES} classes")
    if min(train_size, test_size) < num_classes:
        raise ValueError(f"data.fake_train_size={train_size} and data.fake_test_size={test_size} must be at least "
                         f"data.num_classes={num_classes}: each class folder holds an image")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(seed)
    try:
        for split, size in zip(SPLITS, (train_size, test_size)):
            _write_split(tmp, split, size, num_classes, sides, rng)
        try:
            os.rename(tmp, root)  # atomic; replaces an empty folder, fails on a filled one
        except OSError:
            if not _complete(root):  # not another writer's finished copy: something else is there
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
