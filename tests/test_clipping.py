"""The study's clipping bug, both ways: with clip_projection the clip covers student and projections
together; without, the projections are left out and the student is clipped alone."""
import torch

from kdexp.loop import build_optimizer, clip_gradients
from kdexp.methods import ModelOutputs
from kdexp.methods.feature import FeatureKD
from kdexp.models import build_model
from helpers import compose_cfg


def _setup(clip_projection: bool):
    torch.manual_seed(0)
    student, teacher = build_model("resnet18", width=4), build_model("resnet34", width=8).eval()
    method = FeatureKD(alpha=0.9, clip_projection=clip_projection)
    method.bind(student, teacher)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with torch.no_grad():
        t = ModelOutputs(*teacher(x, with_features=True))
    s = ModelOutputs(*student(x, with_features=True))
    method(s, t, y)["loss"].mul(100).backward()  # large gradients, so clipping is active
    optimizer = build_optimizer(student, method, compose_cfg().trainer)
    return student, method, optimizer


def _norm(params):
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()


def test_projections_are_trained_by_the_same_optimizer():
    student, method, optimizer = _setup(True)
    groups = optimizer.param_groups
    assert [g["name"] for g in groups] == ["student", "method"]
    assert all((g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.1, 0.9, True, 5e-4) for g in groups)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in method.projections.parameters()}


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
