"""Hinton et al.'s logit distillation, with alpha weighting the KD term as in the study:

    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

KL summed over classes and averaged over the batch; teacher logits carry no gradient. (torchdistill
puts alpha on the CE term instead; mdistiller uses two independent weights.)
"""
from __future__ import annotations

import torch.nn.functional as F

from kdexp.methods.base import DistillationMethod, check_alpha, fmt


class LogitKD(DistillationMethod):
    name = "logit"

    def __init__(self, alpha: float = 0.5, T: float = 4.0):
        super().__init__()
        self.alpha = check_alpha(alpha)
        if not T > 0:
            raise ValueError(f"method.T={fmt(T)} must be > 0 (the softmax temperature)")
        self.T = float(T)

    def forward(self, student, teacher, targets):
        ce = F.cross_entropy(student.logits, targets)
        kd = kd_loss(student.logits, teacher.logits.detach(), self.T)
        return {"loss": self.alpha * kd + (1.0 - self.alpha) * ce, "ce": ce, "kd": kd}

    @staticmethod
    def run_tag(cfg: dict) -> str:
        return f"logit_a{fmt(cfg['alpha'])}_T{fmt(cfg['T'])}"


def kd_loss(student_logits, teacher_logits, T: float):
    """T^2 * KL(p_t || p_s) at temperature T, batch-mean; in fp32 even for bf16 logits (autocast),
    which would otherwise be divided by T in bf16."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    return F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                    reduction="batchmean", log_target=True) * (T * T)
