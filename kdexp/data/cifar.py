"""CIFAR-10 and CIFAR-100 from their standard layouts (`cifar-10-batches-py`, `cifar-100-python`),
read by torchvision's loaders; a `Layout` names what differs between them.

The whole dataset is held as uint8 NCHW tensors (150 MB): augmentation then runs on tensors, on
the CPU or the GPU, with no per-image Python work.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity


@dataclass(frozen=True)
class Layout:
    """One CIFAR dataset as it lies on disk (torchvision's reader knows its files and md5s) and the
    per-channel statistics its images are normalised with."""

    title: str  # as messages name it
    reader: type[CIFAR10]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    train_size: int = 50_000  # images in the training files (before any validation split)
    test_size: int = 10_000

    @property
    def folder(self) -> str:
        return self.reader.base_folder

    @property
    def files(self) -> list[str]:
        """Every file of the layout, the meta file last."""
        return [name for name, _ in self.reader.train_list + self.reader.test_list] + [self.reader.meta["filename"]]


CIFAR10_LAYOUT = Layout("CIFAR-10", CIFAR10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10)
CIFAR100_LAYOUT = Layout("CIFAR-100", CIFAR100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100)
CIFAR_MEAN, CIFAR_STD = CIFAR10_LAYOUT.mean, CIFAR10_LAYOUT.std
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCH_DIR = CIFAR10_LAYOUT.folder  # "cifar-10-batches-py"


class DataError(RuntimeError):
    """The dataset is missing or unreadable; the message says which file and what to do."""


@dataclass
class Splits:
    """uint8 images (N, 3, 32, 32) and int64 labels for each split; val is empty without a split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...] = CLASSES  # the class names, in label order (the data's meta file)
    layout: Layout = CIFAR10_LAYOUT

    @property
    def images(self) -> int:
        """The training images before the val split: what split indices refer to."""
        return len(self.train_x) + len(self.val_x)


class _UncheckedMd5:
    """Mixed into torchvision's CIFAR10/CIFAR100: its integrity check can skip the md5 (for
    generated data)."""

    def __init__(self, root: str, train: bool, download: bool, verify_md5: bool):
        self._verify_md5 = verify_md5
        super().__init__(root, train=train, download=download)

    def _check_integrity(self) -> bool:
        if self._verify_md5:
            return super()._check_integrity()
        files = self.train_list + self.test_list
        return all((Path(self.root) / self.base_folder / name).is_file() for name, _ in files)

    def _load_meta(self) -> None:
        if self._verify_md5:
            return super()._load_meta()
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


@functools.cache
def _checked_reader(reader: type[CIFAR10]) -> type[CIFAR10]:
    return type(f"_Checked{reader.__name__}", (_UncheckedMd5, reader), {})


def _missing_message(root: Path, layout: Layout) -> str:
    return (
        f"{layout.title} not found under data.root={root} (expected {', '.join(layout.files)} in "
        f"{root / layout.folder}). Either pass data.download=true to fetch it with torchvision, or download "
        f"{layout.reader.url} and extract it into {root}; "
        f"for a quick offline try use protocol=quickstart (small generated data)."
    )


def _find_bad_file(root: Path, layout: Layout, verify_md5: bool) -> str:
    """Name the first batch file that fails: by its md5 where the md5 is checked (a file that fails it
    is never unpickled: a tampered pickle could run code), else (generated data, which kdexp writes
    itself) by what unpickling it gives."""
    for name, md5 in layout.reader.train_list + layout.reader.test_list:
        path = root / layout.folder / name
        if verify_md5:
            if not check_integrity(str(path), md5):
                return f"{path} (does not match its md5 checksum; not read)"
            continue
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            labels = entry.get("labels", entry.get("fine_labels"))
            if "data" in entry and (labels is None or len(entry["data"]) != len(labels)):
                return f"{path} (images and labels differ in length)"
        except Exception as err:  # any unpickling failure means this file is the bad one
            return f"{path} ({type(err).__name__}: {err})"
    return f"{root / layout.folder} (its files could not be read)"


def _load_split(root: Path, train: bool, download: bool, verify_md5: bool, generated: bool, layout: Layout):
    try:
        ds = _checked_reader(layout.reader)(str(root), train=train, download=download, verify_md5=verify_md5)
    except Exception as err:
        if not (root / layout.folder).exists():  # nothing was there, or a download did not get as far
            reason = f"data.download=true failed ({type(err).__name__}: {err}). " if download else ""
            raise DataError(reason + _missing_message(root, layout)) from None
        remedy = "it is generated again on the next run" if generated else "then download it again"
        raise DataError(f"{layout.title} batch file is corrupt: {_find_bad_file(root, layout, verify_md5)}. "
                        f"Delete {root / layout.folder}: {remedy}.") from None
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC → NCHW, still uint8
    return x, torch.tensor(ds.targets, dtype=torch.long), tuple(ds.classes)


def check_present(root: str | Path, layout: Layout = CIFAR10_LAYOUT) -> None:
    """The cheap check a dry run makes: every batch file is there and readable (not unpickled)."""
    folder = Path(root) / layout.folder
    missing = [name for name in layout.files if not os.access(folder / name, os.R_OK)]
    if missing:
        raise DataError(_missing_message(Path(root), layout) if len(missing) == len(layout.files) else
                        f"{folder} lacks or cannot read {', '.join(missing)}: delete it and get {layout.title} again")


def split_indices(n: int, val_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into the `n` training images, each sorted: the val split is a fixed
    random subset drawn from `split_seed` alone, so every run seed sees the same split."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


def data_identity(name: str, n: int, val_size: int, split_seed: int) -> dict:
    """What a model was trained on, as a teacher checkpoint records it: the dataset, the split and
    a hash of the sorted training indices (the indices themselves follow from the other fields)."""
    train_idx, _ = split_indices(n, val_size, split_seed)
    digest = hashlib.sha256(train_idx.to(torch.int64).numpy().tobytes()).hexdigest()
    return {"dataset": name, "images": n, "val_size": val_size, "split_seed": split_seed,
            "train_indices_sha256": digest}


def load_splits(root: str | Path, val_size: int, split_seed: int, download: bool = False,
                verify_md5: bool = True, generated: bool = False, layout: Layout = CIFAR10_LAYOUT) -> Splits:
    """Train/val/test tensors, the val split as `split_indices` draws it (the study's v2 protocol).
    `generated`: the files are kdexp's generated data (a corrupt copy is regenerated, not downloaded)."""
    root = Path(root)
    if not download and not (root / layout.folder).is_dir():
        raise DataError(_missing_message(root, layout))
    train_x, train_y, classes = _load_split(root, True, download, verify_md5, generated, layout)
    test_x, test_y, _ = _load_split(root, False, False, verify_md5, generated, layout)
    if not 0 <= val_size < len(train_x):
        raise DataError(f"data.val_size={val_size} must be in [0, {len(train_x) - 1}] "
                        f"(the training set has {len(train_x)} images)")
    train_idx, val_idx = split_indices(len(train_x), val_size, split_seed)
    return Splits(train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx],
                  test_x, test_y, classes, layout)
