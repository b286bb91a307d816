"""Both loss formulas against values computed by hand."""
import math

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
