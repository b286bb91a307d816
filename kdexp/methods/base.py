"""What every distillation method provides to the training loop."""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any, ClassVar

import torch
from omegaconf import MISSING
from torch import nn


@dataclass
class ModelOutputs:
    logits: torch.Tensor
    features: list[torch.Tensor] | None = None  # layer1..layer4 outputs, when the method asks


class DistillationMethod(nn.Module):
    """Base class. `forward` returns named loss parts; "loss" is the one that is minimised, the
    others are logged as `loss_<name>`. Parameters a method owns (projections) are trained by the
    same optimiser as the student and, unless `clip_with_student` is False, clipped with it."""

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False
    clip_with_student: bool = True
    Config: ClassVar[type]  # the method's Hydra schema, made from __init__'s signature

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.Config = arguments_schema(cls)

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called once both networks exist, before the optimiser is built (create parameters here)."""

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None,
                targets: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def run_tag(cfg: dict) -> str:
        """A short, readable name for run directories, from the method's config."""
        raise NotImplementedError


def arguments_schema(cls: type) -> type:
    """A dataclass of `_target_` and `cls.__init__`'s arguments, typed and defaulted as there: the
    method group's schema (`conf/method/<name>.yaml` starts from `base_<name>`), so Hydra refuses
    `method.T=abc` or a misspelt key the way it does in every other group, without a hand-written
    copy of each signature. It is reachable as `cls.Config`, so a pickled config (the SLURM
    launcher's) finds its node type again."""
    hints = typing.get_type_hints(cls.__init__)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))]
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = MISSING if param.default is param.empty else param.default
        fields.append((param.name, hints.get(param.name, Any), field(default=default)))
    schema = make_dataclass(f"{cls.__name__}Config", fields)
    schema.__module__, schema.__qualname__ = cls.__module__, f"{cls.__qualname__}.Config"
    return schema


def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"method.alpha={fmt(alpha)} is outside [0, 1]: alpha weights the KD term "
                         f"(L = alpha*L_kd + (1-alpha)*CE; alpha=0 is plain cross-entropy)")
    return float(alpha)


def fmt(value: float) -> str:
    """0.5 → '0.5', 4.0 → '4': numbers as a person writes them in a directory name."""
    return f"{value:g}"
