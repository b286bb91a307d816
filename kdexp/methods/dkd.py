"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022), as mdistiller computes it:

    L     = CE + w(epoch) * (alpha * TCKD + beta * NCKD)
    TCKD  = T^2 * KL(b_t || b_s)      b = (p_target, 1 - p_target) at temperature T
    NCKD  = T^2 * KL(q_t || q_s)      q = softmax over the non-target classes only (target masked out)
    w     = min(epoch / warmup, 1)    epoch: the 1-based epoch in progress (mdistiller's convention)

KL summed over classes and averaged over the batch. alpha and beta are DKD's own weights of its two
terms, not kdexp's alpha of `logit` (which trades KD against CE). Classical KD is the coupled case:
per sample, TCKD + (1 - p_t^T) * NCKD = T^2 * KL(p_t || p_s), p_t^T the teacher's target probability.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from kdexp.methods.base import DistillationMethod, fmt
from kdexp.methods.logit import check_temperature, distillation_logits, standardized_variant


class DKD(DistillationMethod):
    name = "dkd"
    grid = {"beta": "β", "T": "T"}

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup: int = 20,
                 standardize: bool = False):
        super().__init__()
        for key, value in (("alpha", alpha), ("beta", beta), ("warmup", warmup)):
            if not value >= 0:
                raise ValueError(f"method.{key}={fmt(value)} must be >= 0")
        self.alpha, self.beta, self.warmup = float(alpha), float(beta), int(warmup)
        self.T = check_temperature(T)
        self.standardize = bool(standardize)

    def forward(self, student, teacher, targets):
        ce = self.cross_entropy(student.logits, targets)
        tckd, nckd = dkd_terms(*distillation_logits(student, teacher, self.standardize), targets, self.T)
        kd = self.alpha * tckd + self.beta * nckd
        return {"loss": ce + self.warmup_weight() * kd, "ce": ce, "kd": kd, "tckd": tckd, "nckd": nckd}

    def warmup_weight(self) -> torch.Tensor:
        """min(epoch / warmup, 1) from the epoch buffer: a tensor, so a compiled graph never holds a stale value."""
        if self.warmup == 0:
            return torch.ones_like(self.epoch)
        return (self.epoch / self.warmup).clamp(max=1.0)

    @classmethod
    def variant(cls, cfg: Mapping[str, Any]) -> str | None:
        return standardized_variant(cfg)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each T^2 * KL summed over its classes, batch-mean."""
    target = F.one_hot(targets, student_logits.shape[1]).bool()
    s_binary, s_others = _decoupled_log_probs(student_logits / T, targets, target)
    t_binary, t_others = _decoupled_log_probs(teacher_logits / T, targets, target)
    tckd = (t_binary.exp() * (t_binary - s_binary)).sum(1).mean()
    # The target column of the renormalised log-probabilities is meaningless: its teacher weight is 0.
    q_teacher = t_others.masked_fill(target, float("-inf")).exp()
    nckd = (q_teacher * (t_others - s_others)).sum(1).mean()
    return tckd * (T * T), nckd * (T * T)


def _decoupled_log_probs(z: torch.Tensor, targets: torch.Tensor,
                         target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log (p_target, p_non-target), and log of each non-target class's probability renormalised
    over the non-target classes (the target logit masked out before the softmax)."""
    all_classes = z.logsumexp(1, keepdim=True)
    non_target = z.masked_fill(target, float("-inf")).logsumexp(1, keepdim=True)
    binary = torch.cat([z.gather(1, targets[:, None]), non_target], dim=1) - all_classes
    return binary, z - non_target
