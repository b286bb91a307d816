"""CIFAR-10 and CIFAR-100 look-alikes drawn from a known generator, written in the exact on-disk
formats (`cifar-10-batches-py`, `cifar-100-python`), so the real loader, pickles and augmentation
are all exercised.

Each image shows grey stripes over a random background colour, under pixel noise. The class is the
combination of the stripes' orientation (vertical or horizontal: both survive crops and flips) and
their period (3, 4, 5, 6 or 8 pixels). Each image's stripe contrast is drawn anywhere from invisible
to clear, and LABEL_NOISE of the labels are redrawn at random. So no classifier reaches 100 %: the
faintest stripes are lost in the noise and redrawn labels are wrong for every model; a classifier
that knows the generator scores ~88 % (tests/test_fake_data.py), and a teacher's soft labels carry
what hard labels cannot (how sure, and which other classes). A width-8 ResNet-18 gets most of the
way in ~200 SGD steps, a wider one trained longer further: the quickstart's teacher ends above its
students, and their seeds agree.

The 100-class version adds the stripes' colour: grey as in the 10-class one (so its first ten
classes are CIFAR-10's) or one of nine colour-opponent tints, so a class is (tint, orientation,
period) and its coarse label (CIFAR-100's 20 superclasses) is (tint, orientation).
"""
from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np

from kdexp.data.cifar import CIFAR10_LAYOUT, CLASSES, Layout
from kdexp.records import atomic_write_bytes

PERIODS = (3, 4, 5, 6, 8)  # pixels; class = 10 * tint + 5 * orientation + index of the period
ORIENTATIONS = ("horizontal", "vertical")
# The stripes' amplitude per RGB channel: grey, then colour-opponent pairs a greyscale view cannot see
TINTS = {"grey": (1, 1, 1), "red-green": (1, -1, 0), "green-red": (-1, 1, 0), "green-blue": (0, 1, -1),
         "blue-green": (0, -1, 1), "red-blue": (1, 0, -1), "blue-red": (-1, 0, 1), "yellow-blue": (1, 1, -1),
         "magenta-green": (1, -1, 1), "cyan-red": (-1, 1, 1)}
MAX_CONTRAST = 60.0  # each image's stripe amplitude is uniform in [0, MAX_CONTRAST] grey levels
NOISE = 40.0  # pixel noise (std, grey levels), independent per pixel and channel
LABEL_NOISE = 0.1  # fraction of labels redrawn uniformly from all classes


def draw_images(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images of the given classes as CIFAR stores them: uint8, one row of 3 x 32 x 32 per image."""
    n = len(classes)
    yy, xx = np.mgrid[0:32, 0:32]
    along = np.where(((classes // 5) % 2 == 1)[:, None, None], yy, xx)  # vertical stripes vary along x
    period = np.array(PERIODS, dtype=np.float32)[classes % 5, None, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    contrast = rng.uniform(0, MAX_CONTRAST, (n, 1, 1)).astype(np.float32)
    stripes = contrast * np.sin(2 * np.pi * along / period + phase)
    background = rng.uniform(60, 195, (n, 3, 1, 1)).astype(np.float32)
    noise = NOISE * rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    tint = np.array(list(TINTS.values()), dtype=np.float32)[classes // 10, :, None, None]
    img = background + tint * stripes[:, None] + noise
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3 * 32 * 32)


def draw_labels(classes: np.ndarray, rng: np.random.Generator, num_classes: int = 10) -> np.ndarray:
    """The classes, with LABEL_NOISE of them redrawn uniformly (a redraw may land on the class)."""
    redrawn = rng.random(len(classes)) < LABEL_NOISE
    return np.where(redrawn, rng.integers(0, num_classes, len(classes)), classes)


def balanced_classes(n: int, rng: np.random.Generator, num_classes: int = 10) -> np.ndarray:
    classes = np.arange(n) % num_classes
    rng.shuffle(classes)
    return classes


def class_names(num_classes: int) -> list[str]:
    """CIFAR-10's names for the 10-class set (they are only labels); what the generator draws for
    the 100 classes (`red-green_vertical_p5`)."""
    if num_classes == len(CLASSES):
        return list(CLASSES)
    return [f"{tint}_{orientation}_p{period}" for tint in TINTS for orientation in ORIENTATIONS for period in PERIODS]


def coarse_names() -> list[str]:
    return [f"{tint}_{orientation}" for tint in TINTS for orientation in ORIENTATIONS]


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


def _batch(classes: np.ndarray, rng: np.random.Generator, name: str, layout: Layout) -> bytes:
    labels = draw_labels(classes, rng, layout.num_classes)
    # CIFAR-100 stores fine and coarse labels (its 20 superclasses: five fine classes each)
    label_keys = {"labels": labels.tolist()} if layout.num_classes == 10 else \
        {"fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}
    entry = {
        "batch_label": name,
        **label_keys,
        "data": draw_images(classes, rng),
        "filenames": [f"fake_{name}_{i}.png" for i in range(len(classes))],
    }
    return _py2_pickle(entry)


def _meta(layout: Layout, train_size: int) -> dict:
    if layout.num_classes == 10:
        return {"label_names": class_names(10), "num_cases_per_batch": train_size // 5, "num_vis": 3072}
    return {"fine_label_names": class_names(100), "coarse_label_names": coarse_names()}


def write_fake_cifar(root: str | Path, train_size: int = 2000, test_size: int = 500,
                     seed: int = 0, layout: Layout = CIFAR10_LAYOUT) -> Path:
    """Write the dataset once under `root/<layout's folder>` (`cifar-10-batches-py`, or
    `cifar-100-python` for CIFAR100_LAYOUT); an existing complete copy is kept, whatever its size
    (runs take their sizes from conf/data/fake*.yaml, whose default root names them; these
    defaults are a tiny copy for tests).

    Files are written atomically and the meta file last, so a half-written copy is never taken
    for a complete one (several jobs may call this at once)."""
    folder = Path(root) / layout.folder
    *data_files, meta_file = layout.files
    train_files = data_files[:len(layout.reader.train_list)]
    if (folder / meta_file).exists():
        return folder
    rng = np.random.default_rng(seed)
    train_classes = balanced_classes(train_size, rng, layout.num_classes)
    for name, chunk in zip(train_files, np.array_split(train_classes, len(train_files))):
        atomic_write_bytes(folder / name, _batch(chunk, rng, name, layout))
    test_file = data_files[-1]
    test_classes = balanced_classes(test_size, rng, layout.num_classes)
    atomic_write_bytes(folder / test_file, _batch(test_classes, rng, test_file, layout))
    atomic_write_bytes(folder / meta_file, _py2_pickle(_meta(layout, train_size)))
    return folder
