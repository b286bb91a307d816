"""Plain cross-entropy: teachers and baseline students."""
from __future__ import annotations

from kdexp.methods.base import DistillationMethod


class CrossEntropy(DistillationMethod):
    name = "ce"
    needs_teacher = False

    def forward(self, student, teacher, targets):
        ce = self.cross_entropy(student.logits, targets)
        return {"loss": ce, "ce": ce}
