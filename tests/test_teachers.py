"""A missing or wrong teacher is always a hard error; a loaded teacher is frozen in eval mode; how a
teacher was trained (init, label smoothing, image size) is part of its identity."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import compose_cfg, counters_deleted_after_saving, saved_before_pytorch_0_4_1, without_a_conv_weight
from kdexp.checkpoint import load, save
from kdexp.config import build_method
from kdexp.data import Splits, data_identity
from kdexp.execution import Execution
from kdexp.job import build_loop
from kdexp.models import build_model, filled_on_load, state_dict_misfit
from kdexp.run_record import TeacherId
from kdexp.teachers import (FrozenTeacher, TeacherError, data_id, export_teacher, load_teacher,
                            resolve_teacher_export_path, resolve_teacher_path, train_command)

IMAGES = 50_000  # CIFAR-10's training set, before the val split


def _cfg(tmp_path, *extra):
    return compose_cfg("pair=r34_to_r18", "method=logit", "teacher.width=4", f"paths.output_dir={tmp_path}", *extra)


def _export(model, cfg, path=None, val_size=5000, split_seed=1234):
    """Export `model` as a teacher trained on CIFAR-10 with the given split (default: v2's)."""
    identity = data_identity("cifar10", IMAGES, val_size, split_seed)
    export_teacher(model, path or resolve_teacher_path(cfg), _identity_of(model, cfg), identity, 0.5, "somewhere")


def _identity_of(model, cfg, **how) -> TeacherId:
    """The identity of `model` trained with seed 0 on `cfg`'s data (`how`: its init, label smoothing)."""
    return TeacherId(arch=model.arch, stem=model.stem, width=model.width, seed=0, data=data_id(cfg.data),
                     image_size=cfg.data.image_size, **how)


def _load(cfg):
    return load_teacher(cfg, torch.device("cpu"), IMAGES)


def test_missing_teacher_names_the_path_and_the_command(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(TeacherError) as err:
        _load(cfg)
    msg = str(err.value)
    assert str(resolve_teacher_path(cfg)) in msg
    assert str(resolve_teacher_path(cfg)).endswith("teachers/cifar10_val5000_split1234/resnet34_cifar_w4_seed0.pt")
    # only what differs from the teacher preset's defaults (nothing that lands in the run dir's name)
    assert f"python -m kdexp.train experiment=teacher protocol=v2 model=resnet34 paths.output_dir={tmp_path} " \
           "model.width=4 (" in msg
    assert "\n" not in msg


def test_exported_teacher_loads_frozen_and_in_eval_mode(tmp_path):
    cfg = _cfg(tmp_path)
    model = build_model("resnet34", width=4)
    _export(model, cfg)
    teacher = _load(cfg)
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
    _export(build_model(**built), cfg)
    with pytest.raises(TeacherError, match="does not match teacher config") as err:
        _load(cfg)
    assert complaint in str(err.value)


def test_corrupt_teacher_checkpoint_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path)
    path = resolve_teacher_path(cfg)
    _export(build_model("resnet34", width=4), cfg)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(TeacherError, match="corrupt") as err:
        _load(cfg)
    assert "delete it" not in str(err.value)  # that is last.pt's advice; a teacher is re-exported
    assert "python -m kdexp.train experiment=teacher protocol=v2 model=resnet34 " in str(err.value)


def test_teacher_ckpt_naming_a_directory_says_so(tmp_path):
    cfg = _cfg(tmp_path, f"teacher.ckpt={tmp_path}")
    with pytest.raises(TeacherError) as err:
        _load(cfg)
    assert f"teacher.ckpt={tmp_path} is a directory" in str(err.value) and "not found" not in str(err.value)


def test_plain_state_dict_of_the_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "foreign.pt"
    save(path, build_model("resnet18", width=8).state_dict())
    cfg = _cfg(tmp_path, f"teacher.ckpt={path}")
    with pytest.raises(TeacherError, match="does not fit teacher.arch=resnet34") as err:
        _load(cfg)
    message = str(err.value)
    assert "\n" not in message and "Error(s) in loading state_dict" not in message
    # the first few; a BatchNorm the file lacks entirely is missing its weights and stats, not its counter,
    # which torch fills (kdexp.models.filled_on_load)
    assert "missing keys layer1.2.conv1.weight, " in message and "(+77 more)" in message
    assert "size mismatch (checkpoint vs model) conv1.weight (8, 3, 3, 3) vs (4, 3, 3, 3)" in message


def _publish(path, model, weights=None):
    """A checkpoint as the CIFAR-100 benchmark publishes its teachers (RepDistiller train_teacher.py,
    the files mdistiller downloads): torch.save of the reference module names under 'model'
    (`weights`: what the file holds of `model`'s, by default its state_dict)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 240, "model": model.state_dict() if weights is None else weights,
                "accuracy": torch.tensor(72.34), "optimizer": optimizer.state_dict()}, path)


def _load_published(tmp_path, path, pair="r56_to_r20"):
    cfg = compose_cfg("protocol=crd", f"pair={pair}", "method=logit", f"teacher.ckpt={path}",
                      f"paths.output_dir={tmp_path}")
    return load_teacher(cfg, torch.device("cpu"), IMAGES)


def test_a_published_benchmark_checkpoint_loads_strictly_through_teacher_ckpt(tmp_path):
    path = tmp_path / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    published = build_model("resnet56", num_classes=100)
    _publish(path, published)
    teacher = _load_published(tmp_path, path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(x), published.eval()(x))


@pytest.mark.parametrize("pair, num_classes, complaint", [
    ("r110_to_r32", 100, "does not fit teacher.arch=resnet110 stem=cifar width=16 num_classes=100: missing keys "
                         "layer1.9.conv1.weight"),
    ("r56_to_r20", 10, "size mismatch (checkpoint vs model) fc.weight (10, 64) vs (100, 64)"),
])
def test_a_published_checkpoint_of_another_network_is_refused_clearly(tmp_path, pair, num_classes, complaint):
    path = tmp_path / "ckpt_epoch_240.pth"
    _publish(path, build_model("resnet56", num_classes=num_classes))
    with pytest.raises(TeacherError) as err:
        _load_published(tmp_path, path, pair)
    assert complaint in str(err.value) and "\n" not in str(err.value)


def _saved_by_pytorch_0_4_0(model):
    """`model`'s weights as PyTorch 0.4.0 saved them: no BatchNorm `num_batches_tracked` (0.4.1 added
    it) and no module versions (a plain dict has no `_metadata`)."""
    return saved_before_pytorch_0_4_1(model.state_dict())


def _trained(model):
    """`model` in eval mode, its BatchNorm statistics and counters off their initial values as after training."""
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(93_750)
    return model.eval()


def test_a_published_checkpoint_saved_by_pytorch_0_4_0_loads_as_the_reference_code_loads_it(tmp_path):
    """RepDistiller's teachers were trained with PyTorch 0.4.0 (its README), which saved no BatchNorm
    `num_batches_tracked`. Its train_student.py `load_teacher` (HobbitLong/RepDistiller@7fd6effe)
    loads them strictly, `model.load_state_dict(torch.load(model_path)['model'])`, and torch fills
    the counters; kdexp loads them the same way: the same outputs, the counters at torch's 0."""
    published = _trained(build_model("resnet56", num_classes=100))
    path = tmp_path / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    _publish(path, published, _saved_by_pytorch_0_4_0(published))
    reference = build_model("resnet56", num_classes=100)
    reference.load_state_dict(torch.load(path)["model"])  # RepDistiller's load_teacher
    teacher = _load_published(tmp_path, path)
    x = torch.randn(2, 3, 32, 32)
    logits = teacher(x)
    assert torch.equal(logits, published(x)) and torch.equal(logits, reference.eval()(x))
    counters = [int(m.num_batches_tracked) for m in teacher.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(counters) == 57 and set(counters) == {0}  # stem, 2 per block x 27, 2 shortcuts


@pytest.mark.parametrize("weights, complaint", [
    (without_a_conv_weight, "num_classes=100: missing keys layer1.0.conv1.weight"),
    (counters_deleted_after_saving, "num_classes=100: missing keys bn1.num_batches_tracked, "
                                     "layer1.0.bn1.num_batches_tracked, layer1.0.bn2.num_batches_tracked (+54 more)"),
])
def test_a_published_checkpoint_the_reference_code_refuses_is_refused(tmp_path, weights, complaint):
    """Only the counters torch fills may be missing: a missing weight, or counters a file's module
    versions say it saved, fail RepDistiller's strict load and kdexp's, which says which keys."""
    model = build_model("resnet56", num_classes=100)
    path = tmp_path / "ckpt_epoch_240.pth"
    _publish(path, model, weights(model.state_dict()))
    with pytest.raises(RuntimeError, match="Missing key"):
        build_model("resnet56", num_classes=100).load_state_dict(torch.load(path)["model"])
    with pytest.raises(TeacherError) as err:
        _load_published(tmp_path, path)
    assert str(err.value).endswith(complaint) and "\n" not in str(err.value)


def test_only_a_batchnorms_missing_counter_is_filled():
    """A `num_batches_tracked` buffer of a module that is not a BatchNorm is not torch's to fill."""
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("num_batches_tracked", torch.tensor(3))

    model = nn.Sequential(Counting(), nn.BatchNorm2d(3))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert filled_on_load(model, state) == {"1.num_batches_tracked"}
    assert state_dict_misfit(model.state_dict(), state, filled_on_load(model, state)) == \
        "missing keys 0.num_batches_tracked"
    with pytest.raises(RuntimeError, match='Missing key.*"0.num_batches_tracked"'):
        model.load_state_dict(state)  # torch agrees


@pytest.mark.parametrize("val_size, split_seed, accepted", [(5000, 1234, True), (0, 1234, False), (5000, 7, False)])
def test_teacher_that_saw_the_students_validation_images_is_refused(tmp_path, val_size, split_seed, accepted):
    """A v2 student (5k val, split seed 1234) accepts only a teacher trained without its val images:
    not one trained on all 50k (v1), nor one whose split came from another seed."""
    cfg = _cfg(tmp_path)
    _export(build_model("resnet34", width=4), cfg, val_size=val_size, split_seed=split_seed)
    if accepted:
        _load(cfg)
        return
    with pytest.raises(TeacherError) as err:
        _load(cfg)
    message = str(err.value)
    assert str(resolve_teacher_path(cfg)) in message and "\n" not in message
    assert f"val_size={val_size}, split_seed={split_seed}" in message  # the teacher's data
    assert "of this run's 5000 validation images (cifar10 (50000 images, val_size=5000, split_seed=1234))" in message


def test_teacher_trained_on_another_dataset_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    model = build_model("resnet34", width=4)
    export_teacher(model, resolve_teacher_path(cfg), _identity_of(model, cfg), data_identity("fake", 2000, 200, 1234),
                   0.5, "x")
    with pytest.raises(TeacherError, match=r"was trained on fake \(2000 images"):
        _load(cfg)


def test_teacher_without_a_data_record_is_used_with_a_warning(tmp_path, caplog):
    """A plain state_dict (or a teacher exported before kdexp recorded its data) cannot be checked:
    it is accepted, and the log says what could not be checked."""
    path = tmp_path / "foreign.pt"
    save(path, build_model("resnet34", width=4).state_dict())
    with caplog.at_level("WARNING"):
        _load(_cfg(tmp_path, f"teacher.ckpt={path}"))
    assert "records no training data" in caplog.text


def test_how_a_teacher_was_trained_is_part_of_its_path():
    """An ImageNet-initialised or label-smoothed teacher, or one trained at another image size, never
    shares a file with the scratch, plain-CE, 32-pixel one (whose path is what it always was)."""
    scratch = resolve_teacher_path(_cfg("/out"))
    assert str(scratch) == "/out/teachers/cifar10_val5000_split1234/resnet34_cifar_w4_seed0.pt"
    other = resolve_teacher_path(_cfg("/out", "teacher.init=imagenet", "teacher.label_smoothing=0.1",
                                      "data.image_size=224"))
    assert str(other) == "/out/teachers/cifar10_224px_val5000_split1234/resnet34_cifar_w4_seed0_init-imagenet_ls0.1.pt"
    from_file = resolve_teacher_path(_cfg("/out", "teacher.init=/weights/r34_in1k.pth"))
    assert from_file.name == "resnet34_cifar_w4_seed0_init-r34_in1k.pt"


def test_a_teacher_run_exports_where_its_students_look():
    teacher_run = compose_cfg("experiment=teacher", "model=resnet34", "model.width=4", "model.init=/here/r34.pth",
                              "trainer.label_smoothing=0.1", "data.image_size=64", "paths.output_dir=/out")
    student = _cfg("/out", "teacher.init=/there/r34.pth", "teacher.label_smoothing=0.1", "data.image_size=64")
    assert resolve_teacher_export_path(teacher_run) == resolve_teacher_path(student)
    command = train_command(student)
    assert command.endswith("data.image_size=64 model.width=4 model.init=/there/r34.pth trainer.label_smoothing=0.1")
    assert compose_cfg(*command.split()[3:], "paths.output_dir=/out").model.init == "/there/r34.pth"


@pytest.mark.parametrize("asked, complaint", [
    ("teacher.init=imagenet", "init: checkpoint has None, config asks 'imagenet'"),
    ("teacher.label_smoothing=0.1", "label_smoothing: checkpoint has 0.0, config asks 0.1"),
    ("data.image_size=224", "image_size: checkpoint has 32, config asks 224"),
])
def test_a_teacher_trained_otherwise_than_asked_is_refused(tmp_path, asked, complaint):
    path = tmp_path / "teacher.pt"
    _export(build_model("resnet34", width=4), _cfg(tmp_path), path)
    with pytest.raises(TeacherError, match="does not match teacher config") as err:
        _load(_cfg(tmp_path, f"teacher.ckpt={path}", asked))
    assert complaint in str(err.value)


def test_a_teacher_records_how_it_was_trained(tmp_path):
    cfg = _cfg(tmp_path, "teacher.init=imagenet", "teacher.label_smoothing=0.1", "data.image_size=64")
    init = {"init": "imagenet", "file": "/hub/resnet34-b627a593.pth", "sha256": "b627a593" + "0" * 56}
    model = build_model("resnet34", width=4)
    export_teacher(model, resolve_teacher_path(cfg), _identity_of(model, cfg, init="imagenet", label_smoothing=0.1),
                   data_identity("cifar10", IMAGES, 5000, 1234), 0.5, "somewhere", init)
    state = load(resolve_teacher_path(cfg))
    assert (state["init"], state["init_sha256"], state["label_smoothing"], state["image_size"]) == \
        ("imagenet", init["sha256"], 0.1, 64)
    _load(cfg)  # and the student that asks for it gets it


def test_a_label_smoothed_teacher_run_trains_on_smoothed_targets(tmp_path):
    """trainer.label_smoothing reaches the CE the run minimises (the job sets it on the method)."""
    cfg = compose_cfg("experiment=teacher", "model.width=4", "trainer.label_smoothing=0.1", f"paths.output_dir={tmp_path}")
    images, labels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 10
    splits = Splits(images, labels, images[:0], labels[:0], images, labels)
    loop = build_loop(cfg, build_method(cfg.method), Execution(), splits, None, torch.device("cpu"), tmp_path)
    batch = next(loop.train.epoch(1))
    parts, logits = loop.losses(batch.x, batch.y, None)
    assert torch.equal(parts["ce"], F.cross_entropy(logits, batch.y, label_smoothing=0.1))
    assert not torch.equal(parts["ce"], F.cross_entropy(logits, batch.y))


def test_teachers_on_generated_cifar100_of_different_sizes_never_share_a_path(tmp_path):
    def path(*sizes):
        return resolve_teacher_path(compose_cfg("protocol=crd", "pair=vgg13_to_vgg8", "method=logit",
                                                "data=fake_cifar100", *sizes, f"paths.output_dir={tmp_path}"))
    small = path("data.fake_train_size=5000", "data.fake_test_size=500")
    assert str(small).endswith("teachers/fake_cifar100_5000x500_full/vgg13_cifar_w64_seed0.pt")
    assert small != path("data.fake_train_size=50000", "data.fake_test_size=500")
    fake = resolve_teacher_path(compose_cfg("data=fake", "data.fake_train_size=3000", "data.fake_test_size=1000",
                                            "pair=r34_to_r18", "method=logit", f"paths.output_dir={tmp_path}"))
    assert "/fake3000x1000_" in str(fake)  # data=fake's teachers stay where they were


def test_the_records_default_image_size_is_the_one_kdexp_trains_at():
    """kdexp.run_record reads files without torch, so it states CIFAR's size itself: the loaders' size."""
    from kdexp.data.loaders import SIZE
    from kdexp.run_record import UNRECORDED
    assert UNRECORDED["image_size"] == SIZE
