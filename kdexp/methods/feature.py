"""The study's Feature-KD on the four stage outputs (layer1..layer4):

    s_hat_l = P_l(s_l)                         1x1 conv C_s -> C_t, no bias, Xavier-uniform
    MSE_l   = mean((s_hat_l - t_l)^2)          over all elements
    COS_l   = mean_batch(1 - cos(GAP(s_hat_l), GAP(t_l)))
    L_feat  = mean_l MSE_l + beta * mean_l COS_l
    L       = alpha * L_feat + (1 - alpha) * CE

The projections belong to the loss and are trained by the student's optimiser. `clip_projection`
false reproduces the study's v1 bug: the projections are left out of the gradient-norm clip.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdexp.methods.base import DistillationMethod, check_alpha, fmt


class FeatureKD(DistillationMethod):
    name = "feature"
    grid = {"alpha": "α", "beta": "β"}
    needs_features = True

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, clip_projection: bool = True,
                 normalize_by_teacher_std: bool = False):
        super().__init__()
        self.alpha = check_alpha(alpha)
        if not beta >= 0:
            raise ValueError(f"method.beta={fmt(beta)} must be >= 0 (the weight of the cosine term)")
        self.beta = float(beta)
        self.clip_with_student = bool(clip_projection)
        self.normalize_by_teacher_std = normalize_by_teacher_std
        self.projections = nn.ModuleList()

    def bind(self, student, teacher):
        if teacher.stage_strides != student.stage_strides:
            raise ValueError(f"method={self.name} matches feature maps stage by stage, so teacher and student need "
                             f"the same stages at the same resolutions: {_described(teacher)} has stage strides "
                             f"{teacher.stage_strides}, {_described(student)} {student.stage_strides}")
        for c_s, c_t in zip(student.stage_channels, teacher.stage_channels):
            proj = nn.Conv2d(c_s, c_t, kernel_size=1, bias=False)
            nn.init.xavier_uniform_(proj.weight)
            self.projections.append(proj)

    def forward(self, student, teacher, targets):
        ce = self.cross_entropy(student.logits, targets)
        mse, cos = [], []
        for proj, s, t in zip(self.projections, student.features, teacher.features):
            s_hat, t = proj(s), t.detach()
            if self.normalize_by_teacher_std:
                scale = t.std().clamp_min(1e-6)
                s_hat, t = s_hat / scale, t / scale
            mse.append(F.mse_loss(s_hat, t))
            cos.append((1 - F.cosine_similarity(s_hat.mean(dim=(2, 3)), t.mean(dim=(2, 3)), dim=1)).mean())
        loss_mse, loss_cos = torch.stack(mse).mean(), torch.stack(cos).mean()
        feat = loss_mse + self.beta * loss_cos
        return {"loss": self.alpha * feat + (1.0 - self.alpha) * ce, "ce": ce, "kd": feat,
                "mse": loss_mse, "cos": loss_cos}

    @classmethod
    def variant(cls, cfg: Mapping[str, Any]) -> str | None:
        return None if cfg.get("clip_projection", True) else "bugged"


def _described(network: nn.Module) -> str:
    """`resnet34 (imagenet stem)`: a network as its config names it (a frozen teacher holds it as `.model`)."""
    network = getattr(network, "model", network)
    return f"{network.arch} ({network.stem} stem)"
