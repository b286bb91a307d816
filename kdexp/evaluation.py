"""Accuracy, per-class accuracy and teacher-student fidelity from logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdexp.data.loaders import EvalBatches


@torch.no_grad()
def predict(model: nn.Module, batches: EvalBatches) -> torch.Tensor:
    """Logits for a whole split, in eval mode; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(x).float() for x, _ in batches])
    model.train(was_training)
    return logits


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    # count on integers: a float32 mean turns 0.29 into 0.28999999165534973
    return (logits.argmax(1) == labels).sum().item() / len(labels)


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> dict[str, float]:
    """Accuracy per class present in `labels`, keyed by the class names (the data's meta file)."""
    correct = logits.argmax(1) == labels
    return {name: correct[labels == c].sum().item() / (labels == c).sum().item()
            for c, name in enumerate(classes) if (labels == c).any()}


def fidelity(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and KL(teacher || student) at T=1 and T=4 (batch-mean, no T^2 factor)."""
    def kl(T: float) -> float:
        return F.kl_div(F.log_softmax(student_logits / T, 1), F.log_softmax(teacher_logits / T, 1),
                        reduction="batchmean", log_target=True).item()
    agreement = (student_logits.argmax(1) == teacher_logits.argmax(1)).sum().item() / len(student_logits)
    return {"agreement": agreement, "kl_t1": kl(1.0), "kl_t4": kl(4.0)}
