"""CTKD (method=ctkd) against the reference computation, transcribed from zhengli97/CTKD @
7d5252241259ae70d38a832371fed9697d15fc14 (models/temp_global.py: Global_T and the gradient-reversal
layer; train_student.py: CosineDecay and the per-epoch decay_value; helper/loops.py: the temperature
and the loss; distiller_zoo/KD.py: DistillKL), and its logit-standardised copy in
sunshangquan/logit-standardization-KD @ f6e5aa5172bad618e801163c3385322eea673754
(CTKD/distiller_zoo/KD.py: DistillKL_logit_stand). Then: one compiled graph for every epoch, an
exact resume with the temperature's parameter and optimiser state in last.pt, and the real entry
point learning the quickstart's generated data above chance."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch._dynamo.utils import counters

from helpers import compose_cfg, run_train, student_args, without_timing
from kdexp import checkpoint
from kdexp.execution import Execution
from kdexp.job import build_loop, seed_everything
from kdexp.methods import ModelOutputs
from kdexp.methods.ctkd import CTKD, reverse_gradient
from kdexp.models import build_model
from kdexp.records import read_metrics, read_result
from kdexp.teachers import FrozenTeacher

CPU = torch.device("cpu")


# --- the reference, transcribed (zhengli97/CTKD @ 7d5252241259ae70d38a832371fed9697d15fc14) ----------

class _RefGRL(torch.autograd.Function):
    """models/temp_global.py GradientReversalFunction: the sign lives in lambda_ (decay_value <= 0)."""

    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grads):
        return grads.new_tensor(ctx.lambda_) * grads, None


def _ref_decay_value(i, max_value=0.0, min_value=-1.0, num_loops=10):
    """train_student.py CosineDecay.get_value(epoch), the run script's --decay_max 0 --decay_min -1 --decay_loops 10."""
    i = min(max(i, 0), num_loops)
    return (math.cos(i * math.pi / num_loops) + 1.0) * 0.5 * (max_value - min_value) + min_value


def _ref_normalize(logit):
    """logit-standardization-KD CTKD/distiller_zoo/KD.py normalize."""
    return (logit - logit.mean(dim=-1, keepdims=True)) / (1e-7 + logit.std(dim=-1, keepdims=True))


def _ref_loss(logit_s, logit_t, target, global_t, decay_value, gamma=0.1, alpha=0.9, t_start=1.0, t_end=20.0,
              stand=False):
    """helper/loops.py train_distill (--distill kd, beta 0): temp from Global_T through the GRL, then
    gamma * CE + alpha * DistillKL(logit_s, logit_t, temp); DistillKL_logit_stand when `stand`."""
    temp = t_start + t_end * torch.sigmoid(_RefGRL.apply(global_t, decay_value))
    y_s, y_t = (_ref_normalize(logit_s), _ref_normalize(logit_t)) if stand else (logit_s, logit_t)
    loss_div = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(y_s / temp, dim=1),
                                                         F.softmax(y_t / temp, dim=1)) * temp * temp
    loss = gamma * F.cross_entropy(logit_s, target) + alpha * loss_div
    return loss[0], temp[0]  # the reference's are of shape (1,), Global_T's


# --- golden tests ---------------------------------------------------------------------------------

def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    torch.manual_seed(0)
    x, upstream, lam = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64), 0.37
    mine, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = reverse_gradient(mine, torch.tensor(lam, dtype=torch.float64))
    assert torch.equal(out, x)
    out.backward(upstream)
    _RefGRL.apply(ref, -lam).backward(upstream)  # kdexp's lambda is the reference's decay_value negated
    torch.testing.assert_close(mine.grad, ref.grad)
    torch.testing.assert_close(mine.grad, -lam * upstream)


def test_lambda_follows_the_references_cosine_curriculum():
    method = CTKD()
    got = []
    for epoch in range(0, 16):
        method.start_epoch(epoch, 240)
        got.append(method.grl_lambda().item())
    assert got == pytest.approx([-_ref_decay_value(e) for e in range(0, 16)], abs=1e-7)
    assert got[0] == 0.0 and got[10:] == [1.0] * 6
    # decay_value of epochs 1, 2, 5 in the logit-standardisation authors' CTKD log (logs/CTKD/ctkd,resnet56,resnet20,2,9.txt)
    assert [got[1], got[2], got[5]] == pytest.approx([0.02447174185242318, 0.09549150281252627, 0.5], abs=1e-7)


def test_lambda_schedule_with_other_ends_and_length():
    method = CTKD(lambda_start=0.2, lambda_end=0.7, lambda_epochs=4)
    for epoch in range(0, 7):
        method.start_epoch(epoch, 10)
        want = -_ref_decay_value(epoch, max_value=-0.2, min_value=-0.7, num_loops=4)
        assert method.grl_lambda().item() == pytest.approx(want, abs=1e-7)


def _logits(seed=0, n=6, k=10):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, k, generator=g), 3 * torch.randn(n, k, generator=g), torch.randint(0, k, (n,), generator=g)


def _compare(epoch, theta, standardize, dtype):
    """kdexp's loss parts and gradients, and the reference's (fp64), on the same logits and theta."""
    s, t, y = _logits(epoch)
    method = CTKD(standardize=standardize).to(dtype)
    method.start_epoch(epoch, 240)
    with torch.no_grad():
        method.theta.fill_(theta)
    mine_s = s.to(dtype, copy=True).requires_grad_()
    parts = method(ModelOutputs(mine_s), ModelOutputs(t.to(dtype)), y)
    parts["loss"].backward()
    ref_s, global_t = s.double().requires_grad_(), torch.full((1,), theta, dtype=torch.float64, requires_grad=True)
    ref_loss, temp = _ref_loss(ref_s, t.double(), y, global_t, _ref_decay_value(epoch), stand=standardize)
    ref_loss.backward()
    return (parts["loss"], parts["temperature"], mine_s.grad, method.theta.grad), (ref_loss, temp, ref_s.grad, global_t.grad)


CASES = [(1, 1.0, False), (7, -0.4, False), (12, 0.8, False), (3, 0.2, True), (8, -2.0, True)]  # (1, 1): the start


@pytest.mark.parametrize("epoch, theta, standardize", CASES)
def test_loss_and_gradients_equal_the_reference_in_fp64(monkeypatch, epoch, theta, standardize):
    """Loss, temperature, the student logits' gradient and theta's reversed gradient, to fp64 precision.
    distillation_logits casts logits to fp32 (for bf16 autocast); here that cast alone is left out, so
    the comparison is of the formula, not of rounding."""
    from kdexp.methods import ctkd
    from kdexp.methods.logit import standardized_logits

    def without_cast(student, teacher, standardize):
        s, t = student.logits, teacher.logits.detach()
        return (standardized_logits(s), standardized_logits(t)) if standardize else (s, t)

    monkeypatch.setattr(ctkd, "distillation_logits", without_cast)
    mine, ref = _compare(epoch, theta, standardize, torch.float64)
    for got, want in zip(mine, ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert mine[3].abs().item() > 1e-5  # lambda > 0 from epoch 1 on (0.024 there): theta is trained from the start


@pytest.mark.parametrize("epoch, theta, standardize", [(7, -0.4, False), (8, -2.0, True)])
def test_loss_and_gradients_equal_the_reference_as_trained_in_fp32(epoch, theta, standardize):
    """The method as the loop runs it (fp32 logits). theta's gradient is a difference of near-equal
    terms, so it is compared where it is well conditioned (T 9 and 3.4; at T 15, 5e-4 relative)."""
    mine, ref = _compare(epoch, theta, standardize, torch.float32)
    for got, want in zip(mine, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


def test_the_reversed_gradient_raises_the_kd_loss():
    """A small step along -grad (what the optimiser does) moves theta up the KD term: the adversary."""
    s, t, y = _logits(3)
    method = CTKD(alpha=1.0)
    method.start_epoch(10, 240)
    kd_before = method(ModelOutputs(s), ModelOutputs(t), y)
    kd_before["loss"].backward()
    with torch.no_grad():
        method.theta -= 0.01 * method.theta.grad
    assert method(ModelOutputs(s), ModelOutputs(t), y)["kd"] > kd_before["kd"]


def test_explicit_weights_replace_alpha():
    s, t, y = _logits(4)
    method = CTKD(alpha=None, kd_weight=9.0, ce_weight=0.1)
    method.start_epoch(2, 240)
    parts = method(ModelOutputs(s), ModelOutputs(t), y)
    ref_loss, _ = _ref_loss(s.double(), t.double(), y, torch.ones(1, dtype=torch.float64), _ref_decay_value(2),
                            gamma=0.1, alpha=9.0)
    torch.testing.assert_close(parts["loss"].double(), ref_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, key", [({"t_min": 0.0}, "method.t_min"), ({"t_range": -1.0}, "method.t_range"),
                                         ({"lambda_epochs": 0}, "method.lambda_epochs"),
                                         ({"alpha": 1.5}, "method.alpha"),
                                         ({"kd_weight": 9.0, "ce_weight": 0.1}, "method.alpha=0.9")])
def test_rejects_bad_hyperparameters(kwargs, key):
    with pytest.raises(ValueError, match=key):
        CTKD(**kwargs)


def test_identity_tag_label_and_cell():
    cfg = OmegaConf.to_container(compose_cfg("protocol=quickstart", "method=ctkd").method)
    assert (CTKD.run_tag(cfg), CTKD.label(cfg), CTKD.cell_label(cfg)) == ("ctkd_a0.9", "ctkd", "α=0.9")
    std = {**cfg, "standardize": True, "alpha": None, "kd_weight": 9.0, "ce_weight": 0.1}
    assert CTKD.label(std) == "ctkd(std)" and CTKD.cell_label(std) == "kd=9, ce=0.1"
    assert CTKD.run_tag(std) == "ctkd_anull_standardize-true_kd_weight-9_ce_weight-0.1"


def test_reading_the_epoch_compiles_one_graph_for_every_epoch():
    """lambda comes from the epoch buffer through the custom backward: captured once, right every epoch."""
    method = CTKD(lambda_epochs=3)
    eager = copy.deepcopy(method)

    def theta_grad(m, fn):
        m.theta.grad = None
        fn(s, t, y)["loss"].backward()
        return m.theta.grad.clone()

    compiled = torch.compile(lambda s, t, y: method(ModelOutputs(s), ModelOutputs(t), y), backend="aot_eager",
                             dynamic=False)
    s, t, y = _logits(5)
    counters.clear()
    graphs = []
    for epoch in range(1, 5):
        method.start_epoch(epoch, 4)
        eager.start_epoch(epoch, 4)
        grad = theta_grad(method, compiled)
        torch.testing.assert_close(grad, theta_grad(eager, lambda s, t, y: eager(ModelOutputs(s), ModelOutputs(t), y)))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 1, 1]


# --- training: resume and the real entry point ------------------------------------------------------

class _Interrupt(Exception):
    pass


class _StopsAtEpoch2(CTKD):
    """Ends the run when epoch 2 starts (epoch 1 is checkpointed)."""

    def forward(self, student, teacher, targets):
        if self.epoch.item() == 2:
            raise _Interrupt
        return super().forward(student, teacher, targets)


def _loop(run_dir, splits, method):
    cfg = compose_cfg("protocol=quickstart", "model.width=4", "teacher=resnet18", "teacher.width=4", "method=ctkd",
                      "trainer.epochs=3", "trainer.max_steps_per_epoch=2", "trainer.batch_size=32", "data.eval_batch_size=64",
                      "trainer.progress=false")
    execution = Execution.resolve(cfg.execution, CPU, method, cfg.data.loader)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    torch.manual_seed(1)
    return build_loop(cfg, method, execution, splits, FrozenTeacher(build_model("resnet18", width=4)), CPU, run_dir)


@pytest.mark.e2e
def test_an_interrupted_run_resumes_exactly_with_the_temperature_and_its_momentum(tmp_path, splits):
    straight = _loop(tmp_path / "straight", splits, CTKD(lambda_epochs=3))
    rows = straight.fit().history
    assert [r["loss_lambda"] for r in rows] == pytest.approx([0.25, 0.75, 1.0])
    assert len({round(r["loss_temperature"], 4) for r in rows}) == 3  # the temperature is learned
    with pytest.raises(_Interrupt):
        _loop(tmp_path / "resumed", splits, _StopsAtEpoch2(lambda_epochs=3)).fit()
    saved = checkpoint.load(tmp_path / "resumed" / checkpoint.LAST, map_location=CPU)
    method_group = next(g for g in saved["optimizer"]["param_groups"] if g["name"] == "method")
    (theta_id,) = method_group["params"]
    assert saved["method"]["theta"].item() != 1.0  # trained in epoch 1
    assert saved["optimizer"]["state"][theta_id]["momentum_buffer"].shape == (1,)
    resumed = _loop(tmp_path / "resumed", splits, CTKD(lambda_epochs=3))
    assert resumed.resume() and resumed.state.epoch == 1
    assert resumed.method.theta.item() == saved["method"]["theta"].item()
    assert without_timing(resumed.fit().history) == without_timing(rows)
    assert torch.equal(resumed.method.theta, straight.method.theta)


@pytest.mark.e2e
def test_ctkd_learns_above_chance_through_the_entry_point(tmp_path, teacher_run, fake_root):
    """The quickstart's generated data and shared tiny teacher (tests/conftest.py), 3 epochs at width
    4, lambda ramping over them: the run's identity, its metrics and above-chance accuracy."""
    proc = run_train(*student_args(tmp_path, fake_root, "method=ctkd", "method.lambda_epochs=3",
                                   f"paths.teachers_dir={teacher_run}/teachers"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in tmp_path.rglob("result.json")]
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert get_class(cfg.method._target_) is CTKD and "ctkd_a0.9_lambda_epochs-3" in run_dir.parts
    result = read_result(run_dir)
    assert result["status"] == "completed" and result["method"] == "ctkd"
    assert result["test_acc_final"] > 0.25 and result["best_val_acc"] > 0.25  # chance is 0.1
    rows = read_metrics(run_dir)
    assert [r["loss_lambda"] for r in rows] == pytest.approx([0.25, 0.75, 1.0])
    assert {"loss_ce", "loss_kd", "loss_temperature"} <= set(rows[-1])
    assert all(1.0 < r["loss_temperature"] < 21.0 for r in rows)
