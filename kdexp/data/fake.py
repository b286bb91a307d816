"""A small CIFAR-10 look-alike written in the exact `cifar-10-batches-py` on-disk format.

Each class has its own colour and stripe pattern plus noise, so a tiny network learns it well above
chance within a few epochs while the real loader, pickles and augmentation are all exercised.
"""
from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np

from kdexp.data.cifar import BATCH_DIR, CLASSES
from kdexp.records import atomic_write_bytes

# Hard enough that 3 epochs of a tiny net end clearly above chance and clearly below 100%.
NOISE = 40.0
STRIPE_AMPLITUDE = 45.0
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random background colour per image (no class information) plus stripes whose
    frequency and orientation encode the class, under heavy pixel noise."""
    n = len(labels)
    yy, xx = np.mgrid[0:32, 0:32]
    freq = 1 + labels % 5
    coord = np.where((labels // 5).astype(bool)[:, None, None], yy[None], xx[None])
    stripes = np.sin(2 * np.pi * freq[:, None, None] * coord / 32.0 + rng.uniform(0, 6.28, (n, 1, 1)))
    background = rng.uniform(60, 195, size=(n, 3, 1, 1))
    img = background + STRIPE_AMPLITUDE * stripes[:, None] + rng.normal(0, NOISE, size=(n, 3, 32, 32))
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3 * 32 * 32)


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


def _batch(labels: np.ndarray, rng: np.random.Generator, name: str) -> bytes:
    entry = {
        "batch_label": name,
        "labels": labels.tolist(),
        "data": _images(labels, rng),
        "filenames": [f"fake_{name}_{i}.png" for i in range(len(labels))],
    }
    return _py2_pickle(entry)


def write_fake_cifar(root: str | Path, train_size: int = 2000, test_size: int = 500,
                     seed: int = 0) -> Path:
    """Write the dataset once under `root/cifar-10-batches-py`; an existing complete copy is kept.

    Files are written atomically and `batches.meta` last, so a half-written copy is never taken
    for a complete one (several jobs may call this at once)."""
    folder = Path(root) / BATCH_DIR
    if (folder / "batches.meta").exists():
        return folder
    rng = np.random.default_rng(seed)
    train_labels = np.arange(train_size) % 10
    rng.shuffle(train_labels)
    for name, chunk in zip(TRAIN_FILES, np.array_split(train_labels, len(TRAIN_FILES))):
        atomic_write_bytes(folder / name, _batch(chunk, rng, name))
    atomic_write_bytes(folder / "test_batch", _batch(np.arange(test_size) % 10, rng, "test_batch"))
    meta = {"label_names": list(CLASSES), "num_cases_per_batch": train_size // 5, "num_vis": 3072}
    atomic_write_bytes(folder / "batches.meta", _py2_pickle(meta))
    return folder
