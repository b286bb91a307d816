"""Both loss formulas against values computed by hand."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from kdexp.methods import ModelOutputs
from kdexp.methods.ce import CrossEntropy
from kdexp.methods.feature import FeatureKD
from kdexp.methods.logit import LogitKD
from kdexp.models import build_model


def _softmax(z, T):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def test_logit_kd_matches_hand_computed_value():
    s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]])
    t = torch.tensor([[1.5, 1.0, -0.5], [0.2, 2.0, -1.0]])
    y = torch.tensor([0, 2])
    T, alpha = 3.0, 0.7
    kl = 0.0
    for zs, zt in zip(s.tolist(), t.tolist()):
        ps, pt = _softmax(zs, T), _softmax(zt, T)
        kl += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    kd = T * T * kl / 2  # summed over classes, averaged over the batch
    ce = -(math.log(_softmax(s[0].tolist(), 1)[0]) + math.log(_softmax(s[1].tolist(), 1)[2])) / 2
    parts = LogitKD(alpha=alpha, T=T)(ModelOutputs(s), ModelOutputs(t), y)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-5)


def test_logit_kd_alpha_zero_is_exactly_cross_entropy():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    loss = LogitKD(alpha=0.0, T=4.0)(ModelOutputs(s), ModelOutputs(t), y)["loss"]
    ce = CrossEntropy()(ModelOutputs(s), None, y)["loss"]
    assert torch.equal(loss, ce)
    assert torch.equal(loss, F.cross_entropy(s, y))


def test_logit_kd_gives_no_gradient_to_the_teacher():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    LogitKD(0.5, 4.0)(ModelOutputs(s), ModelOutputs(t), torch.zeros(4, dtype=torch.long))["loss"].backward()
    assert s.grad is not None and t.grad is None


def _feature_method(alpha=0.5, beta=0.5):
    student, teacher = build_model("resnet18", width=4), build_model("resnet50", width=4)
    method = FeatureKD(alpha=alpha, beta=beta)
    method.bind(student, teacher)
    return method, student, teacher


def test_feature_kd_projections_are_1x1_xavier_without_bias():
    method, student, teacher = _feature_method()
    assert len(method.projections) == 4
    for proj, c_s, c_t in zip(method.projections, student.stage_channels, teacher.stage_channels):
        assert proj.kernel_size == (1, 1) and proj.bias is None
        assert (proj.in_channels, proj.out_channels) == (c_s, c_t)
        bound = math.sqrt(6 / (c_s + c_t))  # Xavier-uniform
        assert proj.weight.abs().max() <= bound


def test_feature_kd_mse_and_cosine_parts_by_hand():
    torch.manual_seed(1)
    method, _, _ = _feature_method(alpha=0.3, beta=0.5)
    s_feats = [torch.randn(2, 4 * m, 32 // m, 32 // m) for m in (1, 2, 4, 8)]
    t_feats = [torch.randn(2, 16 * m, 32 // m, 32 // m) for m in (1, 2, 4, 8)]
    logits, y = torch.randn(2, 10), torch.tensor([1, 7])
    parts = method(ModelOutputs(logits, s_feats), ModelOutputs(torch.randn(2, 10), t_feats), y)
    mse, cos = [], []
    for proj, s, t in zip(method.projections, s_feats, t_feats):
        s_hat = torch.einsum("oi,bihw->bohw", proj.weight[:, :, 0, 0], s)
        mse.append(((s_hat - t) ** 2).mean().item())
        a, b = s_hat.mean((2, 3)), t.mean((2, 3))
        cos.append((1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item())
    mse_mean, cos_mean = sum(mse) / 4, sum(cos) / 4
    assert parts["mse"].item() == pytest.approx(mse_mean, rel=1e-4)
    assert parts["cos"].item() == pytest.approx(cos_mean, rel=1e-4)
    assert parts["kd"].item() == pytest.approx(mse_mean + 0.5 * cos_mean, rel=1e-4)
    ce = F.cross_entropy(logits, y).item()
    assert parts["loss"].item() == pytest.approx(0.3 * (mse_mean + 0.5 * cos_mean) + 0.7 * ce, rel=1e-4)


@pytest.mark.parametrize("kwargs, key", [({"alpha": 1.5}, "method.alpha"), ({"alpha": -0.1}, "method.alpha"),
                                         ({"T": 0.0}, "method.T"), ({"T": -2.0}, "method.T")])
def test_logit_kd_rejects_bad_hyperparameters(kwargs, key):
    with pytest.raises(ValueError, match=key):
        LogitKD(**{"alpha": 0.5, "T": 4.0, **kwargs})


def test_feature_kd_rejects_negative_beta():
    with pytest.raises(ValueError, match="method.beta"):
        FeatureKD(alpha=0.5, beta=-0.1)


# --- DKD, logit standardisation, DIST, label smoothing: golden values computed here by hand ---------

def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _dkd_by_hand(zs, zt, y, T):
    """TCKD, NCKD (T^2-scaled) and classical KD for one sample, from the paper's definitions."""
    ps, pt = _softmax(zs, T), _softmax(zt, T)
    tckd = _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    others = [i for i in range(len(zs)) if i != y]
    qs, qt = _softmax([zs[i] for i in others], T), _softmax([zt[i] for i in others], T)
    return T * T * tckd, T * T * _kl(qt, qs), T * T * _kl(pt, ps), pt[y]


DKD_S = [[2.0, 0.5, -1.0, 0.3], [0.0, 1.0, 0.3, -2.0], [-1.0, 3.0, 0.5, 0.5]]
DKD_T = [[4.0, 1.0, -0.5, 0.0], [0.2, 2.0, -1.0, 1.5], [2.0, 2.5, -3.0, 0.1]]
DKD_Y = [0, 2, 1]


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_dkd_terms_match_the_papers_definitions_and_recouple_into_classical_kd(T):
    """Per sample, TCKD + (1 - p_t^T) * NCKD equals classical KD's T^2 * KL at the same T, p_t^T the
    teacher's target probability at T (the DKD paper's decomposition)."""
    from kdexp.methods.dkd import dkd_terms
    from kdexp.methods.logit import kd_loss
    for zs, zt, y in zip(DKD_S, DKD_T, DKD_Y):
        tckd, nckd, kd, p_target = _dkd_by_hand(zs, zt, y, T)
        assert tckd + (1 - p_target) * nckd == pytest.approx(kd, rel=1e-9)  # the identity, by hand
        got_t, got_n = dkd_terms(torch.tensor([zs]), torch.tensor([zt]), torch.tensor([y]), T)
        assert (got_t.item(), got_n.item()) == (pytest.approx(tckd, rel=1e-5), pytest.approx(nckd, rel=1e-5))
        recoupled = got_t + (1 - p_target) * got_n
        assert recoupled.item() == pytest.approx(kd_loss(torch.tensor([zs]), torch.tensor([zt]), T).item(), rel=1e-5)


def test_dkd_loss_is_ce_plus_warmed_up_weighted_terms():
    from kdexp.methods.dkd import DKD
    s, t, y = torch.tensor(DKD_S), torch.tensor(DKD_T), torch.tensor(DKD_Y)
    hand = [_dkd_by_hand(zs, zt, yi, 4.0) for zs, zt, yi in zip(DKD_S, DKD_T, DKD_Y)]
    tckd, nckd = sum(h[0] for h in hand) / 3, sum(h[1] for h in hand) / 3
    ce = -sum(math.log(_softmax(zs, 1)[yi]) for zs, yi in zip(DKD_S, DKD_Y)) / 3
    method = DKD(alpha=0.5, beta=8.0, T=4.0, warmup=20)
    method.start_epoch(5, 100)
    parts = method(ModelOutputs(s), ModelOutputs(t), y)
    assert parts["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert parts["nckd"].item() == pytest.approx(nckd, rel=1e-5)
    assert parts["kd"].item() == pytest.approx(0.5 * tckd + 8 * nckd, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(ce + 5 / 20 * (0.5 * tckd + 8 * nckd), rel=1e-5)


@pytest.mark.parametrize("epoch, weight", [(0, 0.0), (10, 0.5), (20, 1.0), (30, 1.0)])
def test_dkd_warmup_weight_ramps_linearly_over_warmup_epochs(epoch, weight):
    """w = min(epoch / warmup, 1) with the 1-based epoch in progress (mdistiller's convention), read
    from the buffer the loop fills through start_epoch."""
    from kdexp.methods.dkd import DKD
    method = DKD(warmup=20)
    method.start_epoch(epoch, 30)
    parts = method(ModelOutputs(torch.tensor(DKD_S)), ModelOutputs(torch.tensor(DKD_T)), torch.tensor(DKD_Y))
    assert parts["kd"].item() > 0
    assert parts["loss"].item() == pytest.approx(parts["ce"].item() + weight * parts["kd"].item(), rel=1e-6)


def test_dkd_without_warmup_has_full_weight_from_the_first_epoch():
    from kdexp.methods.dkd import DKD
    method = DKD(warmup=0)
    method.start_epoch(1, 10)
    assert method.warmup_weight().item() == 1.0


def test_dkd_gradients_stay_finite_for_a_teacher_certain_beyond_float_range():
    """A target logit 200 above the rest at T=1: the masked target column must not turn into inf * 0."""
    from kdexp.methods.dkd import DKD
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.zeros(4, 10)
    y = torch.tensor([1, 2, 3, 4])
    t[torch.arange(4), y] = 200.0
    method = DKD(T=1.0, warmup=0)
    method(ModelOutputs(s), ModelOutputs(t), y)["loss"].backward()
    assert torch.isfinite(s.grad).all()


def test_standardized_logits_are_the_z_score_with_the_unbiased_std():
    import numpy as np
    from kdexp.methods.logit import standardized_logits
    z = np.array([[2.0, 0.5, -1.0, 0.3], [10.0, 11.0, 9.0, 10.5]])
    expected = (z - z.mean(1, keepdims=True)) / (z.std(1, ddof=1, keepdims=True) + 1e-7)
    np.testing.assert_allclose(standardized_logits(torch.tensor(z)).numpy(), expected, rtol=1e-12)


def _logit_methods(standardize):
    from kdexp.methods.dist import DIST
    from kdexp.methods.dkd import DKD
    dkd = DKD(warmup=0, standardize=standardize)
    return [LogitKD(alpha=0.5, T=2.0, standardize=standardize), dkd, DIST(standardize=standardize)]


def test_standardisation_makes_every_logit_method_invariant_to_each_rows_shift_and_scale():
    torch.manual_seed(3)
    s, t, y = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64), torch.randint(0, 10, (6,))
    shift, scale = torch.randn(6, 1, dtype=torch.float64) * 5, torch.rand(6, 1, dtype=torch.float64) * 4 + 0.5
    for standardize in (True, False):
        for method in _logit_methods(standardize):
            a = method(ModelOutputs(s), ModelOutputs(t), y)["kd"]
            b = method(ModelOutputs(s * scale + shift), ModelOutputs(t * scale.flip(0) - shift), y)["kd"]
            if standardize:
                assert b.item() == pytest.approx(a.item(), rel=1e-5), method.name
            else:  # the test would notice a standardisation that does nothing
                assert b.item() != pytest.approx(a.item(), rel=1e-3), method.name


def _pearson(a, b):
    import numpy as np
    return float(np.corrcoef(a, b)[0, 1])


def test_dist_of_identical_and_of_anticorrelated_predictions():
    """Identical predictions: both relations 0. y_s = 2/C - y_t (a softmax output too) correlates -1
    with y_t in every row and every column: each relation is 1 - (-1) = 2."""
    from kdexp.methods.dist import DIST
    y_t = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)
    y_s = 2 / 3 - y_t
    method = DIST(beta=1.0, gamma=3.0, T=1.0)
    same = method(ModelOutputs(y_t.log()), ModelOutputs(y_t.log()), torch.zeros(3, dtype=torch.long))
    assert same["inter"].item() == pytest.approx(0, abs=1e-6) and same["intra"].item() == pytest.approx(0, abs=1e-6)
    anti = method(ModelOutputs(y_s.log()), ModelOutputs(y_t.log()), torch.zeros(3, dtype=torch.long))
    assert anti["inter"].item() == pytest.approx(2.0, rel=1e-6) and anti["intra"].item() == pytest.approx(2.0, rel=1e-6)
    assert anti["kd"].item() == pytest.approx(1.0 * 2 + 3.0 * 2, rel=1e-6)


def test_dist_matches_pearson_correlations_computed_with_numpy():
    from kdexp.methods.dist import DIST
    torch.manual_seed(4)
    s, t, y = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64), torch.randint(0, 10, (5,))
    T = 4.0
    ys, yt = (s / T).softmax(1).numpy(), (t / T).softmax(1).numpy()
    inter = T * T * (1 - sum(_pearson(ys[i], yt[i]) for i in range(5)) / 5)
    intra = T * T * (1 - sum(_pearson(ys[:, c], yt[:, c]) for c in range(10)) / 10)
    parts = DIST(beta=2.0, gamma=0.5, T=T)(ModelOutputs(s), ModelOutputs(t), y)
    assert parts["inter"].item() == pytest.approx(inter, rel=1e-5)  # fp32: the losses' precision
    assert parts["intra"].item() == pytest.approx(intra, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(F.cross_entropy(s, y).item() + 2.0 * inter + 0.5 * intra, rel=1e-5)


def test_logit_kd_with_explicit_weights_is_kd_weight_times_kd_plus_ce_weight_times_ce():
    torch.manual_seed(5)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    parts = LogitKD(alpha=None, T=2.0, kd_weight=9.0, ce_weight=0.1)(ModelOutputs(s), ModelOutputs(t), y)
    assert parts["loss"].item() == pytest.approx(9 * parts["kd"].item() + 0.1 * parts["ce"].item(), rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"kd_weight": 9.0, "ce_weight": 0.1}, "method.alpha=0.5 and method.kd_weight/ce_weight both given"),
    ({"alpha": None, "kd_weight": 9.0}, "method.kd_weight needs method.ce_weight"),
    ({"alpha": None}, "method.alpha=null needs method.kd_weight and method.ce_weight"),
    ({"alpha": None, "kd_weight": -1.0, "ce_weight": 0.1}, "method.kd_weight=-1 must be >= 0")])
def test_logit_kd_takes_alpha_or_both_weights_never_a_mix(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LogitKD(**{"alpha": 0.5, "T": 4.0, **kwargs})


@pytest.mark.parametrize("name, kwargs, key", [("dkd", {"beta": -1.0}, "method.beta"), ("dkd", {"T": 0.0}, "method.T"),
                                               ("dkd", {"warmup": -1}, "method.warmup"),
                                               ("dist", {"gamma": -1.0}, "method.gamma"), ("dist", {"T": -1.0}, "method.T")])
def test_dkd_and_dist_reject_bad_hyperparameters(name, kwargs, key):
    from kdexp.methods.dist import DIST
    from kdexp.methods.dkd import DKD
    with pytest.raises(ValueError, match=key):
        {"dkd": DKD, "dist": DIST}[name](**kwargs)


def test_bf16_logits_are_distilled_in_fp32():
    """Under autocast the logits come in bf16; every logit method computes its loss in fp32."""
    torch.manual_seed(6)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    for method in _logit_methods(False):
        kd = method(ModelOutputs(s.bfloat16()), ModelOutputs(t.bfloat16()), y)["kd"]
        assert kd.dtype == torch.float32, method.name
        reference = method(ModelOutputs(s.bfloat16().float()), ModelOutputs(t.bfloat16().float()), y)["kd"]
        assert kd.item() == pytest.approx(reference.item(), rel=1e-6), method.name


@pytest.mark.parametrize("name", ["ce", "logit", "dkd", "dist"])
def test_label_smoothing_reaches_the_ce_term_of_every_logit_method(name):
    """trainer.label_smoothing (set by the job as method.label_smoothing): CE against (1 - eps) * one-hot
    + eps / C, by hand, and equal to torch's own label_smoothing."""
    from kdexp.methods.dist import DIST
    from kdexp.methods.dkd import DKD
    method = {"ce": CrossEntropy, "logit": LogitKD, "dkd": DKD, "dist": DIST}[name]()
    method.label_smoothing = 0.1
    s, t, y = torch.tensor(DKD_S), torch.tensor(DKD_T), torch.tensor(DKD_Y)
    by_hand = 0.0
    for zs, yi in zip(DKD_S, DKD_Y):
        p = _softmax(zs, 1)
        by_hand -= sum(((0.9 if k == yi else 0.0) + 0.1 / 4) * math.log(p[k]) for k in range(4)) / 3
    ce = method(ModelOutputs(s), ModelOutputs(t), y)["ce"]
    assert ce.item() == pytest.approx(by_hand, rel=1e-6)
    assert torch.equal(ce, F.cross_entropy(s, y, label_smoothing=0.1))
    assert ce.item() != pytest.approx(F.cross_entropy(s, y).item(), rel=1e-3)


def test_dkd_compiles_to_one_graph_whose_warmup_follows_the_epoch():
    """execution.compile: the warm-up reads the epoch buffer inside the graph, so one capture serves
    every epoch and each epoch's weight reaches the loss (a Python number would recompile)."""
    from torch._dynamo.utils import counters
    from kdexp.methods.dkd import DKD
    method = DKD(warmup=2, standardize=True)
    compiled = torch.compile(lambda s, t, y: method(ModelOutputs(s), ModelOutputs(t), y), backend="aot_eager",
                             dynamic=False)
    s, t, y = torch.tensor(DKD_S), torch.tensor(DKD_T), torch.tensor(DKD_Y)
    counters.clear()
    for epoch in range(1, 4):
        method.start_epoch(epoch, 3)
        parts = compiled(s, t, y)
        torch.testing.assert_close(parts["loss"], method(ModelOutputs(s), ModelOutputs(t), y)["loss"])
        assert parts["loss"].item() == pytest.approx(parts["ce"].item() + min(epoch / 2, 1) * parts["kd"].item(), rel=1e-6)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
