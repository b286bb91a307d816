"""A100 seconds per training epoch of any run, modelled from the work its networks do and calibrated
on the study's measured epoch times; the plan's GPU-hours come from here.

Measured (study-notes, the reference loop on an A100: fp32 with cuDNN's default TF32 convolutions,
deterministic cuDNN, batch 128, 50k training + 10k test images, 10 classes): MEASURED_EPOCH_SECONDS.

Modelled: every aten op of one training step (forward, loss, backward) and of one evaluation
batch is traced on the meta device (no memory, no compute; a second for the largest network).
An op that launches a kernel costs max(OP_OVERHEAD_S, flops / F + bytes / B): F and B, the effective
compute rate and memory bandwidth, are fitted to the measured epochs (least squares on log
seconds); OP_OVERHEAD_S is assumed. The measured networks' ops are long, so they pin F and B but not
the overhead, which dominates networks of many small ops (resnet110, mobilenetv2, shufflenetv2:
5 or 15 us instead of 10 moves them by -30 or +35 %). Not counted: the optimiser step (a few fused
kernels over the parameters, under 2 % of a step here), a feature method's projections.

Data loading: CIFAR's tensors are in the GPU's memory (the PIL path, `data.loader=torch`, decodes
~7,000 images/s per core: not a bound). Image folders (ImageNet) are decoded and augmented by
`data.num_workers` DataLoader workers at WORKER_IMAGES_PER_S each, overlapping the GPU's work: each
phase of an epoch takes the longer of the two. kdexp's CUDA defaults (bf16, channels_last, augmentation on the GPU, the teacher-logit
cache) are expected to be faster than this reference loop; nothing here is measured on them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from scipy.optimize import least_squares
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from kdexp.config import DataConfig
from kdexp.data import CIFAR10_LAYOUT, dataset, split_sizes
from kdexp.models import model_layout

MEASURED_EPOCH_SECONDS = {"resnet18": 6.4, "resnet34": 10.0, "resnet50": 18.6}
# The measurements' setting: batch 128 on CIFAR-10's training files, evaluated on its test set. The notes
# do not give the evaluation batch size: kdexp's default is assumed (evaluation is 6-7 % of a modelled epoch).
MEASURED_SETTING = {"batch_size": 128, "eval_batch_size": DataConfig.eval_batch_size,
                    "train_images": CIFAR10_LAYOUT.train_size, "eval_images": CIFAR10_LAYOUT.test_size}
# Host time PyTorch's eager mode spends issuing one CUDA kernel (dispatcher, autograd, launch):
# 5-15 us is the usual range; assumed, not measured.
OP_OVERHEAD_S = 10e-6
# JPEG decode + RandomResizedCrop/flip/normalise per DataLoader worker, measured on this project's
# 2-core machine (tests/benchmarks/imagenet_loader.py: 270-290 img/s per worker, README "ImageNet");
# a cluster node's cores are faster, so this errs towards a loader-bound estimate.
WORKER_IMAGES_PER_S = 280
# Ops that launch no kernel: views and allocations.
_NO_KERNEL = {torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten._unsafe_view}


@dataclass(frozen=True)
class Network:
    arch: str
    num_classes: int
    stem: str
    width: int
    image_size: int


@dataclass(frozen=True)
class Device:
    flops_per_s: float
    bytes_per_s: float
    op_overhead_s: float = OP_OVERHEAD_S

    def seconds(self, ops: np.ndarray) -> float:
        """Time of the ops (rows of flops, bytes), each at least the overhead of issuing it."""
        return float(np.maximum(self.op_overhead_s, ops[:, 0] / self.flops_per_s + ops[:, 1] / self.bytes_per_s).sum())


class _OpTrace(TorchDispatchMode):
    """Records (flops, bytes read + written) of every aten op that launches a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[float, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if func.is_view or packet in _NO_KERNEL:
            return out
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        tensors = {id(t): t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
        self.ops.append((flops, sum(t.numel() * t.element_size() for t in tensors.values())))
        return out


@lru_cache(maxsize=None)
def traced_ops(net: Network, batch: int, training: bool) -> np.ndarray:
    """(flops, bytes) per kernel of one batch: a training step (forward, cross-entropy, backward) or,
    `training` False, an evaluation forward."""
    model = model_layout(net.arch, net.num_classes, net.stem, net.width).train(training)
    x = torch.zeros(batch, 3, net.image_size, net.image_size, device="meta")
    trace = _OpTrace()
    with trace, torch.set_grad_enabled(training):
        logits = model(x)
        if training:
            torch.nn.functional.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device="meta")).backward()
    return np.array(trace.ops, dtype=float)


def _measured_network(arch: str) -> Network:
    return Network(arch, num_classes=10, stem="cifar", width=64, image_size=32)


def _epoch_seconds(device: Device, student: Network, teacher: Network | None, batch_size: int,
                   eval_batch_size: int, train_images: int, eval_images: int, eval_every: int = 1,
                   loader_images_per_s: float = math.inf) -> float:
    """One epoch: every training step (the teacher's forward too) and its share of the evaluations,
    each phase no faster than the loader delivers its images."""
    step = device.seconds(traced_ops(student, batch_size, True))
    if teacher is not None:
        step += device.seconds(traced_ops(teacher, batch_size, False))
    evaluation = device.seconds(traced_ops(student, eval_batch_size, False))
    training = max(math.ceil(train_images / batch_size) * step, train_images / loader_images_per_s)
    evaluating = max(math.ceil(eval_images / eval_batch_size) * evaluation, eval_images / loader_images_per_s)
    return training + evaluating / eval_every


def _measured_epoch_seconds(device: Device, arch: str) -> float:
    return _epoch_seconds(device, _measured_network(arch), None, **MEASURED_SETTING)


@lru_cache(maxsize=1)
def a100() -> Device:
    """The model's A100: F and B fitted to the measured epochs."""
    def log_errors(log_rates: np.ndarray) -> list[float]:
        device = Device(*np.exp(log_rates))
        return [math.log(_measured_epoch_seconds(device, arch) / s) for arch, s in MEASURED_EPOCH_SECONDS.items()]
    return Device(*np.exp(least_squares(log_errors, np.log([50e12, 1e12])).x))


def calibration() -> dict[str, tuple[float, float]]:
    """Per measured network: (measured, modelled) seconds per epoch."""
    return {arch: (s, _measured_epoch_seconds(a100(), arch)) for arch, s in MEASURED_EPOCH_SECONDS.items()}


def _network(node: DictConfig, num_classes: int, image_size: int) -> Network:
    return Network(node.arch, num_classes, node.stem, node.width, image_size)


def epoch_seconds(cfg: DictConfig) -> float:
    """Modelled A100 seconds of one epoch of the run `cfg` (a composed kdexp.train config): its
    student's training steps, its teacher's forward passes (both on each of the method's views of
    an image: MLKD's strong view doubles them), and its evaluations (every trainer.eval_every epochs,
    averaged over epochs), each bounded by its loader (loader_images_per_s). A method's own work
    (CRD's memory bank) is not modelled."""
    d, tr = cfg.data, cfg.trainer
    train_images, eval_images = split_sizes(d)
    if tr.max_steps_per_epoch:
        train_images = min(train_images, tr.max_steps_per_epoch * tr.batch_size)
    train_images *= 2 if get_class(cfg.method._target_).needs_strong_view else 1
    teacher = _network(cfg.teacher, d.num_classes, d.image_size) if cfg.teacher.arch else None
    return _epoch_seconds(a100(), _network(cfg.model, d.num_classes, d.image_size), teacher, tr.batch_size,
                          d.eval_batch_size, train_images, eval_images, tr.eval_every, loader_images_per_s(d))


def loader_images_per_s(data: DictConfig) -> float:
    """Images/s one GPU's loader delivers: image folders' DataLoader workers (the main process when
    there are none); unbounded for CIFAR's in-memory tensors."""
    if not dataset(data.name).in_folders:
        return math.inf
    return max(1, data.num_workers) * WORKER_IMAGES_PER_S


def run_hours(cfg: DictConfig) -> float:
    """Modelled A100 hours of the whole run `cfg`."""
    return cfg.trainer.epochs * epoch_seconds(cfg) / 3600


def describe() -> str:
    """The model in one line, for the plan: its fit and its assumption."""
    device = a100()
    fit = ", ".join(f"R{arch.removeprefix('resnet')} {measured:g} s (modelled {modelled:.1f})"
                    for arch, (measured, modelled) in calibration().items())
    return (f"A100 estimate of the reference fp32 loop, modelled per kernel (launch/epoch_time.py): "
            f"{device.flops_per_s / 1e12:.0f} TFLOP/s and {device.bytes_per_s / 1e9:.0f} GB/s fitted to the "
            f"measured epochs {fit}, {OP_OVERHEAD_S * 1e6:g} us per kernel assumed")
