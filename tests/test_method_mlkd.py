"""method=mlkd (Multi-Level Logit Distillation, Jin et al. CVPR 2023) and its strong view
(data.strong_view=randaugment) against transcriptions of the authors' code: every loss term, the
total and the gradients on identical logits of both views; the RandAugment operations, magnitudes and
Cutout on fixed images with fixed seeds; the two views the reference data path yields; the config
checks; and through the real entry point, a run that learns above chance and resumes exactly
(generated CIFAR-10) and one on generated CIFAR-100."""
import json
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torchvision import transforms

from helpers import compose_cfg, run_train, student_args, without_timing
from kdexp.config import ConfigError, validate
from kdexp.data.cifar import CIFAR100_LAYOUT
from kdexp.data.loaders import build_train_batches
from kdexp.data.strong_view import OPS, RandAugment, strong_augmentation
from kdexp.methods import ModelOutputs
from kdexp.methods.mlkd import MLKD, mask_fractions
from kdexp.records import read_metrics, read_result
from test_methods_e2e import run_until_killed

# --- The reference, transcribed: Jin-Ying/Multi-Level-Logit-Distillation at commit
# 5ee473fcf193dfb00a0598b64d0acfe6ad58a482, mdistiller/distillers/KD_ours.py (kd_loss, cc_loss,
# bc_loss, KD_ours.forward_train after the forward passes) and engine/trainer.py's AugTrainer (the
# loss minimised is the sum of losses_dict's values). Its repeated calls are written as loops over
# the temperatures; the order and every operation are the reference's.

def ref_kd_loss(logits_student, logits_teacher, temperature):
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * temperature**2


def ref_cc_loss(logits_student, logits_teacher, temperature):
    batch_size, class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student.transpose(1, 0), pred_student)
    teacher_matrix = torch.mm(pred_teacher.transpose(1, 0), pred_teacher)
    return ((teacher_matrix - student_matrix) ** 2).sum() / class_num


def ref_bc_loss(logits_student, logits_teacher, temperature):
    batch_size, class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student, pred_student.transpose(1, 0))
    teacher_matrix = torch.mm(pred_teacher, pred_teacher.transpose(1, 0))
    return ((teacher_matrix - student_matrix) ** 2).sum() / batch_size


def ref_losses_dict(s_weak, s_strong, t_weak, t_strong, target, temperature, ce_w, kd_w):
    pred_teacher_weak = F.softmax(t_weak.detach(), dim=1)
    confidence, _ = pred_teacher_weak.max(dim=1)
    conf_thresh = np.percentile(confidence.detach().cpu().numpy().flatten(), 50)
    mask = confidence.le(conf_thresh).bool()
    class_confidence = torch.sum(pred_teacher_weak, dim=0).detach()
    class_confidence_thresh = np.percentile(class_confidence.cpu().numpy().flatten(), 50)
    class_conf_mask = class_confidence.le(class_confidence_thresh).bool()
    temps = (temperature, 3.0, 5.0, 2.0, 6.0)
    loss_ce = ce_w * (F.cross_entropy(s_weak, target) + F.cross_entropy(s_strong, target))
    loss_kd_weak = sum(kd_w * ((ref_kd_loss(s_weak, t_weak, tau) * mask).mean()) for tau in temps)
    loss_kd_strong = sum(kd_w * ref_kd_loss(s_strong, t_strong, tau) for tau in temps[:3]) \
        + sum(kd_w * ref_kd_loss(s_weak, t_weak, tau) for tau in temps[3:])  # the weak logits, as there
    loss_cc_weak = sum(kd_w * ((ref_cc_loss(s_weak, t_weak, tau) * class_conf_mask).mean()) for tau in temps)
    loss_bc_weak = sum(kd_w * ((ref_bc_loss(s_weak, t_weak, tau) * mask).mean()) for tau in temps)
    # loss_cc_strong and loss_bc_strong are computed there but not put in the dict: not trained on.
    return {"loss_ce": loss_ce, "loss_kd": loss_kd_weak + loss_kd_strong, "loss_cc": loss_cc_weak,
            "loss_bc": loss_bc_weak}


def _views(batch, classes, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s_weak, s_strong = (3 * torch.randn(batch, classes, generator=g, dtype=dtype) for _ in range(2))
    t_weak, t_strong = (4 * torch.randn(batch, classes, generator=g, dtype=dtype) for _ in range(2))
    target = torch.randint(0, classes, (batch,), generator=g)
    return s_weak.requires_grad_(), s_strong.requires_grad_(), t_weak, t_strong, target


@pytest.mark.parametrize("batch, classes, T, ce_w, kd_w, seed", [
    (8, 10, 4.0, 0.1, 0.9, 0),     # the published CIFAR-100 setting; even batch: the median interpolates
    (7, 100, 4.0, 0.1, 0.9, 1),    # odd batch, CIFAR-100's classes: the median is a member
    (16, 5, 1.0, 0.5, 0.5, 2),     # the reference's ImageNet setting (T 1, weights 0.5 and 0.5)
    (5, 7, 3.0, 1.0, 2.0, 3),      # T equal to one of the fixed temperatures
    (6, 9, 2.0, 0.1, 0.9, 4),      # T=2: the configured term reads the strong view, the fixed 2 the weak one
])
def test_every_term_the_total_and_the_gradients_match_the_reference(batch, classes, T, ce_w, kd_w, seed):
    s_weak, s_strong, t_weak, t_strong, target = _views(batch, classes, seed)
    ref = ref_losses_dict(s_weak, s_strong, t_weak, t_strong, target, T, ce_w, kd_w)
    ref_total = sum(v.mean() for v in ref.values())
    ref_grads = torch.autograd.grad(ref_total, (s_weak, s_strong))

    method = MLKD(T=T, ce_weight=ce_w, kd_weight=kd_w)
    parts = method(ModelOutputs(s_weak, strong=ModelOutputs(s_strong)),
                   ModelOutputs(t_weak, strong=ModelOutputs(t_strong)), target)
    torch.testing.assert_close(parts["loss"], ref_total)
    torch.testing.assert_close(ce_w * parts["ce"], ref["loss_ce"])
    for key in ("kd", "cc", "bc"):
        torch.testing.assert_close(kd_w * parts[key], ref[f"loss_{key}"])
    for got, want in zip(torch.autograd.grad(parts["loss"], (s_weak, s_strong)), ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_fp32_logits_match_the_reference_in_fp32():
    """What a run computes (fp32 logits): the masks' medians by torch.quantile agree with numpy's."""
    for seed in range(20):
        s_weak, s_strong, t_weak, t_strong, target = _views(64, 100, seed, torch.float32)
        ref = sum(ref_losses_dict(s_weak, s_strong, t_weak, t_strong, target, 4.0, 0.1, 0.9).values())
        got = MLKD()(ModelOutputs(s_weak, strong=ModelOutputs(s_strong)),
                     ModelOutputs(t_weak, strong=ModelOutputs(t_strong)), target)["loss"]
        torch.testing.assert_close(got, ref)


def test_mask_fractions_with_ties_and_medians():
    """rho is the fraction at or below the median: half of an even batch of distinct values, one
    more than half of an odd one, all of a batch of ties (identical teacher rows)."""
    even = torch.tensor([[5.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.5, 0.0]])
    assert mask_fractions(even)[0].item() == 0.5
    odd = torch.tensor([[5.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    assert mask_fractions(odd)[0].item() == pytest.approx(2 / 3)
    assert mask_fractions(torch.zeros(6, 4)) == (1.0, 1.0)


def test_the_teacher_gets_no_gradient_and_the_strong_view_is_required():
    s_weak, s_strong, t_weak, t_strong, target = _views(4, 10, 0)
    t_weak.requires_grad_(), t_strong.requires_grad_()
    MLKD()(ModelOutputs(s_weak, strong=ModelOutputs(s_strong)),
           ModelOutputs(t_weak, strong=ModelOutputs(t_strong)), target)["loss"].backward()
    assert s_weak.grad is not None and s_strong.grad is not None
    assert t_weak.grad is None and t_strong.grad is None
    with pytest.raises(ValueError, match="data.strong_view=randaugment"):
        MLKD()(ModelOutputs(s_weak), ModelOutputs(t_weak), target)


@pytest.mark.parametrize("kwargs, key", [({"T": 0.0}, "method.T"), ({"ce_weight": -1.0}, "method.ce_weight"),
                                         ({"kd_weight": -0.1}, "method.kd_weight")])
def test_bad_hyperparameters_are_refused_by_name(kwargs, key):
    with pytest.raises(ValueError, match=key):
        MLKD(**kwargs)


def test_identity_reads_from_the_class():
    cfg = {"T": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    assert MLKD.label(cfg) == "mlkd" and MLKD.run_tag(cfg) == "mlkd_T4" and MLKD.cell_label(cfg) == "T=4"
    assert MLKD.needs_strong_view and not MLKD.can_use_teacher_cache()


# --- RandAugment, transcribed from the same commit's mdistiller/dataset/cifar100.py (augment_list,
# its operations, RandAugment.__call__, Cutout, CutoutAbs). Rotate's, the shears' and translations'
# commented-out sign coins are left out, as there.

def _ref_augment_list():
    affine = Image.AFFINE
    return [
        ("AutoContrast", lambda img, _: ImageOps.autocontrast(img), 0, 1),
        ("Brightness", lambda img, v: ImageEnhance.Brightness(img).enhance(v), 0.05, 0.95),
        ("Color", lambda img, v: ImageEnhance.Color(img).enhance(v), 0.05, 0.95),
        ("Contrast", lambda img, v: ImageEnhance.Contrast(img).enhance(v), 0.05, 0.95),
        ("Equalize", lambda img, _: ImageOps.equalize(img), 0, 1),
        ("Identity", lambda img, v: img, 0, 1),
        ("Posterize", lambda img, v: ImageOps.posterize(img, max(1, int(v))), 4, 8),
        ("Rotate", lambda img, v: img.rotate(v), -30, 30),
        ("Sharpness", lambda img, v: ImageEnhance.Sharpness(img).enhance(v), 0.05, 0.95),
        ("ShearX", lambda img, v: img.transform(img.size, affine, (1, v, 0, 0, 1, 0)), -0.3, 0.3),
        ("ShearY", lambda img, v: img.transform(img.size, affine, (1, 0, 0, v, 1, 0)), -0.3, 0.3),
        ("Solarize", lambda img, v: ImageOps.solarize(img, v), 0, 256),
        ("TranslateX", lambda img, v: img.transform(img.size, affine, (1, 0, v * img.size[0], 0, 1, 0)), -0.3, 0.3),
        ("TranslateY", lambda img, v: img.transform(img.size, affine, (1, 0, 0, 0, 1, v * img.size[1])), -0.3, 0.3),
    ]


def _ref_cutout(img, v):
    assert 0.0 <= v <= 0.5
    if v <= 0.:
        return img
    v = v * img.size[0]
    w, h = img.size
    x0 = np.random.uniform(w)
    y0 = np.random.uniform(h)
    x0 = int(max(0, x0 - v / 2.))
    y0 = int(max(0, y0 - v / 2.))
    x1 = min(w, x0 + v)
    y1 = min(h, y0 + v)
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), (125, 123, 114))
    return img


def _ref_randaugment(img, n=2):
    ops = random.choices(_ref_augment_list(), k=n)
    for _, op, min_val, max_val in ops:
        val = min_val + float(max_val - min_val) * random.random()
        img = op(img, val)
    return _ref_cutout(img, random.random() * 0.5)


def _image(seed, size=32):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_the_operations_and_their_magnitude_ranges_are_the_references():
    assert [(name, low, high) for name, _, low, high in OPS] == \
        [(name, low, high) for name, _, low, high in _ref_augment_list()]


@pytest.mark.parametrize("index", range(len(OPS)))
def test_each_operation_at_its_range_ends_and_middle_is_the_references(index):
    name, op, low, high = OPS[index]
    _, ref_op, _, _ = _ref_augment_list()[index]
    img = _image(index)
    for v in (low, (low + high) / 2, high - 1e-3, low + 0.37 * (high - low)):
        assert np.array_equal(np.asarray(op(img, v)), np.asarray(ref_op(img, v))), (name, v)


def test_randaugment_with_cutout_is_the_references_draw_for_draw():
    """Same Python and numpy seeds, same image: byte-identical strong views, over many draws (every
    operation is drawn), and both RNGs left in the same state."""
    augment = strong_augmentation("randaugment")
    assert isinstance(augment, RandAugment) and augment.n == 2
    for seed in range(60):
        img = _image(seed)
        random.seed(seed), np.random.seed(seed)
        want = np.asarray(_ref_randaugment(img))
        after = random.random(), np.random.random()
        random.seed(seed), np.random.seed(seed)
        got = np.asarray(augment(img))
        assert np.array_equal(got, want), seed
        assert (random.random(), np.random.random()) == after


def test_an_unknown_strong_view_is_refused_by_key():
    with pytest.raises(ValueError, match="data.strong_view"):
        strong_augmentation("autoaugment")


# --- The reference data path (data.loader=torch): both views, in the reference's transform order ----

def _ref_views(layout):
    """mdistiller/dataset/cifar100.py get_cifar100_train_transform_strong at the same commit
    (MultipleApply of the weak, then the strong transform), with kdexp's normalisation of the layout."""
    tail = [transforms.ToTensor(), transforms.Normalize(layout.mean, layout.std)]
    weak = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *tail])
    strong = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                 _ref_randaugment, *tail])
    return lambda img: [weak(img), strong(img)]


def _seed_all(seed):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def test_the_torch_loader_yields_the_references_two_views_of_each_image():
    """In the main process (num_workers=0) the views draw from the global RNGs, as the reference's
    transforms do: from the same seeds, every batch's weak and strong images equal the reference
    pipeline's for the images Batch.index names, drawn in the same order."""
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10)
    batches = build_train_batches("torch", images, labels, 4, seed=3, device=torch.device("cpu"),
                                  layout=CIFAR100_LAYOUT, strong_view="randaugment")
    _seed_all(5)
    got = list(batches.epoch(1))
    _seed_all(5)
    views = _ref_views(CIFAR100_LAYOUT)
    assert [len(b.y) for b in got] == [4, 4, 2]
    for batch in got:
        want = [views(Image.fromarray(images[i].permute(1, 2, 0).numpy())) for i in batch.index.tolist()]
        assert torch.equal(batch.y, labels[batch.index])
        assert torch.equal(batch.x, torch.stack([w for w, _ in want]))
        assert torch.equal(batch.x_strong, torch.stack([s for _, s in want]))
    plain = build_train_batches("torch", images, labels, 4, seed=3, device=torch.device("cpu"), layout=CIFAR100_LAYOUT)
    assert all(b.x_strong is None for b in plain.epoch(1))
    with pytest.raises(ValueError, match="data.loader=torch"):
        build_train_batches("tensor", images, labels, 4, seed=3, device=torch.device("cpu"), strong_view="randaugment")


# --- Config: the strong view and the method ask for each other -------------------------------------

@pytest.mark.parametrize("overrides, message", [  # method=mlkd sets both (conf/method/data/mlkd.yaml)
    (("method=mlkd", "data.strong_view=null", "data.loader=tensor"),
     "method=mlkd trains on a strongly augmented second view of each batch: set data.strong_view=randaugment "
     "data.loader=torch"),
    (("method=mlkd", "data.strong_view=null"), "set data.strong_view=randaugment$"),
    (("method=mlkd", "data.loader=tensor"), "data.loader=tensor does not run: set data.loader=torch"),
    (("method=mlkd", "data.strong_view=autoaugment"), "must be null or one of \\['randaugment'\\]"),
    (("method=logit", "data.strong_view=randaugment", "data.loader=torch"), "method=logit does not read"),
])
def test_config_refuses_a_missing_or_unread_strong_view_in_one_line(overrides, message):
    cfg = compose_cfg("protocol=quickstart", "teacher=resnet18", *overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_config_accepts_mlkd_with_its_strong_view():
    cfg = compose_cfg("protocol=quickstart", "teacher=resnet18", "method=mlkd")
    assert (cfg.data.strong_view, cfg.data.loader) == ("randaugment", "torch")
    assert isinstance(validate(cfg), MLKD)


# --- End to end: the real entry point, data.loader=torch with the strong view (method=mlkd sets both) --
# The quickstart's generated 10-class data and its session teacher (conftest's teacher_run), two
# epochs at width 4: MLKD learns there well above chance, which on generated CIFAR-100 at a size
# these tests can afford it does not measurably (a width-4 student: 1.8 % test after 3 epochs of 1800
# images, chance 1 %); CIFAR-100 is run for what differs there (100 classes, its layout), briefly.

def _mlkd_args(out, fake_root, teacher_run, *extra):
    return student_args(out, fake_root, "method=mlkd", "trainer.epochs=2",
                        f"paths.teachers_dir={teacher_run}/teachers", *extra)


@pytest.fixture(scope="module")
def mlkd_run(tmp_path_factory, teacher_run, fake_root):
    out = tmp_path_factory.mktemp("mlkd")
    proc = run_train(*_mlkd_args(out, fake_root, teacher_run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in out.rglob("result.json")]
    return run_dir


@pytest.mark.e2e
def test_mlkd_learns_above_chance_on_both_views_under_its_identity(mlkd_run):
    cfg = OmegaConf.load(mlkd_run / ".hydra" / "config.yaml")
    assert (cfg.data.strong_view, cfg.data.loader) == ("randaugment", "torch")
    assert "mlkd_T4" in mlkd_run.parts
    result = read_result(mlkd_run)
    assert result["status"] == "completed" and result["method"] == "mlkd"
    assert result["test_acc_final"] > 0.25 and result["best_val_acc"] > 0.25  # chance is 0.1
    for row in read_metrics(mlkd_run):  # epoch means of L = 0.1 * CE + 0.9 * (kd + cc + bc)
        distil = row["loss_kd"] + row["loss_cc"] + row["loss_bc"]
        assert row["loss"] == pytest.approx(0.1 * row["loss_ce"] + 0.9 * distil, rel=1e-4)


@pytest.mark.e2e
def test_killed_mlkd_run_resumes_to_identical_metrics(mlkd_run, tmp_path, teacher_run, fake_root):
    """Killed after epoch 1, the resumed run draws the same crops, flips and RandAugment operations
    (the main process's RNGs, restored from last.pt) and ends with the uninterrupted run's metrics."""
    args = _mlkd_args(tmp_path, fake_root, teacher_run)
    run_dir = run_until_killed(args, tmp_path, epochs=1)
    resumed = run_train(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resuming .* after epoch 1", resumed.stdout + resumed.stderr)
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(mlkd_run))


@pytest.mark.e2e
def test_mlkd_runs_on_generated_cifar100(tmp_path):
    """100 classes (the class-level term's 100 x 100 Gram matrices) in CIFAR-100's layout: a teacher
    and an MLKD student of two steps each, through the entry point."""
    common = ("protocol=quickstart", "data=fake_cifar100", "data.fake_train_size=200", "data.fake_test_size=500",
              "data.val_size=50", "trainer.epochs=1", "trainer.max_steps_per_epoch=2", "trainer.progress=false",
              f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}")
    teacher = run_train(*common, "experiment=teacher", "model.width=4")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    student = run_train(*common, "method=mlkd", "teacher=resnet18", "teacher.width=4", "model.width=4")
    assert student.returncode == 0, student.stderr[-3000:]
    results = {r["kind"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "out").rglob("result.json"))}
    assert results["student"]["status"] == "completed" and results["student"]["method"] == "mlkd"
    assert len(results["student"]["per_class_test_acc"]) == 100
