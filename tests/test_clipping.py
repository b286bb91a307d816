"""The optimiser and the study's clipping bug, both ways: with clip_projection the clip covers student
and projections together; without, the projections are left out and the student is clipped alone."""
import pytest
import torch

from kdexp.loop import build_optimizer, clip_gradients
from kdexp.methods import ModelOutputs
from kdexp.methods.feature import FeatureKD
from kdexp.models import build_model
from helpers import compose_cfg


def _setup(clip_projection: bool, *overrides: str):
    torch.manual_seed(0)
    student, teacher = build_model("resnet18", width=4), build_model("resnet34", width=8).eval()
    method = FeatureKD(alpha=0.9, clip_projection=clip_projection)
    method.bind(student, teacher)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with torch.no_grad():
        t = ModelOutputs(*teacher(x, with_features=True))
    s = ModelOutputs(*student(x, with_features=True))
    method(s, t, y)["loss"].mul(100).backward()  # large gradients, so clipping is active
    cfg = compose_cfg(*overrides)
    optimizer = build_optimizer(student, method, cfg.optimizer, cfg.trainer.lr)
    return student, method, optimizer


def _norm(params):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()


def test_projections_are_trained_by_the_same_optimizer():
    student, method, optimizer = _setup(True)
    groups = optimizer.param_groups
    assert [g["name"] for g in groups] == ["student", "method"]
    assert all((g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.1, 0.9, True, 5e-4) for g in groups)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in method.projections.parameters()}


@pytest.mark.parametrize("overrides, kind, settings", [
    (["optimizer=adam", "trainer.lr=1e-4"], torch.optim.Adam,
     {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}),
    (["optimizer=adamw", "optimizer.betas=[0.8,0.99]"], torch.optim.AdamW,
     {"lr": 0.1, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.01}),
    (["optimizer.nesterov=false", "optimizer.momentum=0.5"], torch.optim.SGD,
     {"lr": 0.1, "momentum": 0.5, "nesterov": False, "weight_decay": 5e-4}),
])
def test_the_optimizer_group_picks_the_optimiser_and_its_settings(overrides, kind, settings):
    student, method, optimizer = _setup(True, *overrides)
    assert type(optimizer) is kind and [g["name"] for g in optimizer.param_groups] == ["student", "method"]
    for group in optimizer.param_groups:
        assert {key: group[key] for key in settings} == settings
    clip_gradients(optimizer, 1.0)
    optimizer.step()  # the clipped groups train with it


def test_clip_covers_student_and_projections_jointly():
    student, method, optimizer = _setup(True)
    before = _norm(list(student.parameters()) + list(method.parameters()))
    norm, proj_norm = clip_gradients(optimizer, 1.0)
    assert before > 1.0 and abs(norm.item() - before) < 1e-3 * before  # pre-clip joint norm
    assert _norm(list(student.parameters()) + list(method.parameters())) <= 1.0 + 1e-5
    assert proj_norm is not None and proj_norm.item() > 0


def test_bugged_mode_leaves_projection_gradients_untouched():
    student, method, optimizer = _setup(False)
    proj_grads = [p.grad.clone() for p in method.parameters()]
    student_before = _norm(list(student.parameters()))
    norm, proj_norm = clip_gradients(optimizer, 1.0)
    assert abs(norm.item() - student_before) < 1e-3 * student_before  # the norm is the student's alone
    assert _norm(list(student.parameters())) <= 1.0 + 1e-5
    assert all(torch.equal(a, p.grad) for a, p in zip(proj_grads, method.parameters()))
    assert proj_norm.item() > 1.0  # the projections' own norm, unclipped
