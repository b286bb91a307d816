"""Multi-Level Logit Distillation (Jin, Wang, Lin, CVPR 2023), as its authors' code trains it
(Jin-Ying/Multi-Level-Logit-Distillation: mdistiller/distillers/KD_ours.py with the AugTrainer,
which minimises the sum of the loss dict's entries).

Every step sees two views of the same images, each with its own crop and flip: weak (crop + flip)
and strong (+ RandAugment: data.strong_view=randaugment); student and teacher run on both. With z_s,
z_t the student's and teacher's logits of the weak (w) or strong (s) view, P = softmax(z / tau) and
tau over the temperatures (T, 3, 5, 2, 6):

    L  = ce_weight * (CE(z_s^w) + CE(z_s^s)) + kd_weight * (kd + cc + bc)
    kd = sum_tau  rho_i * KD_tau(w) + KD_tau(s if tau in (T, 3, 5) else w)     instance level
    cc = sum_tau  rho_c * ||P_t^T P_t - P_s^T P_s||_F^2 / C      (weak view)  class level, C x C
    bc = sum_tau  rho_i * ||P_t P_t^T - P_s P_s^T||_F^2 / B      (weak view)  batch level, B x B

KD_tau = tau^2 * KL(P_t || P_s), summed over classes and averaged over the batch. rho_i is the
fraction of the batch whose teacher confidence (its largest softmax probability at T=1, weak view) is
at most the batch's median (numpy's percentile 50, linear interpolation); rho_c the fraction of
classes whose teacher probability summed over the batch is at most the median over classes. Both
are constants of the step (about 1/2) and carry no gradient.

The reference's quirks, kept because they are what its published runs optimised:
- its masks were meant per sample (`reduce=False` is commented out): each term is reduced to a
  scalar before the mask multiplies it, so a mask selects nothing and only scales its term by rho;
- its strong-view KD at tau = 2 and 6 reads the weak view's logits (the weak view's KD at 2 and 6
  thus enters twice, once scaled by rho_i and once not);
- its strong-view class- and batch-level terms are computed but left out of the loss dict, so they
  are not trained on (and are not computed here); the batch-level term is scaled by the instance
  mask's rho_i, not the class mask's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdexp.methods.base import DistillationMethod, ModelOutputs, fmt
from kdexp.methods.logit import check_temperature, kd_loss

# The reference's terms in its order: (temperature, None for method.T; whether its strong branch reads
# the weak view's logits there). By position, not by value: at T=2 the first term reads the strong view.
TERMS = ((None, False), (3.0, False), (5.0, False), (2.0, True), (6.0, True))


class MLKD(DistillationMethod):
    name = "mlkd"
    grid = {"T": "T"}
    needs_strong_view = True

    def __init__(self, T: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9):
        super().__init__()
        self.T = check_temperature(T)
        for key, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
            if not value >= 0:
                raise ValueError(f"method.{key}={fmt(value)} must be >= 0")
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs,
                targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if student.strong is None or teacher.strong is None:
            raise ValueError("method=mlkd needs the strong view of each batch: set data.strong_view=randaugment "
                             "(with data.loader=torch)")
        ce = self.cross_entropy(student.logits, targets) + self.cross_entropy(student.strong.logits, targets)
        kd, cc, bc = mlkd_terms(_logit_pair(student, teacher), _logit_pair(student.strong, teacher.strong), self.T)
        loss = self.ce_weight * ce + self.kd_weight * (kd + cc + bc)
        return {"loss": loss, "ce": ce, "kd": kd, "cc": cc, "bc": bc}


LogitPair = tuple[torch.Tensor, torch.Tensor]  # (student, teacher) logits of one view


def _logit_pair(student: ModelOutputs, teacher: ModelOutputs) -> LogitPair:
    """Student and detached teacher logits in fp32 at least (bf16 under autocast would divide by
    tau and build the Gram matrices in bf16; fp64 stays fp64)."""
    dtype = torch.promote_types(student.logits.dtype, torch.float32)
    return student.logits.to(dtype), teacher.logits.detach().to(dtype)


def mlkd_terms(weak: LogitPair, strong: LogitPair, T: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kd, cc, bc) of the module docstring, each summed over the TERMS' temperatures."""
    s_weak, t_weak = weak
    rho_instance, rho_class = mask_fractions(t_weak)
    kd = cc = bc = s_weak.new_zeros(())
    for fixed, reads_weak in TERMS:
        tau = T if fixed is None else fixed
        kd = kd + rho_instance * kd_loss(s_weak, t_weak, tau) + kd_loss(*(weak if reads_weak else strong), tau)
        p_s, p_t = F.softmax(s_weak / tau, dim=1), F.softmax(t_weak / tau, dim=1)
        cc = cc + rho_class * gram_distance(p_s.T, p_t.T)
        bc = bc + rho_instance * gram_distance(p_s, p_t)
    return kd, cc, bc


def gram_distance(p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """||G_t - G_s||_F^2 / n for the n x n Gram matrices G = p p^T of the rows of p (rows: images
    for the batch level, classes for the class level, p transposed)."""
    g_s, g_t = p_student @ p_student.T, p_teacher @ p_teacher.T
    return (g_t - g_s).pow(2).sum() / p_student.shape[0]


def mask_fractions(teacher_weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho_i, rho_c): the fractions of images and of classes at or below their median teacher
    confidence (weak view, T=1), as the reference's percentile masks keep them."""
    probs = F.softmax(teacher_weak.detach(), dim=1)
    return _at_or_below_median(probs.max(dim=1).values), _at_or_below_median(probs.sum(dim=0))


def _at_or_below_median(values: torch.Tensor) -> torch.Tensor:
    # torch.quantile interpolates linearly as numpy's percentile does, without a host round trip
    return (values <= torch.quantile(values, 0.5)).float().mean()
