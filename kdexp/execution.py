"""How a run executes, as opposed to what it computes: precision, memory format, optimiser kernel,
graph capture and the teacher-logit cache. None of these changes the recipe.

The `execution` group picks a profile: `reference` (the study's fp32 numerics on every device) or
`fast` (bf16 autocast, compiled on CUDA). null settings resolve per device: on for CUDA, off on
the CPU. channels_last, the fused optimiser and the exact teacher-logit cache equal the fp32
reference to floating-point tolerance by construction, so they leave a run's numerics `reference`;
bf16 and compile make them `fast`, and result.json says which.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch

from kdexp.config import CHANNELS_LAST_NEEDS_CUDA, COMPILE_NEEDS_CUDA, ConfigError
from kdexp.methods import DistillationMethod


# Config keys that say where and how a run executes and change none of its numbers: its run dir's
# name leaves them out (kdexp.config.label_excluded_keys) and analysis does not tell runs apart by
# them (analysis.collect). A key stands for itself and every key under it.
RESULT_NEUTRAL_KEYS = ("paths", "data.root", "data.download", "data.verify_md5", "trainer.device", "trainer.progress",
                       "trainer.dist_timeout_s", "execution.fused", "execution.channels_last",
                       "execution.teacher_cache", "dry_run", "retry_failed", "export_teacher", "logger")
# Keys that change a run's numbers but not its recipe: the execution profile (bf16, compiled kernels:
# result.json's `execution`, which analysis reads as the numerics column) and, before that group
# existed, the trainer.* keys that held it; data.num_workers, which deals loader=torch's random
# augmentations out to its workers. Run dirs name them (a fast run never shares a reference run's
# dir); analysis treats runs that differ only in them as one configuration.
NUMERICS_KEYS = ("execution", "trainer.amp", "trainer.channels_last", "trainer.fused", "trainer.compile",
                 "trainer.teacher_cache", "data.num_workers")


@dataclasses.dataclass(frozen=True)
class Execution:
    amp: torch.dtype | None = None  # autocast dtype; None = fp32
    channels_last: bool = False
    fused: bool = False
    compile: bool = False
    teacher_cache: bool = False
    profile: str = "reference"  # the execution group's option the run asked for

    @classmethod
    def resolve(cls, settings, device: torch.device, method: DistillationMethod, loader: str) -> "Execution":
        """The run's `execution` config node, resolved for `device`."""
        cuda = device.type == "cuda"
        if settings.compile and not cuda:
            raise ConfigError(COMPILE_NEEDS_CUDA)
        if settings.channels_last and not cuda:
            raise ConfigError(CHANNELS_LAST_NEEDS_CUDA)
        cacheable = method.can_use_teacher_cache() and loader == "tensor"
        return cls(
            amp=torch.bfloat16 if settings.amp == "bf16" else None,
            channels_last=_auto(settings.channels_last, cuda),
            fused=_auto(settings.fused, cuda),
            compile=_auto(settings.compile, cuda),
            teacher_cache=_auto(settings.teacher_cache, cuda and cacheable),
            profile=settings.name,
        )

    @property
    def numerics(self) -> str:
        """`reference` where results equal the study's fp32 loop to floating-point tolerance, else `fast`."""
        return "reference" if self.amp is None and not self.compile else "fast"

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp)

    @property
    def precision(self) -> str:
        return "fp32" if self.amp is None else str(self.amp).removeprefix("torch.")

    def record(self) -> dict[str, str | bool | None]:
        """How the run executed, for result.json: every setting, the autocast dtype as `precision`,
        the numerics they add up to, and the TF32 switches PyTorch ran fp32 with (its defaults:
        convolutions in TF32, matrix products not)."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "amp"}
        return {"numerics": self.numerics, "precision": self.precision, **settings,
                "tf32_conv": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    @staticmethod
    def compiled(fn: Callable, deterministic: bool) -> Callable:
        """`fn` as CUDA graphs; one fixed batch shape, so no dynamic-shape kernels."""
        if deterministic:
            import torch._inductor.config  # here: ~1 s of imports that runs without compile never need
            torch._inductor.config.deterministic = True  # no on-device autotuning that changes numerics
        return torch.compile(fn, mode="reduce-overhead", dynamic=False)


def _auto(value: bool | None, default: bool) -> bool:
    return default if value is None else bool(value)
