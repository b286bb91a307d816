"""Plain cross-entropy: teachers and baseline students."""
from __future__ import annotations

import torch.nn.functional as F

from kdexp.methods.base import DistillationMethod


class CrossEntropy(DistillationMethod):
    name = "ce"
    needs_teacher = False

    def forward(self, student, teacher, targets):
        ce = F.cross_entropy(student.logits, targets)
        return {"loss": ce, "ce": ce}

    @staticmethod
    def run_tag(cfg: dict) -> str:
        return "ce"
