"""CIFAR-10 from the standard `cifar-10-batches-py` layout, read by torchvision's loader.

The whole dataset is held as uint8 NCHW tensors (150 MB): augmentation then runs on tensors, on
the CPU or the GPU, with no per-image Python work.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets import CIFAR10

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCH_DIR = CIFAR10.base_folder  # "cifar-10-batches-py"


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


class _CheckedCIFAR10(CIFAR10):
    """torchvision's CIFAR10 whose integrity check can skip the md5 (for generated data)."""

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


def _missing_message(root: Path) -> str:
    return (
        f"CIFAR-10 not found under data.root={root} (expected {root / BATCH_DIR}/data_batch_1..5 and "
        f"test_batch). Either pass data.download=true to fetch it with torchvision, or download "
        f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into {root}; "
        f"for a quick offline try use protocol=quickstart (small generated data)."
    )


def _find_bad_file(root: Path) -> str:
    """Name the first batch file that cannot be unpickled into CIFAR's dict, for a clear error."""
    for name, _ in CIFAR10.train_list + CIFAR10.test_list + [(CIFAR10.meta["filename"], None)]:
        path = root / BATCH_DIR / name
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            if "data" in entry and len(entry["data"]) != len(entry["labels"]):
                return f"{path} (images and labels differ in length)"
        except Exception as err:  # any unpickling failure means this file is the bad one
            return f"{path} ({type(err).__name__}: {err})"
    return f"{root / BATCH_DIR} (files do not match their md5 checksums)"


def _load_split(root: Path, train: bool, download: bool, verify_md5: bool, generated: bool):
    try:
        ds = _CheckedCIFAR10(str(root), train=train, download=download, verify_md5=verify_md5)
    except Exception as err:
        if not (root / BATCH_DIR).exists():  # nothing was there, or a download did not get as far
            reason = f"data.download=true failed ({type(err).__name__}: {err}). " if download else ""
            raise DataError(reason + _missing_message(root)) from None
        remedy = "it is generated again on the next run" if generated else "then download it again"
        raise DataError(f"CIFAR-10 batch file is corrupt: {_find_bad_file(root)}. "
                        f"Delete {root / BATCH_DIR}: {remedy}.") from None
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC → NCHW, still uint8
    return x, torch.tensor(ds.targets, dtype=torch.long)


def check_present(root: str | Path) -> None:
    """The cheap check a dry run makes: every batch file is there and readable (not unpickled)."""
    folder = Path(root) / BATCH_DIR
    names = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    missing = [name for name in names if not os.access(folder / name, os.R_OK)]
    if missing:
        raise DataError(_missing_message(Path(root)) if len(missing) == len(names) else
                        f"{folder} lacks or cannot read {', '.join(missing)}: delete it and get CIFAR-10 again")


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
                verify_md5: bool = True, generated: bool = False) -> Splits:
    """Train/val/test tensors, the val split as `split_indices` draws it (the study's v2 protocol).
    `generated`: the files are kdexp's generated data (a corrupt copy is regenerated, not downloaded)."""
    root = Path(root)
    if not download and not (root / BATCH_DIR).is_dir():
        raise DataError(_missing_message(root))
    train_x, train_y = _load_split(root, True, download, verify_md5, generated)
    test_x, test_y = _load_split(root, False, False, verify_md5, generated)
    if not 0 <= val_size < len(train_x):
        raise DataError(f"data.val_size={val_size} must be in [0, {len(train_x) - 1}] "
                        f"(the training set has {len(train_x)} images)")
    train_idx, val_idx = split_indices(len(train_x), val_size, split_seed)
    return Splits(train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx],
                  test_x, test_y)
