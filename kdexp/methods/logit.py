"""Hinton et al.'s logit distillation, with alpha weighting the KD term as in the study:

    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

KL summed over classes and averaged over the batch; teacher logits carry no gradient. (torchdistill
puts alpha on the CE term instead; mdistiller uses two independent weights, which `kd_weight` and
`ce_weight` express: L = kd_weight * T^2 * KL + ce_weight * CE, with alpha=null.)

`standardize=true` is Sun et al.'s logit standardisation (CVPR 2024): teacher and student logits
are z-scored per sample before the temperature, so the student matches the teacher's logit
relations, not their range. Every logit-based method takes it from here (`standardized_logits`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F

from kdexp.methods.base import DistillationMethod, check_alpha, fmt


class LogitKD(DistillationMethod):
    name = "logit"
    grid = {"alpha": "α", "T": "T"}

    def __init__(self, alpha: Optional[float] = 0.5, T: float = 4.0, standardize: bool = False,
                 kd_weight: Optional[float] = None, ce_weight: Optional[float] = None):
        super().__init__()
        self.kd_weight, self.ce_weight = loss_weights(alpha, kd_weight, ce_weight)
        self.T = check_temperature(T)
        self.standardize = bool(standardize)

    def forward(self, student, teacher, targets):
        ce = self.cross_entropy(student.logits, targets)
        kd = kd_loss(*distillation_logits(student, teacher, self.standardize), self.T)
        return {"loss": self.kd_weight * kd + self.ce_weight * ce, "ce": ce, "kd": kd}

    @classmethod
    def variant(cls, cfg: Mapping[str, Any]) -> str | None:
        return standardized_variant(cfg)

    @classmethod
    def cell_label(cls, cfg: Mapping[str, Any]) -> str:
        """`α=0.5, T=4`, or with explicit weights (alpha=null) `kd=9, ce=0.1, T=2`."""
        if cfg.get("alpha") is not None:
            return super().cell_label(cfg)
        return f"{weights_label(cfg)}, T={fmt(cfg['T'])}"


def weights_label(cfg: Mapping[str, Any]) -> str:
    """`kd=9, ce=0.1`: the explicit weights (alpha=null) of a logit-based method's cell."""
    return f"kd={fmt(cfg['kd_weight'])}, ce={fmt(cfg['ce_weight'])}"


def loss_weights(alpha: float | None, kd_weight: float | None, ce_weight: float | None) -> tuple[float, float]:
    """(KD weight, CE weight): alpha's pair (alpha, 1 - alpha), or the two explicit weights; never both."""
    if kd_weight is None and ce_weight is None:
        if alpha is None:
            raise ValueError("method.alpha=null needs method.kd_weight and method.ce_weight (the weights "
                             "that replace alpha's pair), or set method.alpha")
        alpha = check_alpha(alpha)
        return alpha, 1.0 - alpha
    if alpha is not None:
        raise ValueError(f"method.alpha={fmt(alpha)} and method.kd_weight/ce_weight both given: the "
                         f"weights replace alpha (L = kd_weight*KD + ce_weight*CE); set method.alpha=null "
                         f"to use them, or drop them")
    if kd_weight is None or ce_weight is None:
        given, missing = ("kd_weight", "ce_weight") if ce_weight is None else ("ce_weight", "kd_weight")
        raise ValueError(f"method.{given} needs method.{missing} too (the two replace alpha's pair)")
    for key, value in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
        if not value >= 0:
            raise ValueError(f"method.{key}={fmt(value)} must be >= 0")
    return float(kd_weight), float(ce_weight)


def check_temperature(T: float) -> float:
    if not T > 0:
        raise ValueError(f"method.T={fmt(T)} must be > 0 (the softmax temperature)")
    return float(T)


def standardized_variant(cfg: Mapping[str, Any]) -> str | None:
    """The variant every logit-based method has: `std` with standardised logits."""
    return "std" if cfg.get("standardize") else None


def standardized_logits(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each sample's logits: (z - mean) / (std + 1e-7), with the unbiased std (n - 1), as
    Sun et al.'s code computes it (torch.std's default)."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + 1e-7)


def distillation_logits(student, teacher, standardize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and (detached) teacher logits as a logit-based loss takes them: in fp32 even for bf16
    logits (autocast), which would otherwise be divided by T in bf16, and z-scored when asked."""
    s, t = student.logits.float(), teacher.logits.detach().float()
    return (standardized_logits(s), standardized_logits(t)) if standardize else (s, t)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(p_t || p_s) at temperature T, batch-mean."""
    return F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                    reduction="batchmean", log_target=True) * (T * T)
