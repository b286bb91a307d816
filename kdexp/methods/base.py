"""What every distillation method provides to the training loop."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
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

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called once both networks exist, before the optimiser is built (create parameters here)."""

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None,
                targets: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def run_tag(cfg: dict) -> str:
        """A short, readable name for run directories, from the method's config."""
        raise NotImplementedError


def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"method.alpha={alpha} is outside [0, 1]: alpha weights the KD term "
                         f"(L = alpha*L_kd + (1-alpha)*CE; alpha=0 is plain cross-entropy)")
    return float(alpha)


def fmt(value: float) -> str:
    """0.5 → '0.5', 4.0 → '4': numbers as a person writes them in a directory name."""
    return f"{value:g}"
