"""DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"): match the
teacher's relations, not its probabilities:

    y     = softmax(z / T)                                   (batch x classes)
    inter = T^2 * (1 - mean_i pearson(y_s[i, :], y_t[i, :]))  each sample's class ranking
    intra = T^2 * (1 - mean_c pearson(y_s[:, c], y_t[:, c]))  each class's ranking of the batch
    L     = CE + beta * inter + gamma * intra

Defaults: the authors' CIFAR-100 code (hunto/image_classification_sota, configs/strategies/distill/
dist_cifar.yaml): tau 4, CE weight 1, and KD weight 2 on beta = gamma = 1, i.e. beta = gamma = 2
here. (On ImageNet they use tau 1.)
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kdexp.methods.base import DistillationMethod, fmt
from kdexp.methods.logit import check_temperature, distillation_logits, standardized_variant


class DIST(DistillationMethod):
    name = "dist"
    grid = {"beta": "β", "gamma": "γ"}

    def __init__(self, beta: float = 2.0, gamma: float = 2.0, T: float = 4.0, standardize: bool = False):
        super().__init__()
        for key, value in (("beta", beta), ("gamma", gamma)):
            if not value >= 0:
                raise ValueError(f"method.{key}={fmt(value)} must be >= 0")
        self.beta, self.gamma = float(beta), float(gamma)
        self.T = check_temperature(T)
        self.standardize = bool(standardize)

    def forward(self, student, teacher, targets):
        ce = self.cross_entropy(student.logits, targets)
        inter, intra = dist_terms(*distillation_logits(student, teacher, self.standardize), self.T)
        kd = self.beta * inter + self.gamma * intra
        return {"loss": ce + kd, "ce": ce, "kd": kd, "inter": inter, "intra": intra}

    @classmethod
    def variant(cls, cfg: Mapping[str, Any]) -> str | None:
        return standardized_variant(cfg)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra): T^2 * (1 - mean Pearson correlation) over the rows and over the columns."""
    y_s, y_t = (student_logits / T).softmax(dim=1), (teacher_logits / T).softmax(dim=1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
    return inter * (T * T), intra * (T * T)


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b (eps as in the authors' code:
    a constant row correlates 0)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
