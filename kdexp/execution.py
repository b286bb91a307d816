"""How a run executes, as opposed to what it computes: precision, memory format, optimiser kernel,
graph capture and the teacher-logit cache. None of these changes the recipe.

`auto`/null settings resolve per device: the fast setting on CUDA, the reference one on the CPU
(where the defaults reproduce the study's loop exactly).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
import torch._inductor.config

from kdexp.config import CHANNELS_LAST_NEEDS_CUDA, COMPILE_NEEDS_CUDA, ConfigError
from kdexp.methods import DistillationMethod


@dataclasses.dataclass(frozen=True)
class Execution:
    amp: torch.dtype | None = None  # autocast dtype; None = fp32
    channels_last: bool = False
    fused: bool = False
    compile: bool = False
    teacher_cache: bool = False

    @classmethod
    def resolve(cls, trainer, device: torch.device, method: DistillationMethod, loader: str) -> "Execution":
        cuda = device.type == "cuda"
        if trainer.compile and not cuda:
            raise ConfigError(COMPILE_NEEDS_CUDA)
        if trainer.channels_last and not cuda:
            raise ConfigError(CHANNELS_LAST_NEEDS_CUDA)
        amp = {"auto": "bf16" if cuda else "none"}.get(trainer.amp, trainer.amp)
        cacheable = method.can_use_teacher_cache() and loader == "tensor"
        return cls(
            amp=torch.bfloat16 if amp == "bf16" else None,
            channels_last=_auto(trainer.channels_last, cuda),
            fused=_auto(trainer.fused, cuda),
            compile=trainer.compile,
            teacher_cache=_auto(trainer.teacher_cache, cuda and cacheable),
        )

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp)

    @property
    def precision(self) -> str:
        return "fp32" if self.amp is None else str(self.amp).removeprefix("torch.")

    def record(self) -> dict[str, str | bool]:
        """How the run executed, for result.json: every setting, the autocast dtype as `precision`."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "amp"}
        return {"precision": self.precision, **settings}

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    @staticmethod
    def compiled(fn: Callable, deterministic: bool) -> Callable:
        """`fn` as CUDA graphs; one fixed batch shape, so no dynamic-shape kernels."""
        if deterministic:
            torch._inductor.config.deterministic = True  # no on-device autotuning that changes numerics
        return torch.compile(fn, mode="reduce-overhead", dynamic=False)


def _auto(value: bool | None, default: bool) -> bool:
    return default if value is None else bool(value)
