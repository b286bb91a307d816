"""method=reviewkd against mdistiller's ReviewKD: the ABF fusion, the hierarchical context loss, the
warm-up and the whole loss with its gradients on identical tensors and weights (the reference's
channels and shapes per benchmark pair from its configs and its authors' code), the tensors kdexp
reads from each network family (mdistiller's feats / preact_feats), the per-pair weights, the
refusals, and a run through the real entry point on generated CIFAR-100 that learns and resumes
to identical metrics."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from helpers import REPO, compose_cfg, run_train, without_timing
from kdexp.config import validate
from kdexp.methods import ModelOutputs
from kdexp.methods.reviewkd import ABF, ReviewKD, hcl_loss, review_levels
from kdexp.models import build_model, model_layout
from kdexp.records import read_metrics
from kdexp.taps import TapRecorder
from kdexp.teachers import FrozenTeacher

# --- the reference, transcribed ----------------------------------------------------------------------
# megvii-research/mdistiller @ a08d46f10d6102bd6e3f258ca5ac880b020ea259, mdistiller/distillers/ReviewKD.py:
# hcl_loss, ABF.forward and ReviewKD.forward_train (the review path and the loss), in its own terms.


def ref_hcl_loss(fstudent, fteacher):
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for l in [4, 2, 1]:
            if l >= h:
                continue
            tmpfs, tmpft = F.adaptive_avg_pool2d(fs, (l, l)), F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


def ref_abf_forward(abf, x, y=None, shape=None, out_shape=None):
    n, _, h, w = x.shape
    x = abf.conv1(x)
    if abf.att_conv is not None:
        y = F.interpolate(y, (shape, shape), mode="nearest")
        z = abf.att_conv(torch.cat([x, y], dim=1))
        x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
        x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
    y = abf.conv2(x)
    return y, x


def ref_abfs(in_channels, out_channels):
    """ReviewKD.__init__'s modules (mid_channel = min(512, in_channels[-1]), reversed)."""
    mid_channel = min(512, in_channels[-1])
    abfs = nn.ModuleList(ABF(c, mid_channel, out_channels[i], i < len(in_channels) - 1)
                         for i, c in enumerate(in_channels))
    return abfs[::-1]


def ref_forward_train(abfs, shapes, out_shapes, logits_student, features_student, features_teacher, target,
                      epoch, ce_weight, reviewkd_weight, warmup_epochs):
    x = features_student["feats"][1:] + [features_student["pooled_feat"].unsqueeze(-1).unsqueeze(-1)]
    x = x[::-1]
    results = []
    out_features, res_features = ref_abf_forward(abfs[0], x[0], out_shape=out_shapes[0])
    results.append(out_features)
    for features, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:]):
        out_features, res_features = ref_abf_forward(abf, features, res_features, shape, out_shape)
        results.insert(0, out_features)
    features_teacher = features_teacher["preact_feats"][1:] + [
        features_teacher["pooled_feat"].unsqueeze(-1).unsqueeze(-1)]
    loss_ce = ce_weight * F.cross_entropy(logits_student, target)
    loss_reviewkd = reviewkd_weight * min(epoch / warmup_epochs, 1.0) * ref_hcl_loss(results, features_teacher)
    return loss_ce + loss_reviewkd


# Each benchmark pair's REVIEWKD settings as the references give them: resnet32x4 -> resnet8x4 is
# mdistiller's engine/cfg.py CFG.REVIEWKD (its configs/cifar100/reviewkd.yaml sets only the weight); the
# others are the authors' build_review_kd (dvlab-research/ReviewKD @ cede6ea6387ae9b6127de0e561507177bf19c11e
# CIFAR-100/model/reviewkd.py; out_shapes None means shapes; its resnet shapes' fifth entry is never used).
# pair: (student, teacher, IN_CHANNELS, OUT_CHANNELS, SHAPES, OUT_SHAPES)
PAIRS = {
    "r32x4_to_r8x4": ("resnet8x4", "resnet32x4", [64, 128, 256, 256], [64, 128, 256, 256], [1, 8, 16, 32], [1, 8, 16, 32]),
    "r56_to_r20": ("resnet20", "resnet56", [16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32], [1, 8, 16, 32]),
    "r110_to_r32": ("resnet32", "resnet110", [16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32], [1, 8, 16, 32]),
    "wrn40_2_to_wrn16_2": ("wrn_16_2", "wrn_40_2", [32, 64, 128, 128], [32, 64, 128, 128], [1, 8, 16, 32], [1, 8, 16, 32]),
    "wrn40_2_to_wrn40_1": ("wrn_40_1", "wrn_40_2", [16, 32, 64, 64], [32, 64, 128, 128], [1, 8, 16, 32], [1, 8, 16, 32]),
    "vgg13_to_vgg8": ("vgg8", "vgg13", [128, 256, 512, 512, 512], [128, 256, 512, 512, 512], [1, 4, 4, 8, 16],
                      [1, 4, 4, 8, 16]),
    "vgg13_to_mobilenetv2": ("mobilenetv2", "vgg13", [12, 16, 48, 160, 1280], [128, 256, 512, 512, 512],
                             [1, 2, 4, 8, 16], [1, 4, 4, 8, 16]),
    "r32x4_to_shufflenetv2": ("shufflenetv2", "resnet32x4", [116, 232, 464, 1024], [64, 128, 256, 256],
                              [1, 4, 8, 16], [1, 8, 16, 32]),
}
# The authors' CIFAR-100/script/reviewKD.sh --kd-loss-weight (mdistiller configs/cifar100/reviewkd.yaml: 5.0 for
# resnet32x4 -> resnet8x4); none for the VGG13 pairs, which run at the method's default.
PUBLISHED_WEIGHTS = {"r56_to_r20": 0.6, "r110_to_r32": 1.0, "r32x4_to_r8x4": 5.0, "wrn40_2_to_wrn16_2": 5.0,
                     "wrn40_2_to_wrn40_1": 5.0, "r32x4_to_shufflenetv2": 8.0, "vgg13_to_vgg8": 5.0,
                     "vgg13_to_mobilenetv2": 5.0}


def _bound(student: str, teacher: str, **kwargs) -> ReviewKD:
    """The method bound to the published networks (their layout: no weights needed)."""
    method = ReviewKD(**kwargs)
    method.bind(model_layout(student, 100), model_layout(teacher, 100))
    return method


def _outputs(logits, levels, pooled) -> ModelOutputs:
    """ModelOutputs as the loop hands them over: the levels and the pooled embedding as taps."""
    return ModelOutputs(logits, taps={"pooled": pooled, **{f"level{i}": t for i, t in enumerate(levels)}})


def _random_levels(channels, shapes, batch=2):
    """Leaf tensors of a network's levels (shallowest first; the last channel count is the pooled one)."""
    maps = [torch.randn(batch, c, s, s, dtype=torch.float64, requires_grad=True)
            for c, s in zip(channels[:-1], shapes[::-1])]
    return maps, torch.randn(batch, channels[-1], dtype=torch.float64, requires_grad=True)


# --- golden tests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fuse, size, out_size", [(False, 1, 1), (True, 8, 8), (True, 4, 8), (True, 4, 4)])
def test_abf_matches_the_reference_forward_and_gradients(fuse, size, out_size):
    torch.manual_seed(0)
    abf = ABF(6, 5, 7, fuse).double()
    x = torch.randn(3, 6, size, size, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(3, 5, 2, 2, dtype=torch.float64, requires_grad=True) if fuse else None
    got = abf(x, residual, torch.Size([out_size, out_size]))
    want = ref_abf_forward(abf, x, residual, size, out_size)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    inputs = [x, *([residual] if fuse else []), *abf.parameters()]
    g_got = torch.autograd.grad(sum(t.square().sum() for t in got), inputs)
    g_want = torch.autograd.grad(sum(t.square().sum() for t in want), inputs)
    torch.testing.assert_close(g_got, g_want)


def test_abf_init_is_the_references():
    """Kaiming-uniform (a=1) 1x1 and 3x3 convs without bias, BN after each, and the attention conv (2
    channels, with bias, then a sigmoid) only where a level fuses a residual."""
    abf = ABF(16, 32, 8, fuse=True)
    for conv, fan_in in ((abf.conv1[0], 16), (abf.conv2[0], 32 * 9)):
        assert conv.bias is None and conv.weight.abs().max() <= (3 / fan_in) ** 0.5  # gain 1 at a=1
    assert isinstance(abf.conv1[1], nn.BatchNorm2d) and isinstance(abf.conv2[1], nn.BatchNorm2d)
    assert abf.att_conv[0].out_channels == 2 and abf.att_conv[0].bias is not None
    assert isinstance(abf.att_conv[1], nn.Sigmoid) and ABF(16, 32, 8, fuse=False).att_conv is None


def test_hcl_loss_matches_the_reference_value_and_gradients():
    """Levels of 32, 8, 4, 2 and 1 pixels: every branch of the pyramid (a 4-pixel map pools at 2 and 1
    with weights 1/2 and 1/4, as the reference's `cnt` halves only over the pools it takes)."""
    torch.manual_seed(1)
    sizes = [32, 8, 4, 2, 1]
    s = [torch.randn(2, 3, n, n, dtype=torch.float64, requires_grad=True) for n in sizes]
    t = [torch.randn(2, 3, n, n, dtype=torch.float64) for n in sizes]
    got, want = hcl_loss(s, t), ref_hcl_loss(s, t)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, s), torch.autograd.grad(want, s))
    a, b = s[2].detach(), t[2]  # the 4-pixel level by hand
    pooled = [F.mse_loss(F.adaptive_avg_pool2d(a, k), F.adaptive_avg_pool2d(b, k)) for k in (2, 1)]
    by_hand = (F.mse_loss(a, b) + pooled[0] / 2 + pooled[1] / 4) / 1.75
    torch.testing.assert_close(hcl_loss([a], [b]), by_hand)


@pytest.mark.parametrize("warmup", [20, 3, 1])
def test_warmup_weight_is_the_references(warmup):
    method = ReviewKD(warmup=warmup)
    for epoch in range(1, 26):
        method.start_epoch(epoch, 25)
        assert method.warmup_weight().item() == pytest.approx(min(epoch / warmup, 1.0), rel=1e-6)
    method = ReviewKD(warmup=0)
    method.start_epoch(1, 25)
    assert method.warmup_weight().item() == 1.0


def test_each_pairs_fusion_channels_are_the_references():
    """Derived from the published networks, the ABFs' channels are each pair's IN_CHANNELS ->
    OUT_CHANNELS, through min(512, IN_CHANNELS[-1]); deepest first, only the deepest without fusion."""
    for pair, (student, teacher, in_channels, out_channels, _, _) in PAIRS.items():
        with torch.device("meta"):  # the layout alone
            abfs = _bound(student, teacher).abfs
        mid = min(512, in_channels[-1])
        got = [(a.conv1[0].in_channels, a.conv1[0].out_channels, a.conv2[0].out_channels, a.att_conv is not None)
               for a in abfs]
        want = [(c, mid, out_channels[i], i < len(in_channels) - 1) for i, c in enumerate(in_channels)][::-1]
        assert got == want, pair


@pytest.mark.parametrize("pair", ["r32x4_to_r8x4", "r32x4_to_shufflenetv2", "vgg13_to_vgg8"])
def test_loss_and_gradients_match_the_reference(pair):
    """On identical tensors and weights (kdexp's copied into the reference's modules), loss and
    gradients agree for the features, the logits and every ABF parameter: the reference's SHAPES and
    OUT_SHAPES for the pair, kdexp's sizes from the tensors. The pairs: student and teacher levels of
    equal size; a student's smaller than the teacher's (the review resizes up); five levels with two
    of equal size. Channels of the networks at width 4 (the published ones: the test above)."""
    student, teacher, _, _, shapes, out_shapes = PAIRS[pair]
    torch.manual_seed(2)
    method = ReviewKD(kd_weight=0.6, ce_weight=0.7, warmup=20)
    method.bind(model_layout(student, 100, width=4), model_layout(teacher, 100, width=4))
    method.double()
    in_channels = [abf.conv1[0].in_channels for abf in reversed(method.abfs)]
    out_channels = [abf.conv2[0].out_channels for abf in reversed(method.abfs)]
    reference = ref_abfs(in_channels, out_channels).double()
    reference.load_state_dict(method.abfs.state_dict())
    s_maps, s_pooled = _random_levels(in_channels, shapes)
    t_maps, t_pooled = _random_levels(out_channels, out_shapes)
    logits = torch.randn(2, 100, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, 97])
    method.start_epoch(5, 240)
    got = method(_outputs(logits, s_maps, s_pooled), _outputs(None, t_maps, t_pooled), targets)
    # a VGG student's taps are its blocks' outputs, mdistiller's feats their ReLU
    feats = [F.relu(m) for m in s_maps] if method.activate_student else s_maps
    want = ref_forward_train(reference, shapes, out_shapes, logits,
                             {"feats": [None, *feats], "pooled_feat": s_pooled},
                             {"preact_feats": [None, *t_maps], "pooled_feat": t_pooled},
                             targets, 5, 0.7, 0.6, 20)
    torch.testing.assert_close(got["loss"], want)
    torch.testing.assert_close(got["loss"], 0.7 * got["ce"] + 0.6 * (5 / 20) * got["kd"])
    leaves = [*s_maps, s_pooled, logits]
    torch.testing.assert_close(torch.autograd.grad(got["loss"], [*leaves, *method.abfs.parameters()]),
                               torch.autograd.grad(want, [*leaves, *reference.parameters()]))


# --- which tensors: mdistiller's feats[1:] / preact_feats[1:] / pooled_feat, per family -----------------
# Each computed here from the network's own modules as mdistiller's models/cifar/*.py forward computes
# it (resnet.py, wrn.py, vgg.py, mobilenetv2.py, ShuffleNetv2.py; the torchvision ResNets as its
# resnetv2.py: the residual sum before the block's last ReLU), in eval mode (BN statistics untouched).

def _residual_sum(block, x):
    """A residual block's output before its final ReLU (mdistiller's `preact`)."""
    shortcut = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "conv3"):  # torchvision's Bottleneck
        out = block.relu(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out)) + shortcut
    return block.bn2(block.conv2(out)) + shortcut


def _resnet_preacts(net, x):
    stages = [getattr(net, name) for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(net, name)]
    x = net.relu(net.bn1(net.conv1(x)))
    x = net.maxpool(x) if hasattr(net, "maxpool") else x
    preacts = []
    for stage in stages:
        for block in stage[:-1]:
            x = block(x)
        preacts.append(_residual_sum(stage[-1], x))
        x = F.relu(preacts[-1])
    return preacts, torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _wrn_preacts(net, x):
    f1 = net.block1(net.conv1(x))
    f2 = net.block2(f1)
    f3 = net.block3(f2)
    pooled = F.avg_pool2d(net.relu(net.bn1(f3)), 8).reshape(len(x), -1)
    return [net.block2.layer[0].bn1(f1), net.block3.layer[0].bn1(f2), net.bn1(f3)], pooled


def _vgg_levels(net, x):
    """(feats[1:], preact_feats[1:], pooled_feat) at 32x32 (no pool before block4)."""
    x = F.relu(net.block0(x))
    feats, preacts = [], []
    for i, block in enumerate((net.block1, net.block2, net.block3, net.block4), start=1):
        x = block(net.pool(x) if i < 4 else x)
        preacts.append(x)
        x = F.relu(x)
        feats.append(x)
    return feats, preacts, net.avgpool(x).flatten(1)


def _pooled(net, f):
    """mdistiller's pooled_feat of the student-only families and the ResNets, from the last stage's output."""
    if hasattr(net, "linear"):  # ShuffleNetV2
        return F.avg_pool2d(F.relu(net.bn2(net.conv2(f))), 4).reshape(len(f), -1)
    if hasattr(net, "conv2"):  # MobileNetV2: AvgPool2d(2, ceil_mode) after the 1x1 conv
        return F.avg_pool2d(net.conv2(f), 2, ceil_mode=True).reshape(len(f), -1)
    return F.adaptive_avg_pool2d(f, 1).reshape(len(f), -1)  # the ResNets' (CIFAR's AvgPool2d(8) at 8x8)


def _levels(method, net, role, x):
    """The levels the method reviews (shallowest first, the pooled embedding last as a 1x1 map) from
    what the loop hands it: the taps, recorded as the loop records them."""
    recorder = TapRecorder(net, method.taps(net, role), role)
    with recorder.recording() as taps:
        net(x)
    activate = method.activate_student if role == "student" else False
    return review_levels(taps, len(taps), activate)


@pytest.mark.parametrize("arch, width", [("resnet32x4", 2), ("resnet56", 2), ("resnet18", 2), ("resnet50", 2),
                                         ("wrn_40_2", 2), ("vgg13", 2)])
def test_teacher_levels_are_mdistillers_preact_feats_and_pooled_feat(arch, width):
    torch.manual_seed(3)
    net = build_model(arch, 100, width=width).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        levels = _levels(ReviewKD(), net, "teacher", x)
        if arch == "vgg13":
            _, preacts, pooled = _vgg_levels(net, x)
        elif arch == "wrn_40_2":
            preacts, pooled = _wrn_preacts(net, x)
        else:
            preacts, pooled = _resnet_preacts(net, x)
    torch.testing.assert_close(levels, [*preacts, pooled[:, :, None, None]])
    assert all((preact < 0).any() for preact in preacts)  # before the ReLU indeed


@pytest.mark.parametrize("arch", ["resnet8x4", "resnet20", "wrn_16_2", "vgg8", "mobilenetv2", "shufflenetv2",
                                  "resnet18"])
def test_student_levels_are_mdistillers_feats_and_pooled_feat(arch):
    torch.manual_seed(4)
    net = build_model(arch, 100, width=2).eval()
    method = ReviewKD()
    teacher = {"vgg8": "vgg13", "mobilenetv2": "vgg13", "resnet18": "resnet34"}.get(arch, "resnet32x4")
    method.bind(net, model_layout(teacher, 100))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        levels = _levels(method, net, "student", x)
        if arch == "vgg8":
            feats, _, pooled = _vgg_levels(net, x)
        elif arch == "wrn_16_2":
            feats, pooled = net.stage_outputs(x), _wrn_preacts(net, x)[1]
        else:  # their feats[1:] are the stage outputs (each family's forward in kdexp.archs is mdistiller's)
            feats = net(x, with_features=True)[1]
            pooled = _pooled(net, feats[-1])
    torch.testing.assert_close(levels, [*feats, pooled[:, :, None, None]])


def test_the_networks_levels_have_the_references_sizes():
    """What each pair's networks hand over (width 2: sizes do not depend on it; the channels at the
    published widths: the fusion-channels test) lies at SHAPES for the student, OUT_SHAPES for the teacher."""
    x = torch.zeros(1, 3, 32, 32)
    for pair, (student, teacher, in_channels, _, shapes, out_shapes) in PAIRS.items():
        s_net, t_net = build_model(student, 100, width=2).eval(), build_model(teacher, 100, width=2).eval()
        method = ReviewKD()
        method.bind(s_net, t_net)
        with torch.no_grad():
            s_sizes = [level.shape[-1] for level in _levels(method, s_net, "student", x)]
            t_sizes = [level.shape[-1] for level in _levels(method, t_net, "teacher", x)]
        assert (s_sizes[::-1], t_sizes[::-1]) == (shapes[:len(in_channels)], out_shapes), pair


# --- configuration, identity, refusals ------------------------------------------------------------------

def test_each_benchmark_pair_has_its_published_weight():
    """conf/pair/tuned/<pair>_reviewkd.yaml where the authors published one, else the method's default."""
    default = OmegaConf.load(REPO / "conf" / "method" / "reviewkd.yaml").kd_weight
    for pair, weight in PUBLISHED_WEIGHTS.items():
        tuned = REPO / "conf" / "pair" / "tuned" / f"{pair}_reviewkd.yaml"
        assert (OmegaConf.load(tuned).kd_weight if tuned.exists() else default) == weight, pair


def test_a_pair_composes_with_its_tuned_weight_and_the_references_other_settings():
    cfg = compose_cfg("protocol=crd", "pair=r56_to_r20", "method=reviewkd")
    assert (cfg.method.kd_weight, cfg.method.ce_weight, cfg.method.warmup, cfg.method.max_mid_channel) == (0.6, 1.0, 20, 512)


@pytest.mark.parametrize("pair", ["r32x4_to_shufflenetv2", "vgg13_to_mobilenetv2"])
def test_cross_family_pairs_pass_config_validation(pair):
    """Their stages lie at other strides: the review resizes, so nothing refuses them."""
    assert validate(compose_cfg("protocol=crd", f"pair={pair}", "method=reviewkd")).name == "reviewkd"


def test_bind_reads_the_network_inside_a_frozen_teacher():
    method = ReviewKD()
    method.bind(model_layout("resnet20", 100), FrozenTeacher(build_model("resnet56", 100, width=2)))
    assert method.abfs[-1].conv2[0].out_channels == 2  # resnet56 at width 2: its first stage's channels


def test_identity_and_run_tag():
    cfg = {"_target_": "kdexp.methods.reviewkd.ReviewKD", "kd_weight": 0.6, "ce_weight": 1.0, "warmup": 20,
           "max_mid_channel": 512}
    assert ReviewKD.label(cfg) == "reviewkd" and ReviewKD.cell_label(cfg) == "λ=0.6"
    assert ReviewKD.run_tag(cfg) == "reviewkd_kd_weight0.6"
    assert not ReviewKD.can_use_teacher_cache()  # it reads the teacher's taps


def test_fusion_width_is_capped_by_max_mid_channel():
    """mid = min(max_mid_channel, the student's embedding channels): MobileNetV2's 1280 -> 512."""
    assert {abf.conv1[0].out_channels for abf in _bound("mobilenetv2", "vgg13").abfs} == {512}
    assert {abf.conv1[0].out_channels for abf in _bound("resnet20", "resnet56").abfs} == {64}
    assert {abf.conv1[0].out_channels for abf in _bound("mobilenetv2", "vgg13", max_mid_channel=64).abfs} == {64}


@pytest.mark.parametrize("teacher", ["mobilenetv2", "shufflenetv2"])
def test_a_teacher_without_mapped_preactivations_is_refused(teacher):
    with pytest.raises(ValueError, match=f"{teacher} teacher"):
        _bound("resnet8x4", teacher)


def test_networks_with_different_level_counts_are_refused():
    with pytest.raises(ValueError, match="vgg8 has 5.*resnet32x4 4"):
        _bound("vgg8", "resnet32x4")


@pytest.mark.parametrize("kwargs, key", [({"kd_weight": -1.0}, "method.kd_weight"), ({"ce_weight": -0.1}, "method.ce_weight"),
                                         ({"warmup": -1}, "method.warmup"), ({"max_mid_channel": 0}, "method.max_mid_channel")])
def test_bad_hyperparameters_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ReviewKD(**kwargs)


# --- end to end -----------------------------------------------------------------------------------------

# Generated CIFAR-100 as tests/test_cifar100_e2e.py sizes it (5000 training images), at the quickstart's
# recipe; resnet32x4 -> resnet8x4 (mdistiller's default pair) at width 4, the teacher trained 2 epochs.
DATA = ("protocol=quickstart", "data=fake_cifar100", "data.fake_train_size=5000", "data.fake_test_size=500",
        "data.val_size=500", "trainer.progress=false")
STUDENT = ("pair=r32x4_to_r8x4", "method=reviewkd", "model.width=4", "teacher.width=4")
# A few steps per epoch: for the resume, not for learning.
SHORT = ("method.warmup=3", "trainer.epochs=4", "trainer.max_steps_per_epoch=8")


@pytest.fixture(scope="module")
def teacher_paths(tmp_path_factory) -> tuple[str, str]:
    """A tiny resnet32x4 teacher on the generated data: the data and teachers dirs that find it."""
    root = tmp_path_factory.mktemp("reviewkd")
    paths = (f"paths.data_dir={root / 'data'}", f"paths.teachers_dir={root / 'teachers'}")
    teacher = run_train(*DATA, *paths, f"paths.output_dir={root / 'out'}", "experiment=teacher", "model=resnet32x4",
                        "model.width=4", "trainer.epochs=2")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    return paths


def _student_run(paths, out, *extra: str):
    proc = run_train(*DATA, *paths, f"paths.output_dir={out}", *STUDENT, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = out.rglob("result.json")
    return result.parent


@pytest.mark.e2e
def test_reviewkd_learns_above_chance_inside_its_warmup(teacher_paths, tmp_path):
    """The published recipe's first 3 epochs (warm-up 20: the review loss at 1/4, 1/2, 3/4 of its weight)
    from a 2-epoch teacher (2 % test accuracy): measured 5.8 % test accuracy; chance is 1 %. (With
    warm-up 2, the full weight of this poor teacher's features held the student at 2.6 %.)"""
    run_dir = _student_run(teacher_paths, tmp_path, "trainer.epochs=3")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["method"] == "reviewkd"
    assert "reviewkd_kd_weight5" in run_dir.parts
    assert result["test_acc_final"] > 0.02
    assert _kd_weights(run_dir) == pytest.approx([5 / 20, 10 / 20, 15 / 20], rel=1e-4)


@pytest.mark.e2e
def test_killed_reviewkd_run_resumes_to_identical_metrics(teacher_paths, tmp_path):
    """Killed inside the warm-up (3 epochs of 4): the ABFs, their BN statistics and their optimiser state
    come back from last.pt, and the loop sets the epoch again, so every epoch equals the uninterrupted run's."""
    from test_methods_e2e import run_until_killed
    uninterrupted = _student_run(teacher_paths, tmp_path / "whole", *SHORT)
    assert _kd_weights(uninterrupted) == pytest.approx([5 / 3, 10 / 3, 5, 5], rel=1e-4)
    args = (*DATA, *teacher_paths, f"paths.output_dir={tmp_path / 'killed'}", *STUDENT, *SHORT)
    killed = run_until_killed(args, tmp_path / "killed", epochs=2)
    resumed = run_train(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epoch = int(re.search(r"resuming .* after epoch (\d+)", resumed.stdout + resumed.stderr).group(1))
    assert 2 <= epoch < 4
    assert without_timing(read_metrics(killed)) == without_timing(read_metrics(uninterrupted))


def _kd_weights(run_dir) -> list[float]:
    """Each epoch's kd_weight * min(epoch / warmup, 1), from its mean loss parts (ce_weight 1)."""
    return [(r["loss"] - r["loss_ce"]) / r["loss_kd"] for r in read_metrics(run_dir)]
