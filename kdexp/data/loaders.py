"""Seeded batches from uint8 tensors: the epoch's order, crops and flips are a pure function of
(seed, epoch), so an interrupted run resumes with exactly the batches it would have seen.

`TrainBatches` (data.loader=tensor, the default) augments whole batches with tensor indexing on
whatever device holds the data. `TorchLoaderBatches` (data.loader=torch) is the reference path the
study's code used: PIL transforms in DataLoader workers, kept for parity checks.

Every path (both training loaders, evaluation, the teacher-logit cache) can resize its images to
`data.image_size` as the last step, after the crop and flip: bilinear, antialiased as torchvision's
`Resize` (on these tensors it is the same operation). It is a fixed function of the 32-pixel view,
so the crop/flip index still identifies a view exactly.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from kdexp.data.cifar import CIFAR10_LAYOUT, CLASSES, Layout
from kdexp.data.strong_view import strong_augmentation

PAD = 4
SIZE = 32  # the stored images' side, and the crop's
Shard = tuple[int, int]  # (rank, world size): one rank's part of a run on several (kdexp/distributed.py)


def shard_slice(size: int, rank: int, world: int) -> slice:
    """Rank `rank`'s part of `size` items shared by `world` ranks: contiguous, in rank order,
    size // world items or one more, so the parts hold every item exactly once (a global batch of B
    divisible by the world: slices of B // world)."""
    return slice(size * rank // world, size * (rank + 1) // world)


def shard_problem(batch_size: int, world: int) -> str | None:
    """Why `world` ranks cannot share global batches of `batch_size` (None: they can)."""
    if batch_size % world:
        return (f"trainer.batch_size={batch_size} must be divisible by the {world} ranks (WORLD_SIZE): each "
                f"rank takes an equal part of every global batch")
    return None


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # A distinct, reproducible stream per (seed, epoch); seed 0 is a real seed like any other.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@functools.cache
def _mean_std(device: torch.device, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a per-batch host-to-GPU copy would make the CPU wait for the GPU.
    return (torch.tensor(layout.mean, device=device).view(1, 3, 1, 1),
            torch.tensor(layout.std, device=device).view(1, 3, 1, 1))


def normalize(images_u8: torch.Tensor, layout: Layout = CIFAR10_LAYOUT) -> torch.Tensor:
    """Float images normalised with the dataset's per-channel mean and std."""
    mean, std = _mean_std(images_u8.device, layout)
    return (images_u8.float() / 255.0 - mean) / std


def crop_flip(images_u8: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Random-crop-32-with-padding-4 then horizontal flip, as torchvision does, for a whole batch:
    view b is rows dy[b]..dy[b]+31 and columns dx[b]..dx[b]+31 of the zero-padded image, columns
    reversed where flip[b]."""
    padded = F.pad(images_u8, (PAD, PAD, PAD, PAD))
    ar = torch.arange(SIZE, device=images_u8.device)
    rows = dy[:, None] + ar
    cols = dx[:, None] + torch.where(flip[:, None], SIZE - 1 - ar, ar)
    batch = torch.arange(len(images_u8), device=images_u8.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images resized to size x size (bilinear; antialiased, so a smaller size averages
    instead of skipping pixels); unchanged at their own size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def model_input(images: torch.Tensor, size: int, channels_last: bool, layout: Layout = CIFAR10_LAYOUT) -> torch.Tensor:
    """Normalised, resized images in the layout the model was prepared with. The crop's gather
    leaves NHWC strides: pinning the layout matters (an input whose layout differs from the model's
    costs a copy per conv, and at 4 channels crashes torch 2.14's CPU conv backward)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return resize(normalize(images, layout), size).contiguous(memory_format=memory_format)


def augment(images_u8: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
            channels_last: bool, size: int = SIZE, layout: Layout = CIFAR10_LAYOUT) -> torch.Tensor:
    """The training view of each image as the model sees it: cropped, flipped, normalised, resized."""
    return model_input(crop_flip(images_u8, dy, dx, flip), size, channels_last, layout)


@dataclass
class Batch:
    x: torch.Tensor  # normalised float images
    y: torch.Tensor
    index: torch.Tensor | None = None  # each image's index in the training split (methods' `needs_indices`, caches)
    dy: torch.Tensor | None = None
    dx: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    # this shard's size x ranks / the global batch's: scaling the shard's mean loss by it makes the
    # ranks' averaged gradient the global batch's mean (1 except in an uneven last batch)
    loss_scale: float = 1.0
    x_strong: torch.Tensor | None = None  # the same images strongly augmented (data.strong_view), or None


class TrainBatches:
    """Shuffled, augmented training batches; the last partial batch is kept (as DataLoader does).
    With `shard` (rank, world: several ranks) every rank draws the same global order and takes its
    slice of each global batch of `batch_size` (shard_slice), so the images of a step do not depend
    on the number of ranks; a last batch of fewer images than ranks is dropped (a rank cannot take
    an empty part)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 device: torch.device, max_steps: int | None = None, channels_last: bool = False,
                 image_size: int = SIZE, layout: Layout = CIFAR10_LAYOUT, shard: Shard | None = None):
        problem = shard_problem(batch_size, shard[1]) if shard else None
        if problem:
            raise ValueError(problem)
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.max_steps, self.channels_last, self.image_size = max_steps, channels_last, image_size
        self.layout = layout  # its normalisation
        self.rank, self.ranks = shard or (0, 1)

    def __len__(self) -> int:
        full, rest = divmod(len(self.images), self.batch_size)
        steps = full + (rest >= self.ranks)
        return min(steps, self.max_steps) if self.max_steps else steps

    def epoch(self, epoch: int) -> Iterator[Batch]:
        g = epoch_generator(self.seed, epoch)
        n = len(self.images)
        order = torch.randperm(n, generator=g).to(self.device)
        offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g).to(self.device)
        flips = torch.randint(0, 2, (n,), generator=g).bool().to(self.device)
        for step in range(len(self)):
            idx, scale = self._part(order[step * self.batch_size:(step + 1) * self.batch_size])
            dy, dx, flip = offsets[idx, 0], offsets[idx, 1], flips[idx]
            x = augment(self.images[idx], dy, dx, flip, self.channels_last, self.image_size, self.layout)
            yield Batch(x, self.labels[idx], idx, dy, dx, flip, scale)

    def _part(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's images of a global batch, and their Batch.loss_scale."""
        if self.ranks == 1:
            return batch, 1.0
        part = batch[shard_slice(len(batch), self.rank, self.ranks)]
        return part, len(part) * self.ranks / len(batch)


class _PILDataset(Dataset):
    """Item i: its views (the training view, then with `strong_view` the strong one), label, index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int = SIZE,
                 layout: Layout = CIFAR10_LAYOUT, strong_view: str | None = None):
        self.images = images.permute(0, 2, 3, 1).numpy()  # HWC uint8, as torchvision's CIFAR10 holds it
        self.labels = labels.tolist()
        resize = [transforms.Resize(image_size, transforms.InterpolationMode.BILINEAR, antialias=True)] \
            if image_size != SIZE else []
        crop_flip = [transforms.RandomCrop(SIZE, padding=PAD), transforms.RandomHorizontalFlip()]
        to_input = [transforms.ToTensor(), transforms.Normalize(layout.mean, layout.std), *resize]
        self.transform = transforms.Compose([*crop_flip, *to_input])
        # The strong view crops and flips with draws of its own, then augments the PIL image (MLKD's order).
        self.strong_transform = transforms.Compose([*crop_flip, strong_augmentation(strong_view), *to_input]) \
            if strong_view else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = Image.fromarray(self.images[i])
        views = [self.transform(image)]  # the training view draws first, as the reference's MultipleApply
        if self.strong_transform:
            views.append(self.strong_transform(image))
        return views, self.labels[i], i


class TorchLoaderBatches(TrainBatches):
    """The reference path: torchvision PIL transforms in DataLoader workers, seeded per epoch."""

    def __init__(self, images, labels, batch_size, seed, device, max_steps=None, channels_last=False,
                 image_size: int = SIZE, num_workers: int = 0, layout: Layout = CIFAR10_LAYOUT,
                 strong_view: str | None = None):
        super().__init__(images, labels, batch_size, seed, torch.device("cpu"), max_steps, channels_last, image_size,
                         layout)
        self.target_device, self.num_workers = device, num_workers
        self.dataset = _PILDataset(images, labels, image_size, layout, strong_view)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True,
                            num_workers=self.num_workers, generator=epoch_generator(self.seed, epoch),
                            pin_memory=self.target_device.type == "cuda",
                            worker_init_fn=_seed_numpy_in_worker)
        for step, (views, y, index) in enumerate(loader):
            if step >= len(self):
                break
            x, *strong = (self._on_target(view) for view in views)
            yield Batch(x, y.to(self.target_device, non_blocking=True), index.to(self.target_device),
                        x_strong=strong[0] if strong else None)

    def _on_target(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.target_device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _seed_numpy_in_worker(worker_id: int) -> None:
    np.random.seed(torch.initial_seed() % 2**32)


def build_train_batches(loader: str, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                        seed: int, device: torch.device, max_steps: int | None = None,
                        channels_last: bool = False, image_size: int = SIZE, num_workers: int = 0,
                        layout: Layout = CIFAR10_LAYOUT, shard: Shard | None = None,
                        strong_view: str | None = None) -> TrainBatches:
    """`shard`: this rank's part of every global batch (data.loader=tensor only, for data held in
    memory: kdexp.distributed.check); `strong_view` (data.loader=torch only): kdexp.data.strong_view."""
    if loader == "tensor" and strong_view:
        raise ValueError(f"data.strong_view={strong_view} is made by PIL transforms: use data.loader=torch")
    if loader == "tensor":
        return TrainBatches(images, labels, batch_size, seed, device, max_steps, channels_last, image_size, layout,
                            shard)
    if loader == "torch":
        return TorchLoaderBatches(images, labels, batch_size, seed, device, max_steps, channels_last,
                                  image_size, num_workers, layout, strong_view)
    raise ValueError(f"data.loader={loader!r}: choose 'tensor' or 'torch'")


class EvalBatches:
    """Fixed-order, un-augmented batches of one split (val or test); `classes` names its labels.
    With `shard` (rank, world: several ranks) it yields only this rank's part of the split
    (shard_slice: each image on exactly one rank, no padding); `labels` stays the whole split's, which
    the predictions gathered from every rank (kdexp.distributed.gather_rows) are scored against."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
                 channels_last: bool = False, image_size: int = SIZE, layout: Layout = CIFAR10_LAYOUT,
                 classes: tuple[str, ...] = CLASSES, shard: Shard | None = None):
        part = shard_slice(len(images), *shard) if shard else slice(None)
        self.images, self.labels = images[part].to(device), labels.to(device)
        self.batch_size, self.channels_last, self.image_size = batch_size, channels_last, image_size
        self.layout, self.classes = layout, classes  # its normalisation; its labels' names

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.images), self.batch_size):
            x = model_input(self.images[start:start + self.batch_size], self.image_size, self.channels_last,
                            self.layout)
            yield x, self.labels[start:start + self.batch_size]
