"""The study's architectures are torchvision's, with the study's CIFAR stem (the KD benchmark's
CIFAR networks: tests/test_archs.py); pretrained initialisation (model.init) loads torchvision's
weights into them."""
import pytest
import torch
import torchvision
from torch import nn

from helpers import counters_deleted_after_saving, saved_before_pytorch_0_4_1, without_a_conv_weight
from kdexp.checkpoint import file_sha256
from kdexp.models import build_model, count_parameters, model_layout
from kdexp.pretrained import InitError, cache_file, init_missing, init_problem, initialise


@pytest.mark.parametrize("arch, params", [("resnet18", 11_173_962), ("resnet34", 21_282_122)])
def test_parameter_counts_match_the_study(arch, params):
    assert count_parameters(build_model(arch)) == params


@pytest.mark.parametrize("arch, millions", [("resnet50", 23.5), ("resnet101", 42.5)])
def test_bottleneck_parameter_counts(arch, millions):
    assert count_parameters(build_model(arch)) / 1e6 == pytest.approx(millions, abs=0.05)


def test_cifar_stem_keeps_resolution_and_exposes_stages():
    model = build_model("resnet50", width=4)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    logits, feats = model(torch.randn(2, 3, 32, 32), with_features=True)
    assert logits.shape == (2, 10)
    assert [f.shape[1:] for f in feats] == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (128, 4, 4)]
    assert model.stage_channels == [16, 32, 64, 128] and model.stage_strides == [1, 2, 4, 8]


def test_cifar_stem_conv_keeps_pytorch_default_init():
    """The study swaps conv1 after torchvision's kaiming init, so conv1 has Conv2d's default
    kaiming-uniform(a=sqrt(5)) init: bound 1/sqrt(fan_in)."""
    torch.manual_seed(0)
    w = build_model("resnet18").conv1.weight
    assert w.abs().max() <= 1 / (3 * 3 * 3) ** 0.5


def test_imagenet_stem_downsamples_four_times():
    model = build_model("resnet18", stem="imagenet", width=4)
    assert model.conv1.kernel_size == (7, 7) and isinstance(model.maxpool, nn.MaxPool2d)
    _, feats = model.eval()(torch.randn(1, 3, 32, 32), with_features=True)
    assert [f.shape[-1] for f in feats] == [8, 4, 2, 1] and model.stage_strides == [4, 8, 16, 32]


def test_models_carry_their_number_of_classes():
    """Teacher export and checks read `num_classes`, whatever the network's head is called."""
    assert build_model("resnet18", num_classes=100, width=4).num_classes == 100


def test_model_layout_builds_without_weights():
    """Config checks read a network's stages from a meta-device build: no memory, no init."""
    layout = model_layout("resnet101", num_classes=100)
    assert layout.conv1.weight.is_meta and layout.stage_channels == [256, 512, 1024, 2048]


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'"):
        build_model("resnet19")


def test_unknown_stem_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown stem 'tiny'"):
        build_model("resnet18", stem="tiny")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_width_64_imagenet_stem_is_torchvisions_network(arch):
    """Our trunk is built by hand (for the width knob): it must be torchvision's, weight for weight."""
    import torchvision

    ours, theirs = build_model(arch, stem="imagenet").eval(), getattr(torchvision.models, arch)(num_classes=10).eval()
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict())  # strict: same names, shapes and buffers
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def _torchvision_weights(path, arch="resnet18"):
    """A torchvision-format state_dict as ImageNet weights are saved: the 1000-class network."""
    torch.manual_seed(1)
    state = getattr(torchvision.models, arch)(num_classes=1000).state_dict()
    torch.save(state, path)
    return state


def _loads_all_but_the_classifier(model, state, fresh_fc):
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert own["fc.weight"].shape == (10, 512) and torch.equal(own["fc.weight"], fresh_fc)


def test_init_from_a_local_torchvision_state_dict_keeps_a_fresh_classifier(tmp_path):
    state = _torchvision_weights(tmp_path / "r18.pth")
    model = build_model("resnet18", stem="imagenet")
    fresh_fc = model.fc.weight.detach().clone()
    record = initialise(model, str(tmp_path / "r18.pth"))
    _loads_all_but_the_classifier(model, state, fresh_fc)
    assert record == {"init": str(tmp_path / "r18.pth"), "file": str(tmp_path / "r18.pth"),
                      "sha256": file_sha256(tmp_path / "r18.pth")}


def test_imagenet_init_reads_torchvisions_file_from_torch_hubs_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert cache_file("resnet18") == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cache_file("resnet18").parent.mkdir(parents=True)
    state = _torchvision_weights(cache_file("resnet18"))
    model = build_model("resnet18", stem="imagenet")
    fresh_fc = model.fc.weight.detach().clone()
    assert initialise(model, "imagenet")["file"] == str(cache_file("resnet18"))
    _loads_all_but_the_classifier(model, state, fresh_fc)


def test_imagenet_init_offline_and_not_cached_names_the_file_its_hash_and_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # no internet, whatever this machine has
    with pytest.raises(InitError) as err:
        initialise(build_model("resnet34", stem="imagenet"), "imagenet")
    msg = str(err.value)
    assert "ResNet34_Weights.IMAGENET1K_V1 weights resnet34-b627a593.pth, sha256 starting b627a593" in msg
    assert f"put it in {tmp_path / 'hub' / 'checkpoints'}" in msg
    assert "https://download.pytorch.org/models/resnet34-b627a593.pth" in msg and "\n" not in msg


def test_weights_that_do_not_fit_the_network_are_a_clear_error(tmp_path):
    _torchvision_weights(tmp_path / "r18.pth")
    with pytest.raises(InitError, match=r"does not fit resnet18 \(stem=cifar, width=64\): size mismatch .*conv1"):
        initialise(build_model("resnet18"), str(tmp_path / "r18.pth"))
    (tmp_path / "broken.pth").write_bytes(b"not a torch file")
    with pytest.raises(InitError, match="cannot be read as a state_dict"):
        initialise(build_model("resnet18"), str(tmp_path / "broken.pth"))
    with pytest.raises(InitError, match="no such file"):
        initialise(build_model("resnet18"), str(tmp_path / "absent.pth"))


def _saved_in_2017(state):
    """`state` as torchvision's classic ImageNet files hold it, saved in 2017 before PyTorch 0.4.1 added
    BatchNorm's `num_batches_tracked`: without those keys and without module versions (a plain dict).
    Loading `modelzoo://resnet50` (resnet50-19c8e357.pth) logs every BatchNorm's counter as missing
    (open-mmlab/mmdetection#238); the IMAGENET1K_V1 files kdexp uses (resnet18-f37072fd.pth, ...) are
    those files re-saved as `torch.save(torch.load(path), path)` (pytorch/vision#2068), keys unchanged."""
    return saved_before_pytorch_0_4_1(state)


def _trained_resnet18():
    """torchvision's ImageNet ResNet-18 with BatchNorm statistics off their initial values, as after
    training (fresh ones would equal the student's own and prove nothing loaded)."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(num_classes=1000)
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(450_000)
    return net


@pytest.mark.parametrize("init", ["file", "imagenet"])
def test_torchvisions_2017_files_without_batchnorm_counters_load_as_torchvision_loads_them(tmp_path, monkeypatch, init):
    """torchvision loads its classic files strictly (`model.load_state_dict(weights.get_state_dict(...))`
    in models/resnet.py) and torch fills the counters; model.init loads them the same, counters at 0."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    file = cache_file("resnet18") if init == "imagenet" else tmp_path / "resnet18-5c106cde.pth"
    file.parent.mkdir(parents=True, exist_ok=True)
    state = _saved_in_2017(_trained_resnet18().state_dict())
    torch.save(state, file)
    reference = torchvision.models.resnet18()
    reference.load_state_dict(torch.load(file))  # torchvision's own strict load
    model = build_model("resnet18", stem="imagenet")
    fresh_fc = model.fc.weight.detach().clone()
    initialise(model, "imagenet" if init == "imagenet" else str(file))
    _loads_all_but_the_classifier(model, state, fresh_fc)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in reference.state_dict().items() if not k.startswith("fc."))
    counters = [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(counters) == 20 and set(counters) == {0}  # stem, 2 per block x 8, 3 shortcuts


@pytest.mark.parametrize("weights, complaint", [
    (without_a_conv_weight, "missing keys layer1.0.conv1.weight"),
    (counters_deleted_after_saving, "missing keys bn1.num_batches_tracked, layer1.0.bn1.num_batches_tracked, "
                                     "layer1.0.bn2.num_batches_tracked (+17 more)"),
])
def test_init_weights_torchvisions_strict_load_refuses_are_refused(tmp_path, weights, complaint):
    """model.init loads all but the classifier with strict=False, so its key check alone stands between
    a missing weight and a silently fresh one: only the counters torch fills may be missing."""
    torch.save(weights(_trained_resnet18().state_dict()), tmp_path / "r18.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        torchvision.models.resnet18().load_state_dict(torch.load(tmp_path / "r18.pth"))
    with pytest.raises(InitError) as err:
        initialise(build_model("resnet18", stem="imagenet"), str(tmp_path / "r18.pth"))
    assert str(err.value).endswith(complaint) and "\n" not in str(err.value)


@pytest.mark.parametrize("arch, stem, width, complaint", [
    ("resnet34", "cifar", 64, "set model.stem=imagenet model.width=64"),
    ("resnet34", "imagenet", 16, "set model.stem=imagenet model.width=64"),
    ("resnet20", "cifar", 16, "torchvision has ImageNet weights for resnet18, resnet34, resnet50, resnet101, not resnet20"),
])
def test_imagenet_init_needs_torchvisions_network(arch, stem, width, complaint):
    assert complaint in init_problem("model", "imagenet", arch, stem, width)
    assert init_problem("model", "imagenet", "resnet34", "imagenet", 64) is None


def test_a_corrupt_cached_imagenet_file_is_named_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache_file("resnet18").parent.mkdir(parents=True)
    cache_file("resnet18").write_bytes(b"truncated")
    with pytest.raises(InitError, match=f"cannot load {cache_file('resnet18')} as torchvision's "
                                        r"ResNet18_Weights.IMAGENET1K_V1 weights .*delete it and fetch it again"):
        initialise(build_model("resnet18", stem="imagenet"), "imagenet")


def test_dry_runs_find_init_weights_missing_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert "torchvision.models.get_weight('ResNet34_Weights.IMAGENET1K_V1').get_state_dict()" in \
        init_missing("imagenet", "resnet34")
    assert init_missing(str(tmp_path / "absent.pth"), "resnet34") == f"model.init={tmp_path / 'absent.pth'}: no such file"
    cache_file("resnet34").parent.mkdir(parents=True)
    cache_file("resnet34").touch()
    assert init_missing("imagenet", "resnet34") is None
