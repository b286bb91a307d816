"""A CIFAR-10 look-alike drawn from a known generator, written in the exact `cifar-10-batches-py`
on-disk format (so the real loader, pickles and augmentation are all exercised).

Each image shows grey stripes over a random background colour, under pixel noise. The class is the
combination of the stripes' orientation (vertical or horizontal: both survive crops and flips) and
their period (3, 4, 5, 6 or 8 pixels). Each image's stripe contrast is drawn anywhere from invisible
to clear, and LABEL_NOISE of the labels are redrawn at random. So no classifier reaches 100 %: the
faintest stripes are lost in the noise and redrawn labels are wrong for every model; a classifier
that knows the generator scores ~88 % (tests/test_fake_data.py), and a teacher's soft labels carry
what hard labels cannot (how sure, and which other classes). A width-8 ResNet-18 gets most of the
way in ~200 SGD steps, a wider one trained longer further: the quickstart's teacher ends above its
students, and their seeds agree.
"""
from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np

from kdexp.data.cifar import BATCH_DIR, CLASSES
from kdexp.records import atomic_write_bytes

PERIODS = (3, 4, 5, 6, 8)  # pixels; class = 5 * orientation + index of the period
MAX_CONTRAST = 60.0  # each image's stripe amplitude is uniform in [0, MAX_CONTRAST] grey levels
NOISE = 40.0  # pixel noise (std, grey levels), independent per pixel and channel
LABEL_NOISE = 0.1  # fraction of labels redrawn uniformly from the 10 classes
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def draw_images(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images of the given classes as CIFAR stores them: uint8, one row of 3 x 32 x 32 per image."""
    n = len(classes)
    yy, xx = np.mgrid[0:32, 0:32]
    along = np.where((classes // 5 == 1)[:, None, None], yy, xx)  # vertical stripes vary along x
    period = np.array(PERIODS, dtype=np.float32)[classes % 5, None, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    contrast = rng.uniform(0, MAX_CONTRAST, (n, 1, 1)).astype(np.float32)
    stripes = contrast * np.sin(2 * np.pi * along / period + phase)
    background = rng.uniform(60, 195, (n, 3, 1, 1)).astype(np.float32)
    noise = NOISE * rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    img = background + stripes[:, None] + noise
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3 * 32 * 32)


def draw_labels(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The classes, with LABEL_NOISE of them redrawn uniformly (a redraw may land on the class)."""
    redrawn = rng.random(len(classes)) < LABEL_NOISE
    return np.where(redrawn, rng.integers(0, 10, len(classes)), classes)


def balanced_classes(n: int, rng: np.random.Generator) -> np.ndarray:
    classes = np.arange(n) % 10
    rng.shuffle(classes)
    return classes


class _Py2Str(str):
    """A string pickled as Python 2's `str`, as in the original files: it loads as `str` with
    encoding='latin1' and as `bytes` with encoding='bytes'."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us add one opcode writer
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: _Py2Str) -> None:
        data = obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2_str


def _py2_pickle(entry: dict) -> bytes:
    def convert(v):
        if isinstance(v, str):
            return _Py2Str(v)
        return [convert(x) for x in v] if isinstance(v, list) else v
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump({_Py2Str(k): convert(v) for k, v in entry.items()})
    return buffer.getvalue()


def _batch(classes: np.ndarray, rng: np.random.Generator, name: str) -> bytes:
    entry = {
        "batch_label": name,
        "labels": draw_labels(classes, rng).tolist(),
        "data": draw_images(classes, rng),
        "filenames": [f"fake_{name}_{i}.png" for i in range(len(classes))],
    }
    return _py2_pickle(entry)


def write_fake_cifar(root: str | Path, train_size: int = 2000, test_size: int = 500,
                     seed: int = 0) -> Path:
    """Write the dataset once under `root/cifar-10-batches-py`; an existing complete copy is kept,
    whatever its size (runs take their sizes from conf/data/fake.yaml, whose default root names
    them; these defaults are a tiny copy for tests).

    Files are written atomically and `batches.meta` last, so a half-written copy is never taken
    for a complete one (several jobs may call this at once)."""
    folder = Path(root) / BATCH_DIR
    if (folder / "batches.meta").exists():
        return folder
    rng = np.random.default_rng(seed)
    train_classes = balanced_classes(train_size, rng)
    for name, chunk in zip(TRAIN_FILES, np.array_split(train_classes, len(TRAIN_FILES))):
        atomic_write_bytes(folder / name, _batch(chunk, rng, name))
    atomic_write_bytes(folder / "test_batch", _batch(balanced_classes(test_size, rng), rng, "test_batch"))
    meta = {"label_names": list(CLASSES), "num_cases_per_batch": train_size // 5, "num_vis": 3072}
    atomic_write_bytes(folder / "batches.meta", _py2_pickle(meta))
    return folder
