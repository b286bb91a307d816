"""Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020), as RepDistiller's
crd/ computes it and mdistiller's CRD.py wraps it:

    v_s = e_s(f_s),  v_t = e_t(f_t)       e: Linear to feat_dim, then L2-normalised; f: the penultimate
                                          embeddings (each network's classifier input)
    h(v, m) = exp(v . m / nce_t) / Z      m: a row of a memory bank (a momentum average of the other
                                          network's past embeddings of that training image)
    L_crd = NCE(h(v_s, M_t[i, N_i])) + NCE(h(v_t, M_s[i, N_i]))
    NCE(x) = -mean_batch[ log(x_0 / (x_0 + K/n + eps)) + sum_k log((K/n) / (x_k + K/n + eps)) ]
    L     = ce_weight * CE + kd_weight * T^2 * KL(p_t || p_s) + beta * L_crd

i is the image's index in the training split (column 0: the positive), N_i its nce_k negatives, drawn
from the training images of the other classes; n the training split's size (the noise distribution
Pn = 1/n). Z (one per bank) is estimated from the first batch, mean(h) * n, and then fixed, as in the
reference: the published numbers ran with it. After each step the banks move towards the batch's
embeddings: M[i] <- normalise(nce_m * M[i] + (1 - nce_m) * v).

On several ranks each rank scores its own images; Z comes from the first global batch, and every
rank's banks take every rank's embeddings (all-gathered), so the banks stay identical on all ranks.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdexp import distributed
from kdexp.methods.base import DistillationMethod, Tap, classifier_input, fmt
from kdexp.methods.logit import check_temperature, kd_loss

EPS = 1e-7  # the reference's, inside both NCE logarithms


class CRD(DistillationMethod):
    name = "crd"
    grid = {"beta": "β"}
    needs_indices = True

    def __init__(self, beta: float = 0.8, ce_weight: float = 1.0, kd_weight: float = 0.0, T: float = 4.0,
                 feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5,
                 replace: bool = False):
        super().__init__()
        for key, value in (("beta", beta), ("ce_weight", ce_weight), ("kd_weight", kd_weight)):
            if not value >= 0:
                raise ValueError(f"method.{key}={fmt(value)} must be >= 0 (a loss weight)")
        for key, value in (("feat_dim", feat_dim), ("nce_k", nce_k)):
            if not value >= 1:
                raise ValueError(f"method.{key}={fmt(value)} must be >= 1")
        if not nce_t > 0:
            raise ValueError(f"method.nce_t={fmt(nce_t)} must be > 0 (the contrast's temperature)")
        if not 0 <= nce_m < 1:
            raise ValueError(f"method.nce_m={fmt(nce_m)} must be in [0, 1) (the memory banks' momentum; "
                             f"1 would never update them)")
        self.beta, self.ce_weight, self.kd_weight = float(beta), float(ce_weight), float(kd_weight)
        self.T = check_temperature(T)
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = int(feat_dim), int(nce_k), float(nce_t), float(nce_m)
        self.replace = bool(replace)

    def taps(self, network: nn.Module, role: str) -> dict[str, Tap]:
        return {"embedding": classifier_input(network)}

    def bind(self, student, teacher):
        self.embed_s = Embed(_embedding_dim(student), self.feat_dim)
        self.embed_t = Embed(_embedding_dim(teacher), self.feat_dim)

    def bind_training_set(self, labels: torch.Tensor) -> None:
        n, counts = len(labels), torch.bincount(labels)
        if (counts > 0).sum() < 2:
            raise ValueError("every training image has the same class: CRD draws its negatives from the "
                             "other classes' images, so it needs at least two classes")
        # The reference's initial banks: uniform in [-s, s], s = 1/sqrt(feat_dim/3) (unit expected norm).
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n, self.feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("memory_t", torch.rand(n, self.feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("z", torch.full((2,), -1.0))  # (Z of the student's scores, of the teacher's); < 0: unset
        # Derived from the labels, so not saved: the images sorted by class, each class's first
        # position there and its size (the sampler's class offsets).
        self.register_buffer("labels", labels.clone(), persistent=False)
        self.register_buffer("by_class", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)
        # np.random.choice in the reference's loader draws without replacement unless a class has fewer
        # other-class images than nce_k; which rows need which sampler is fixed by the labels.
        short = (n - counts[counts > 0]) < self.nce_k
        self._some_with_replacement = self.replace or bool(short.any())
        self._some_without = not self.replace and not bool(short.all())

    def forward(self, student, teacher, targets, indices):
        ce = self.cross_entropy(student.logits, targets)
        contrast = torch.cat([indices[:, None], self.negatives(targets)], dim=1)
        dtype = self.memory_s.dtype
        with _without_autocast(targets.device):  # in the banks' fp32, as the reference
            crd = self.contrast_loss(student.taps["embedding"].to(dtype), teacher.taps["embedding"].to(dtype),
                                     indices, contrast)
        parts = {"crd": crd}
        kd = self.beta * crd
        if self.kd_weight:
            parts["kl"] = kd_loss(student.logits, teacher.logits, self.T)
            kd = kd + self.kd_weight * parts["kl"]
        return {"loss": self.ce_weight * ce + kd, "ce": ce, "kd": kd, **parts}

    def contrast_loss(self, f_s: torch.Tensor, f_t: torch.Tensor, indices: torch.Tensor,
                      contrast: torch.Tensor) -> torch.Tensor:
        """L_crd for the batch's embeddings, scored against the banks' rows `contrast` (B, 1 + K:
        the positive, then the negatives); then the banks take the batch's embeddings."""
        v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)
        scores_s = contrast_scores(v_s, self.memory_t, contrast, self.nce_t)  # student anchor, teacher bank
        scores_t = contrast_scores(v_t, self.memory_s, contrast, self.nce_t)
        self._fix_z(scores_s.detach(), scores_t.detach())
        n = len(self.memory_s)
        loss = nce_loss(scores_s / self.z[0], n) + nce_loss(scores_t / self.z[1], n)
        self._update_memory(indices, v_s.detach(), v_t.detach())
        return loss

    def _fix_z(self, scores_s: torch.Tensor, scores_t: torch.Tensor) -> None:
        """Z = mean score * n from the first batch (over every rank's images), then fixed (also the Z
        last.pt brings). Estimated at every step and kept only while unset: no branch on the step, so
        a compiled step is one graph from the first batch on."""
        sums = torch.stack([scores_s.sum(), scores_t.sum(), scores_s.new_tensor(scores_s.numel())])
        total = distributed.gather_rows(sums[None]).sum(0)
        estimate = total[:2] / total[2] * len(self.memory_s)
        self.z.copy_(torch.where(self.z < 0, estimate, self.z))

    @torch.no_grad()
    def _update_memory(self, indices: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Every rank's batch into the banks, so that each rank's banks stay rank 0's."""
        rows = distributed.gather_rows(torch.cat([v_s, v_t], dim=1))
        indices = distributed.gather_rows(indices)
        momentum_update(self.memory_s, indices, rows[:, :self.feat_dim], self.nce_m)
        momentum_update(self.memory_t, indices, rows[:, self.feat_dim:], self.nce_m)

    def negatives(self, targets: torch.Tensor) -> torch.Tensor:
        """nce_k training-image indices per sample, uniform over the images of the other classes: a
        uniformly random nce_k-subset of them (no repeats) as the reference's np.random.choice draws
        when the class has at least nce_k other-class images and `replace` is off, else nce_k
        independent uniform draws. Torch's generator on the device: last.pt's RNG state resumes it."""
        if not self._some_without:
            return self._with_replacement(targets)
        without = self._without_replacement(targets)
        if not self._some_with_replacement:
            return without
        short = (len(self.labels) - self.class_count[targets]) < self.nce_k
        return torch.where(short[:, None], self._with_replacement(targets), without)

    def _without_replacement(self, targets: torch.Tensor) -> torch.Tensor:
        """The nce_k smallest of independent uniform keys, the sample's own class's keys pushed above
        every other (2 > any key): a uniformly random subset of the other classes' images."""
        keys = torch.rand(len(targets), len(self.labels), device=targets.device)
        keys = keys.masked_fill(self.labels[None, :] == targets[:, None], 2.0)
        return keys.topk(self.nce_k, dim=1, largest=False).indices

    def _with_replacement(self, targets: torch.Tensor) -> torch.Tensor:
        """u uniform over [0, n - n_c) maps one to one onto the other classes' positions in the
        class-sorted order (skip class c's block), so each draw is uniform over those images."""
        start, count = self.class_start[targets, None], self.class_count[targets, None]
        others = len(self.labels) - count
        u = (torch.rand(len(targets), self.nce_k, device=targets.device, dtype=torch.float64) * others).long()
        u = torch.minimum(u, others - 1)  # a product that rounded up to `others`
        return self.by_class[u + count * (u >= start)]

    @classmethod
    def variant(cls, cfg: Mapping[str, Any]) -> str | None:
        return "+kd" if cfg.get("kd_weight") else None


class Embed(nn.Module):
    """Linear to the contrast's dimension, then divided by its L2 norm (the reference's Embed)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.reshape(len(x), -1))
        return x / x.norm(dim=1, keepdim=True)


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off inside the block (a device it never runs on, such as meta, has none to turn off)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _embedding_dim(network: nn.Module) -> int:
    """The classifier's input width (the penultimate embedding `classifier_input` taps)."""
    return [m for m in network.modules() if isinstance(m, nn.Linear)][-1].in_features


def contrast_scores(anchor: torch.Tensor, bank: torch.Tensor, contrast: torch.Tensor, T: float) -> torch.Tensor:
    """exp(<bank[contrast[b, j]], anchor[b]> / T), (B, 1 + K), unnormalised; no gradient into the bank.
    Each anchor against the whole bank, then the contrast's columns picked: the reference's bmm over
    the gathered rows, without copying B x (1 + K) x feat_dim of them (1 GB a step at CIFAR-100's
    defaults); cheaper whenever n_train < (1 + K) * feat_dim (2.1 M at the defaults). The backward
    reads a copy of the bank: the step's update changes the bank in place before it."""
    return torch.exp((anchor @ bank.detach().clone().T).gather(1, contrast) / T)


def nce_loss(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """The reference's ContrastLoss: NCE with K negatives per positive (column 0) and noise Pn = 1/n."""
    noise = (scores.shape[1] - 1) / n_data  # K * Pn
    positive = (scores[:, 0] / (scores[:, 0] + noise + EPS)).log()
    negative = (noise / (scores[:, 1:] + noise + EPS)).log()
    return -(positive.sum() + negative.sum()) / len(scores)


def momentum_update(bank: torch.Tensor, indices: torch.Tensor, embeddings: torch.Tensor, momentum: float) -> None:
    """bank[i] <- normalise(momentum * bank[i] + (1 - momentum) * v), in place."""
    mixed = bank[indices] * momentum + embeddings * (1 - momentum)
    bank.index_copy_(0, indices, mixed / mixed.norm(dim=1, keepdim=True))
