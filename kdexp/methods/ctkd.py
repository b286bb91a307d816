"""Curriculum Temperature KD (Li et al., AAAI 2023), the global temperature, as zhengli97/CTKD computes it:

    T      = t_min + t_range * sigmoid(GRL_lambda(theta))     theta: one learned scalar, initialised to 1
    L      = kd_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + ce_weight * CE
    lambda = end + (start - end) * (1 + cos(pi * min(epoch, lambda_epochs) / lambda_epochs)) / 2

GRL is a gradient-reversal layer: identity forward, -lambda * gradient backward, so theta climbs the
KD loss (makes the task harder) while the student descends it, and lambda, rising with the epoch
(1-based, the epoch in progress), makes that adversary stronger: an easy-to-hard curriculum. The
gradient reaches T through the division of both logits and through the T^2 factor. theta is the
method's parameter, trained by the student's optimiser with the student's lr, momentum and weight
decay (as the reference's single SGD over its trainable list does).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from kdexp.methods.base import DistillationMethod, fmt
from kdexp.methods.logit import distillation_logits, kd_loss, loss_weights, standardized_variant, weights_label


class CTKD(DistillationMethod):
    name = "ctkd"
    grid = {"alpha": "α"}

    def __init__(self, alpha: Optional[float] = 0.9, t_min: float = 1.0, t_range: float = 20.0,
                 lambda_start: float = 0.0, lambda_end: float = 1.0, lambda_epochs: int = 10,
                 standardize: bool = False, kd_weight: Optional[float] = None, ce_weight: Optional[float] = None):
        super().__init__()
        self.kd_weight, self.ce_weight = loss_weights(alpha, kd_weight, ce_weight)
        if not t_min > 0:
            raise ValueError(f"method.t_min={fmt(t_min)} must be > 0: the lowest temperature the method can learn")
        if not t_range >= 0:
            raise ValueError(f"method.t_range={fmt(t_range)} must be >= 0: the learned temperature spans "
                             f"(t_min, t_min + t_range); 0 fixes it at t_min")
        if not lambda_epochs >= 1:
            raise ValueError(f"method.lambda_epochs={fmt(lambda_epochs)} must be >= 1: the epochs over which "
                             f"lambda moves from lambda_start to lambda_end (1: lambda_end from the first epoch)")
        self.t_min, self.t_range = float(t_min), float(t_range)
        self.lambda_start, self.lambda_end, self.lambda_epochs = float(lambda_start), float(lambda_end), int(lambda_epochs)
        self.standardize = bool(standardize)
        # The reference's Global_T: torch.ones(1), so T starts at t_min + t_range * sigmoid(1) (15.6 by default).
        self.theta = nn.Parameter(torch.ones(1))

    def forward(self, student, teacher, targets):
        ce = self.cross_entropy(student.logits, targets)
        lam = self.grl_lambda()
        T = self.temperature(lam)
        kd = kd_loss(*distillation_logits(student, teacher, self.standardize), T)  # T a tensor: it gets a gradient
        return {"loss": self.kd_weight * kd + self.ce_weight * ce, "ce": ce, "kd": kd,
                "temperature": T.detach(), "lambda": lam}

    def grl_lambda(self) -> torch.Tensor:
        """The cosine curriculum at the epoch in progress, from the epoch buffer (a compiled graph reads it)."""
        progress = self.epoch.clamp(max=self.lambda_epochs) / self.lambda_epochs
        return self.lambda_end + (self.lambda_start - self.lambda_end) * (1 + torch.cos(math.pi * progress)) / 2

    def temperature(self, lam: torch.Tensor) -> torch.Tensor:
        """The learned temperature (0-d), its gradient to theta reversed and scaled by `lam`."""
        return self.t_min + self.t_range * torch.sigmoid(reverse_gradient(self.theta, lam))[0]

    @classmethod
    def variant(cls, cfg: Mapping[str, Any]) -> str | None:
        return standardized_variant(cfg)

    @classmethod
    def cell_label(cls, cfg: Mapping[str, Any]) -> str:
        """`α=0.9`, or with explicit weights (alpha=null) `kd=9, ce=0.1`."""
        if cfg.get("alpha") is not None:
            return super().cell_label(cfg)
        return weights_label(cfg)


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(lam)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (lam,) = ctx.saved_tensors
        return -lam * grad, None


def reverse_gradient(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Ganin & Lempitsky's gradient-reversal layer: x forward, -lam * gradient backward."""
    return _GradientReversal.apply(x, lam)
