"""A missing or wrong teacher is always a hard error; a loaded teacher is frozen in eval mode."""
import pytest
import torch

from helpers import compose_cfg
from kdexp.checkpoint import save
from kdexp.models import build_model
from kdexp.teachers import FrozenTeacher, TeacherError, export_teacher, load_teacher, resolve_teacher_path


def _cfg(tmp_path, *extra):
    return compose_cfg("pair=r34_to_r18", "method=logit", "teacher.width=4", f"paths.output_dir={tmp_path}", *extra)


def test_missing_teacher_names_the_path_and_the_command(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(TeacherError) as err:
        load_teacher(cfg, torch.device("cpu"))
    msg = str(err.value)
    assert str(resolve_teacher_path(cfg)) in msg
    assert str(resolve_teacher_path(cfg)).endswith("teachers/cifar10_val5000_split1234/resnet34_cifar_w4_seed0.pt")
    assert "python -m kdexp.train experiment=teacher protocol=v2 model=resnet34 model.stem=cifar " \
           "model.width=4 seed=0" in msg


def test_exported_teacher_loads_frozen_and_in_eval_mode(tmp_path):
    cfg = _cfg(tmp_path)
    model = build_model("resnet34", width=4)
    export_teacher(model, resolve_teacher_path(cfg), 0, cfg.data, 0.5, "somewhere")
    teacher = load_teacher(cfg, torch.device("cpu"))
    assert isinstance(teacher, FrozenTeacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = torch.randn(4, 3, 32, 32)
    out = teacher(x)
    assert not out.requires_grad
    assert torch.equal(out, model.eval()(x))
    stats = teacher.model.bn1.running_mean.clone()
    teacher(torch.randn(8, 3, 32, 32) * 5)
    assert torch.equal(stats, teacher.model.bn1.running_mean)  # BN statistics never move


@pytest.mark.parametrize("built, complaint", [
    (dict(arch="resnet18", width=4), "arch: checkpoint has 'resnet18', config asks 'resnet34'"),
    (dict(arch="resnet34", width=8), "width: checkpoint has 8, config asks 4"),
    (dict(arch="resnet34", width=4, stem="imagenet"), "stem: checkpoint has 'imagenet', config asks 'cifar'"),
    (dict(arch="resnet34", width=4, num_classes=100), "num_classes: checkpoint has 100, config asks 10"),
])
def test_mismatched_teacher_is_a_clear_error(tmp_path, built, complaint):
    cfg = _cfg(tmp_path)
    export_teacher(build_model(**built), resolve_teacher_path(cfg), 0, cfg.data, 0.5, "x")
    with pytest.raises(TeacherError, match="does not match teacher config") as err:
        load_teacher(cfg, torch.device("cpu"))
    assert complaint in str(err.value)


def test_corrupt_teacher_checkpoint_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path)
    path = resolve_teacher_path(cfg)
    export_teacher(build_model("resnet34", width=4), path, 0, cfg.data, 0.5, "x")
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(TeacherError, match="corrupt"):
        load_teacher(cfg, torch.device("cpu"))


def test_plain_state_dict_of_the_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "foreign.pt"
    save(path, build_model("resnet18", width=4).state_dict())
    cfg = _cfg(tmp_path, f"teacher.ckpt={path}")
    with pytest.raises(TeacherError, match="does not fit teacher.arch=resnet34"):
        load_teacher(cfg, torch.device("cpu"))
