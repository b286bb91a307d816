"""The KD literature's CIFAR networks are the CRD benchmark's, layer for layer.

Reference: HobbitLong/RepDistiller models/ at b84f547 (megvii-research/mdistiller
mdistiller/models/cifar/ at a08d46f builds the same modules under the same names). Every figure
below was computed by instantiating that reference code with num_classes=100 in a scratch
directory outside this repository (never committed): parameter counts, a digest of its
state_dict's (name, shape) list in order, and its outputs for the deterministic weights and input
defined here. The counts agree with the published tables (CRD paper, mdistiller README):
resnet32x4 7.43 M, resnet8x4 1.23 M, wrn_40_2 2.25 M, wrn_16_2 0.70 M, resnet56 0.86 M, resnet20 0.28 M.
"""
import hashlib
import math

import pytest
import torch

from helpers import TINY, compose_cfg, run_train
from kdexp.config import validate
from kdexp.methods import ModelOutputs
from kdexp.methods.feature import FeatureKD
from kdexp.models import ARCHS, build_model, count_parameters, model_layout
from kdexp.records import read_result

# arch -> (parameters at 100 classes, state_dict layout digest, logits[0, :3] and mean |stage output|
# for `deterministic_state` and `fixed_input` in train mode); the reference's name in brackets.
REFERENCE = {
    "resnet8x4": (1233540, "6a4fa0192e114da1", [0.50464, 0.67474, 0.69017], [0.60578, 0.58239, 0.59147]),
    "resnet32x4": (7433860, "250044a29347a41f", [2.69621, -2.20597, 2.80241], [1.49207, 1.47174, 1.47084]),
    "resnet20": (278324, "6f54e389c35c868d", [-0.21064, 0.39048, -0.3159], [1.11385, 1.06495, 1.0778]),
    "resnet32": (472756, "9a7e2a11fa94d25d", [0.6037, -0.55705, -3.01805], [1.51799, 1.43344, 1.46716]),
    "resnet56": (861620, "470885c26e17ebe6", [-0.0074, 5.13278, -0.27093], [2.12168, 2.07639, 2.09349]),
    "resnet110": (1736564, "7e524b233505177c", [-3.46402, 3.63085, -0.47634], [3.14278, 3.0102, 3.07444]),
    "wrn_40_2": (2255156, "adf0a10c7eadca8a", [0.18434, -0.21402, 0.23516], [1.49548, 1.49294, 1.47023]),
    "wrn_16_2": (703284, "264bf5a3785965a8", [-0.07382, -0.04936, -0.02262], [1.01483, 1.00766, 0.95871]),
    "wrn_40_1": (569780, "0aa607a5c1b6aa96", [0.23737, 0.86241, -0.24074], [1.59675, 1.46749, 1.44467]),
    "vgg13": (9462180, "af06ff07f75e9ea5", [-0.09068, -0.66477, -0.69994],  # [vgg13_bn]
              [0.41273, 0.41978, 0.41925, 0.42559, 0.42135]),
    "vgg8": (3965028, "bff82c0f138a715f", [0.60581, 0.79252, -0.1975],  # [vgg8_bn]
             [0.41079, 0.42242, 0.42244, 0.42643, 0.42485]),
    "mobilenetv2": (812836, "cf2fc083e7ae4429", [-0.78841, -0.21096, 0.36573],  # [mobile_half]
                    [1.15422, 1.48119, 1.46675, 0.87831]),
    "shufflenetv2": (1355528, "8f44a58a43a938d7", [0.64474, 0.11715, -0.29385],  # [ShuffleV2]
                     [0.41329, 0.41677, 0.41756]),
}
CIFAR_ARCHS = list(REFERENCE)


def _module(prefix: str, kind: str) -> list[str]:
    suffixes = {"conv": ["weight"], "conv+bias": ["weight", "bias"], "linear": ["weight", "bias"],
                "bn": ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]}[kind]
    return [f"{prefix}.{s}" for s in suffixes]


def _resnet_block(prefix: str, downsample: bool) -> list[str]:
    keys = _module(f"{prefix}.conv1", "conv") + _module(f"{prefix}.bn1", "bn")
    keys += _module(f"{prefix}.conv2", "conv") + _module(f"{prefix}.bn2", "bn")
    return keys + (_module(f"{prefix}.downsample.0", "conv") + _module(f"{prefix}.downsample.1", "bn")
                   if downsample else [])


def _wrn_block(prefix: str, shortcut: bool) -> list[str]:
    keys = _module(f"{prefix}.bn1", "bn") + _module(f"{prefix}.conv1", "conv")
    keys += _module(f"{prefix}.bn2", "bn") + _module(f"{prefix}.conv2", "conv")
    return keys + (_module(f"{prefix}.convShortcut", "conv") if shortcut else [])


# The reference's state_dict keys, written from reading its code (resnet.py: `ResNet`, `BasicBlock`,
# `downsample = Sequential(conv, BN)` whenever the shape changes; wrn.py: `NetworkBlock.layer`,
# `convShortcut` when in != out; vgg.py: `_make_layers` = [conv(bias), BN, ReLU]... minus the last ReLU).
REFERENCE_KEYS = {
    "resnet8x4": _module("conv1", "conv") + _module("bn1", "bn")
    + [k for i in (1, 2, 3) for k in _resnet_block(f"layer{i}.0", downsample=True)] + _module("fc", "linear"),
    "wrn_16_2": _module("conv1", "conv")
    + [k for i in (1, 2, 3) for j in (0, 1) for k in _wrn_block(f"block{i}.layer.{j}", shortcut=j == 0)]
    + _module("bn1", "bn") + _module("fc", "linear"),
    "vgg8": [k for i in range(5) for k in _module(f"block{i}.0", "conv+bias") + _module(f"block{i}.1", "bn")]
    + _module("classifier", "linear"),
}


def layout_digest(state: dict[str, torch.Tensor]) -> str:
    text = "\n".join(f"{k} {list(v.shape)}" for k, v in state.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def deterministic_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights that depend only on the state_dict's layout (what the reference was fed too)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif v.dim() > 1:
            out[k] = torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5
        elif k.endswith(("weight", "running_var")):
            out[k] = 1 + 0.1 * torch.rand(v.shape, generator=g)
        else:
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
    return out


def fixed_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_parameter_count_is_the_references(arch):
    assert count_parameters(build_model(arch, num_classes=100)) == REFERENCE[arch][0]


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_state_dict_names_shapes_and_order_are_the_references(arch):
    """Same names and shapes: a published checkpoint loads strictly; same order: so does its
    optimiser state, which is indexed by parameter position."""
    assert layout_digest(build_model(arch, num_classes=100).state_dict()) == REFERENCE[arch][1]


@pytest.mark.parametrize("arch", list(REFERENCE_KEYS))
def test_state_dict_keys_are_the_ones_read_from_the_reference_code(arch):
    assert list(build_model(arch, num_classes=100).state_dict()) == REFERENCE_KEYS[arch]


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_outputs_and_stage_features_are_the_references(arch):
    """Same weights, same input: the reference's logits and its feature list (resnet/wrn/shufflenet
    f1..f3, vgg f0..f4, mobilenet f1..f4; the stem output and the pooled vector left out)."""
    model = build_model(arch, num_classes=100)
    model.load_state_dict(deterministic_state(model.state_dict()))
    with torch.no_grad():
        logits, features = model.train()(fixed_input(), with_features=True)
    _, _, ref_logits, ref_features = REFERENCE[arch]
    assert logits[0, :3].tolist() == pytest.approx(ref_logits, abs=2e-4, rel=1e-4)
    assert [f.abs().mean().item() for f in features] == pytest.approx(ref_features, abs=2e-4, rel=1e-4)


def test_a_checkpoint_in_the_published_layout_loads_strictly(tmp_path):
    """The benchmark's files are torch.save({'model': state_dict, 'epoch', 'best_acc', 'optimizer'})."""
    published = build_model("resnet8x4", num_classes=100)
    optimizer = torch.optim.SGD(published.parameters(), lr=0.05, momentum=0.9)
    torch.save({"epoch": 240, "model": published.state_dict(), "best_acc": 73.3,
                "optimizer": optimizer.state_dict()}, tmp_path / "ckpt_epoch_240.pth")
    state = torch.load(tmp_path / "ckpt_epoch_240.pth", weights_only=True)["model"]
    ours = build_model("resnet8x4", num_classes=100)
    ours.load_state_dict(state, strict=True)
    x = fixed_input()
    assert torch.equal(ours.eval()(x), published.eval()(x))


def test_the_reference_key_list_loads_strictly():
    """Tensors under the key list read from the reference code (shapes from the digest-checked layout)."""
    model = build_model("wrn_16_2", num_classes=100)
    shapes = model.state_dict()
    model.load_state_dict({k: torch.zeros_like(shapes[k]) for k in REFERENCE_KEYS["wrn_16_2"]}, strict=True)


def test_a_checkpoint_of_another_network_is_refused():
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        build_model("resnet32x4", num_classes=100).load_state_dict(
            build_model("resnet8x4", num_classes=100).state_dict(), strict=True)


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_tiny_forward_and_backward(arch):
    """At width 4 every layer is small; stage outputs have the announced channels and strides,
    every parameter gets a finite gradient."""
    model = build_model(arch, num_classes=10, width=4)
    logits, features = model(torch.randn(2, 3, 32, 32), with_features=True)
    assert logits.shape == (2, 10)
    assert [tuple(f.shape[1:]) for f in features] == [
        (c, 32 // s, 32 // s) for c, s in zip(model.stage_channels, model.stage_strides)]
    (logits.logsumexp(1).sum() + sum(f.mean() for f in features)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_channels_last_gives_the_same_outputs(arch):
    """The GPU path (execution.channels_last) runs every network in NHWC memory. Width 16 and a loose
    tolerance: torch 2.14's CPU channels_last convolutions are themselves off (and corrupt the heap
    at 4 channels; see kdexp.config.CHANNELS_LAST_NEEDS_CUDA); a layout bug in a network (a view
    that assumes NCHW) changes outputs by far more."""
    model = build_model(arch, width=16).eval()
    x = torch.randn(2, 3, 32, 32)
    nchw = model(x)
    nhwc = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(nhwc, nchw, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_model_carries_the_interface_attributes(arch):
    model = model_layout(arch, num_classes=100)
    assert (model.arch, model.stem, model.width, model.num_classes) == (arch, "cifar", ARCHS[arch].reference_width, 100)
    assert len(model.stage_channels) == len(model.stage_strides) > 0


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_model_and_teacher_presets_are_the_published_networks(arch):
    cfg = compose_cfg(f"model={arch}", f"teacher={arch}", "method=logit")
    validate(cfg)
    for group in (cfg.model, cfg.teacher):
        assert (group.arch, group.stem, group.width) == (arch, "cifar", ARCHS[arch].reference_width)


def test_width_scales_every_layer():
    small, published = build_model("resnet32x4", width=8), build_model("resnet32x4")
    assert small.stage_channels == [16, 32, 64] and published.stage_channels == [64, 128, 256]
    assert build_model("shufflenetv2", width=12).stage_channels == [58, 116, 232]  # half, kept even


def test_an_imagenet_stem_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"stem='imagenet' is not available for resnet8x4.*use stem=cifar"):
        build_model("resnet8x4", stem="imagenet")


def test_a_width_too_small_to_build_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"width=1 is too small for mobilenetv2.*width >= 2"):
        build_model("mobilenetv2", width=1)


@pytest.mark.parametrize("teacher, student", [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
                                              ("vgg13", "vgg8"), ("resnet56", "resnet20")])
def test_feature_kd_works_on_same_family_pairs(teacher, student):
    """Feature-KD matches stages one to one without resizing: same-family pairs have the same
    stage count and strides (channels are bridged by the 1x1 projections)."""
    t, s = build_model(teacher, width=4).eval(), build_model(student, width=4)
    assert t.stage_strides == s.stage_strides
    method = FeatureKD(alpha=0.5, beta=0.5)
    method.bind(s, t)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        t_out = ModelOutputs(*t(x, with_features=True))
    parts = method(ModelOutputs(*s(x, with_features=True)), t_out, y)
    parts["loss"].backward()
    assert math.isfinite(parts["mse"].item()) and all(p.grad is not None for p in method.projections.parameters())


@pytest.mark.parametrize("teacher, student", [("resnet32x4", "shufflenetv2"), ("vgg13", "mobilenetv2")])
def test_cross_family_pairs_have_stages_feature_kd_cannot_match(teacher, student):
    """The benchmark's cross-family pairs differ in stage resolution (and vgg13/mobilenetv2 in stage
    count), so stage-by-stage Feature-KD does not apply to them; `stage_strides` says so before training."""
    assert model_layout(teacher).stage_strides != model_layout(student).stage_strides


@pytest.mark.e2e
def test_a_new_architecture_trains_through_the_entry_point(tmp_path):
    """One short epoch of resnet8x4 (width 8) on a small generated set: the training code runs the
    benchmark's networks unchanged."""
    proc = run_train(*TINY, "experiment=baseline", "model=resnet8x4", "model.width=8", "trainer.epochs=1",
                     f"data.root={tmp_path / 'fake'}", "data.fake_train_size=400", "data.fake_test_size=100",
                     "data.val_size=100", f"paths.output_dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result_file] = tmp_path.rglob("result.json")
    result = read_result(result_file.parent)
    assert result["status"] == "completed"
    assert result["params"]["student"] == count_parameters(build_model("resnet8x4", num_classes=10, width=8))
