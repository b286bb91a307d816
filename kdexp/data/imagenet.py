"""ImageNet (ILSVRC-2012) and its generated stand-in: JPEG files in class folders, in the layout
every KD code base reads (`<root>/train/<wnid>/*.JPEG`, `<root>/val/<wnid>/*.JPEG`), scanned by
torchvision's `ImageFolder` and decoded and augmented in DataLoader workers.

The transforms are the standard ones (torchvision's reference scripts, torchdistill, mdistiller):
training RandomResizedCrop + horizontal flip, evaluation a resize of the short side to 256/224 of
the crop, then the centre crop; ImageNet's normalisation. `FolderTrainBatches` and
`FolderEvalBatches` have the interface of kdexp.data.loaders' TrainBatches and EvalBatches.

Each training image's crop and flip are drawn from a seed that the epoch's generator
(loaders.epoch_generator: a function of (seed, epoch)) gives it, not from a worker's RNG: the
batches of an epoch are the same whatever the number of workers or ranks, and a resumed run sees
the batches it would have seen. `shard=(rank, world)`: as kdexp.data.loaders' tensor batches, each
global batch is cut into `world` contiguous slices and the rank gets its own (`shard_slice`), so the
images of a step do not depend on how many ranks share it (a last batch of fewer images than ranks
is dropped); evaluation gives each rank its contiguous block of a split, each image once, none
padded, and `labels` stays the whole split's, which the ranks' gathered predictions are scored against.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from kdexp.data.cifar import DataError, split_indices
from kdexp.data.loaders import Batch, Shard, epoch_generator, shard_problem, shard_slice

SPLITS = ("train", "val")  # the folders under data.root; val is the split every paper reports (kdexp's test)
VALPREP_URL = "https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh"
EVAL_RESIZE = 256 / 224  # the short side before the centre crop, per pixel of the crop (256 for 224)


@dataclass(frozen=True)
class FolderLayout:
    """An image-folder dataset: what messages call it, its normalisation and its sizes."""

    title: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    train_size: int  # images under train/ (before any validation split)
    test_size: int  # images under val/


IMAGENET_LAYOUT = FolderLayout("ImageNet (ILSVRC-2012)", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                               1000, 1_281_167, 50_000)


class ImageFiles:
    """Image files and their labels, as ImageFolder lists them; `files[i]` is (path, label). Held in
    two numpy arrays, not a list of tuples: every DataLoader worker reads every entry over an epoch,
    and reading a Python object writes its reference count, so a list's pages are copied into each
    forked worker (measured for ImageNet's 1.28M files: 261 MB per worker, 23 GB on a node of 8 GPUs
    x 11 workers; the arrays: 11 MB, the worker's own)."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.paths = np.array([os.fsencode(path) for path, _ in samples], dtype=np.bytes_)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return os.fsdecode(self.paths[i]), int(self.labels[i])


@dataclass
class FolderSplits:
    """The image files of each split, as ImageFolder lists them; the validation split is a fixed
    subset of the training images (kdexp.data.split_indices), kdexp's test split the val/ folder."""

    train: ImageFiles  # every image under train/, before the validation split
    train_idx: list[int]
    val_idx: list[int]
    test: ImageFiles
    classes: tuple[str, ...]  # the class folders (wnids), in label order
    layout: FolderLayout

    @property
    def images(self) -> int:
        """The training images before the val split: what split indices refer to."""
        return len(self.train)

    @property
    def train_y(self) -> torch.Tensor:
        """The training split's labels, in Batch.index order (as Splits.train_y)."""
        return torch.from_numpy(self.train.labels[self.train_idx])


def check_layout(root: str | Path, layout: FolderLayout = IMAGENET_LAYOUT) -> None:
    """The dataset is arranged as ImageFolder reads it, or DataError: one line saying what was found
    and how to arrange it. Cheap (lists folders, opens no image): the dry run's check."""
    root = Path(root)
    arrange = f"arrange it as {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG"
    if not root.is_dir():
        raise DataError(f"{layout.title} not found: data.root={root} is not a directory; {arrange} "
                        f"(or point data.root at it)")
    missing = [f"{split}/" for split in SPLITS if not (root / split).is_dir()]
    if missing:
        found = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "nothing"
        raise DataError(f"{layout.title}: {root} has no {' and no '.join(missing)} (found: {found}); {arrange}")
    loose = _loose_images(root / "val")
    if loose:
        raise DataError(f"{layout.title}: {root / 'val'} holds {loose} images directly, not in class folders (the "
                        f"validation tar's flat layout): run {VALPREP_URL} inside {root / 'val'} to move them into "
                        f"val/<wnid>/, or let torchvision.datasets.ImageNet(root, split='val') arrange them with "
                        f"ILSVRC2012_devkit_t12.tar.gz")
    train, val = (_class_folders(root / split) for split in SPLITS)
    if not train:
        raise DataError(f"{layout.title}: {root / 'train'} has no class folders; {arrange}")
    if train != val:
        raise DataError(f"{layout.title}: {root / 'train'} has {len(train)} class folders and {root / 'val'} "
                        f"{len(val)}, not the same ones ({_some(train - val)} only in train/, {_some(val - train)} "
                        f"only in val/); {arrange}, with the same class folders in both")


def _class_folders(folder: Path) -> set[str]:
    with os.scandir(folder) as entries:
        return {e.name for e in entries if e.is_dir()}


def _loose_images(folder: Path) -> int:
    with os.scandir(folder) as entries:
        return sum(1 for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))


def _some(names: set[str]) -> str:
    shown = sorted(names)[:3]
    return ", ".join(shown) + (f" and {len(names) - 3} more" if len(names) > 3 else "") if shown else "none"


def load_folders(root: str | Path, val_size: int, split_seed: int,
                 layout: FolderLayout = IMAGENET_LAYOUT) -> FolderSplits:
    """The splits as ImageFolder scans them (checked first: DataError says what to fix)."""
    root = Path(root)
    check_layout(root, layout)
    train, test = (_scan(root / split) for split in SPLITS)
    if not 0 <= val_size < len(train.samples):
        raise DataError(f"data.val_size={val_size} must be in [0, {len(train.samples) - 1}] "
                        f"({root / 'train'} has {len(train.samples)} images)")
    train_idx, val_idx = split_indices(len(train.samples), val_size, split_seed)
    return FolderSplits(ImageFiles(train.samples), train_idx.tolist(), val_idx.tolist(), ImageFiles(test.samples),
                        tuple(train.classes), layout)


def _scan(folder: Path) -> ImageFolder:
    try:
        return ImageFolder(str(folder))
    except FileNotFoundError as err:  # a class folder without images
        raise DataError(f"{folder}: {err}") from None


def train_transform(size: int, layout: FolderLayout = IMAGENET_LAYOUT) -> transforms.Compose:
    return transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(layout.mean, layout.std)])


def eval_transform(size: int, layout: FolderLayout = IMAGENET_LAYOUT) -> transforms.Compose:
    return transforms.Compose([transforms.Resize(round(size * EVAL_RESIZE)), transforms.CenterCrop(size),
                               transforms.ToTensor(), transforms.Normalize(layout.mean, layout.std)])


class _Views(Dataset):
    """Item (i, view): image i decoded and transformed, the transform's random draws seeded with
    `view` (None: a transform that draws nothing)."""

    def __init__(self, files: ImageFiles, transform: transforms.Compose):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, int, int]:
        i, view = key
        path, label = self.files[i]
        image = default_loader(path)
        if view is None:
            return self.transform(image), label, i
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view)
            return self.transform(image), label, i


def _checked_shard(shard: Shard | None, batch_size: int) -> Shard:
    rank, world = shard or (0, 1)
    problem = shard_problem(batch_size, world)
    if problem:
        raise ValueError(problem)
    return rank, world


class _EpochOrder:
    """The batch sampler: one epoch's batches of (image, view seed), this rank's slice of each; the
    order and the seeds are those of `epoch`, set before each epoch."""

    def __init__(self, indices: list[int], batch_size: int, seed: int, steps: int, shard: Shard):
        self.indices, self.batch_size, self.seed, self.steps, self.shard = indices, batch_size, seed, steps, shard
        self.epoch = 1

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(len(self.indices), generator=g).tolist()
        views = torch.randint(0, 2**62, (len(self.indices),), generator=g).tolist()
        for step in range(self.steps):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield [(self.indices[k], views[k]) for k in batch[shard_slice(len(batch), *self.shard)]]


def _loader(views: _Views, batches: Iterable[list], num_workers: int, device: torch.device,
            persistent: bool) -> DataLoader:
    return DataLoader(views, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=persistent and num_workers > 0)


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class FolderTrainBatches:
    """Shuffled, augmented training batches read from image files (kdexp.data.loaders.TrainBatches'
    interface); the last partial batch is kept. `shard`: this rank's slice of each global batch of
    `batch_size` images, each Batch's loss_scale its share of that batch (a last batch of fewer
    images than ranks is dropped)."""

    def __init__(self, splits: FolderSplits, batch_size: int, seed: int, device: torch.device,
                 max_steps: int | None = None, channels_last: bool = False, image_size: int = 224,
                 num_workers: int = 0, shard: Shard | None = None):
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.max_steps, self.channels_last, self.image_size = max_steps, channels_last, image_size
        self.layout, self.shard = splits.layout, _checked_shard(shard, batch_size)
        self.size = len(splits.train_idx)  # images per epoch, on all ranks together
        full, rest = divmod(self.size, batch_size)
        steps = full + (rest >= self.shard[1])
        self._order = _EpochOrder(splits.train_idx, batch_size, seed, min(steps, max_steps) if max_steps else steps,
                                  self.shard)
        views = _Views(splits.train, train_transform(image_size, splits.layout))
        self._loader = _loader(views, self._order, num_workers, device, persistent=True)
        # file number under train/ -> index in the training split (Batch.index): the val split's files are not in it
        self._split_index = torch.full((len(splits.train),), -1, dtype=torch.long)
        self._split_index[splits.train_idx] = torch.arange(len(splits.train_idx))

    def __len__(self) -> int:
        return len(self._order)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self._order.epoch = epoch
        for step, (x, y, files) in enumerate(self._loader):
            global_batch = min(self.batch_size, self.size - step * self.batch_size)
            yield Batch(_to_device(x, self.device, self.channels_last), y.to(self.device, non_blocking=True),
                        self._split_index[files].to(self.device), loss_scale=len(y) * self.shard[1] / global_batch)


class FolderEvalBatches:
    """Fixed-order, centre-cropped batches of one split (kdexp.data.loaders.EvalBatches' interface):
    with `shard`, the batches and `len()` are this rank's block of the split; `labels` are the whole
    split's, `classes` their names."""

    def __init__(self, files: ImageFiles, indices: list[int], batch_size: int, device: torch.device,
                 channels_last: bool = False, image_size: int = 224, layout: FolderLayout = IMAGENET_LAYOUT,
                 classes: tuple[str, ...] = (), num_workers: int = 0, shard: Shard | None = None):
        mine = indices[shard_slice(len(indices), *shard)] if shard else indices
        self.labels = torch.from_numpy(files.labels[indices]).to(device)
        self.size = len(mine)  # this rank's images
        self.batch_size, self.device = batch_size, device
        self.channels_last, self.image_size = channels_last, image_size
        self.layout, self.classes = layout, classes
        batches = [[(i, None) for i in mine[start:start + batch_size]] for start in range(0, len(mine), batch_size)]
        self._loader = _loader(_Views(files, eval_transform(image_size, layout)), batches, num_workers, device,
                               persistent=False)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, _ in self._loader:
            yield _to_device(x, self.device, self.channels_last), y.to(self.device, non_blocking=True)


def build_folder_batches(splits: FolderSplits, batch_size: int, eval_batch_size: int, seed: int,
                         device: torch.device, max_steps: int | None = None, channels_last: bool = False,
                         image_size: int = 224, num_workers: int = 0, shard: Shard | None = None
                         ) -> tuple[FolderTrainBatches, FolderEvalBatches | None, FolderEvalBatches]:
    """(train, val or None without a validation split, test) of an image-folder dataset."""
    def evaluation(files: ImageFiles, indices: list[int]) -> FolderEvalBatches:
        return FolderEvalBatches(files, indices, eval_batch_size, device, channels_last, image_size, splits.layout,
                                 splits.classes, num_workers, shard)
    train = FolderTrainBatches(splits, batch_size, seed, device, max_steps, channels_last, image_size, num_workers,
                               shard)
    val = evaluation(splits.train, splits.val_idx) if splits.val_idx else None
    return train, val, evaluation(splits.test, list(range(len(splits.test))))
