"""The strong view (`data.strong_view`): a second, strongly augmented view of each training image, for
methods that distil on two views (MLKD: `needs_strong_view`).

`randaugment` is the RandAugment of Multi-Level Logit Distillation's code (Jin-Ying/
Multi-Level-Logit-Distillation, mdistiller/dataset/cifar100.py; FixMatch's variant): after the
view's own random crop and flip, two operations drawn uniformly with replacement from 14, each at a
magnitude drawn uniformly from its range (the `m` of RandAugment(2, 10) is unused there), then a
grey Cutout square of a side drawn uniformly up to half the image's. Randomness as there: Python's
`random` for the operations, magnitudes and Cutout size, numpy's for Cutout's position, so a seeded
DataLoader worker (or, in the main process, the RNG state last.pt restores) makes it reproducible.
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

STRONG_VIEWS = ("randaugment",)
Op = Callable[[Image.Image, float], Image.Image]

CUTOUT_FILL = (125, 123, 114)  # the reference's grey (close to CIFAR's mean colour), not black
MAX_CUTOUT = 0.5  # Cutout's largest side, as a fraction of the image's width


def _affine(img: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coefficients)


def _posterize(img: Image.Image, v: float) -> Image.Image:
    return ImageOps.posterize(img, max(1, int(v)))


# (operation, lowest, highest magnitude), in the reference's order: a seeded draw picks the same
# operation. Its enhancement ranges stop below 1 (they only ever weaken colour, contrast, brightness
# and sharpness); rotation, shear and translation are signed by their range, not by a coin.
OPS: tuple[tuple[str, Op, float, float], ...] = (
    ("AutoContrast", lambda img, v: ImageOps.autocontrast(img), 0, 1),
    ("Brightness", lambda img, v: ImageEnhance.Brightness(img).enhance(v), 0.05, 0.95),
    ("Color", lambda img, v: ImageEnhance.Color(img).enhance(v), 0.05, 0.95),
    ("Contrast", lambda img, v: ImageEnhance.Contrast(img).enhance(v), 0.05, 0.95),
    ("Equalize", lambda img, v: ImageOps.equalize(img), 0, 1),
    ("Identity", lambda img, v: img, 0, 1),
    ("Posterize", _posterize, 4, 8),  # bits kept
    ("Rotate", lambda img, v: img.rotate(v), -30, 30),  # degrees, nearest, black corners
    ("Sharpness", lambda img, v: ImageEnhance.Sharpness(img).enhance(v), 0.05, 0.95),
    ("ShearX", lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)), -0.3, 0.3),
    ("ShearY", lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)), -0.3, 0.3),
    ("Solarize", lambda img, v: ImageOps.solarize(img, v), 0, 256),  # threshold
    ("TranslateX", lambda img, v: _affine(img, (1, 0, v * img.size[0], 0, 1, 0)), -0.3, 0.3),  # of the width
    ("TranslateY", lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.size[1])), -0.3, 0.3),  # of the height
)


class RandAugment:
    """`n` operations of OPS at random magnitudes, then Cutout (PIL image in, PIL image out)."""

    def __init__(self, n: int = 2):
        self.n = n

    def __call__(self, img: Image.Image) -> Image.Image:
        for _, op, low, high in random.choices(OPS, k=self.n):
            img = op(img, low + (high - low) * random.random())
        return cutout(img, random.random() * MAX_CUTOUT)


def cutout(img: Image.Image, fraction: float) -> Image.Image:
    """A CUTOUT_FILL square of side `fraction` x the width (a float: PIL rounds its corners), its
    top-left corner half a side up and left of a random point, clipped to the image."""
    if fraction <= 0:
        return img
    side = fraction * img.size[0]
    width, height = img.size
    # As the reference calls them: np.random.uniform(w) is uniform(low=w, high=1.0), a point in
    # (1, w], never in the first column or row. Kept: the same draws give the same squares.
    cx, cy = np.random.uniform(width), np.random.uniform(height)
    x0, y0 = int(max(0, cx - side / 2.0)), int(max(0, cy - side / 2.0))
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, min(width, x0 + side), min(height, y0 + side)), CUTOUT_FILL)
    return img


def strong_augmentation(name: str) -> RandAugment:
    """The PIL step `data.strong_view` names, applied after the view's crop and flip."""
    if name == "randaugment":
        return RandAugment(n=2)
    raise ValueError(f"data.strong_view={name!r}: choose null or one of {list(STRONG_VIEWS)}")
