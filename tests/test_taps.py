"""Features by name and sample indices: a method reads any module's input or output of student and
teacher through forward hooks (kdexp/taps.py) and each image's index in the training split, on every
training loader; methods that declare neither train exactly as before the hooks existed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import tiny_loop, without_timing
from kdexp.data.imagenet import build_folder_batches, load_folders
from kdexp.data.fake_imagenet import write_fake_imagenet
from kdexp.loop import NetworkOutputs
from kdexp.methods import ModelOutputs, Tap, classifier_input
from kdexp.methods.logit import LogitKD
from kdexp.models import build_model
from kdexp.taps import TapRecorder

CPU = torch.device("cpu")


def _direct_forward(self: NetworkOutputs, x: torch.Tensor) -> ModelOutputs:
    """The loop's forward before taps existed: the network's own outputs, no hooks."""
    out = self.model(x, with_features=self.with_features)
    return ModelOutputs(*out) if self.with_features else ModelOutputs(out)


@pytest.mark.e2e  # trains across epochs, in process
@pytest.mark.parametrize("method", ["logit", "feature", "dkd", "dist"])
def test_methods_without_taps_train_bit_for_bit_as_without_hooks(tmp_path, splits, teacher, monkeypatch, method):
    hooked = tiny_loop(tmp_path / "hooked", splits, teacher, method=method)
    hooked_history = hooked.fit().history
    with monkeypatch.context() as patch:
        patch.setattr(NetworkOutputs, "_one_view", _direct_forward)
        direct = tiny_loop(tmp_path / "direct", splits, teacher, method=method)
        direct_history = direct.fit().history
    assert without_timing(hooked_history) == without_timing(direct_history)
    for name, value in direct.student.state_dict().items():
        assert torch.equal(hooked.student.state_dict()[name], value), name


def _block() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.LazyLinear(2))


def test_a_tap_keeps_a_module_output_before_a_later_in_place_relu_and_its_gradient():
    net, x = _block(), torch.randn(2, 3, 6, 6)
    net(x)  # materialise the lazy layer
    recorder = TapRecorder(net, {"bn": Tap("1"), "embedding": classifier_input(net)}, "student")
    with recorder.recording() as taps:
        logits = net(x)
    bn = net[1](net[0](x))
    torch.testing.assert_close(taps["bn"], bn)  # pre-ReLU: negative values survive the in-place ReLU
    assert (taps["bn"] < 0).any()
    torch.testing.assert_close(taps["embedding"], bn.relu().flatten(1))
    taps["bn"].square().sum().backward()  # the tap is in the graph: the conv's weights get a gradient
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
    assert logits.shape == (2, 2)


def test_nothing_is_kept_outside_recording():
    net, x = _block(), torch.randn(2, 3, 6, 6)
    net(x)
    recorder = TapRecorder(net, {"bn": Tap("1")}, "teacher")
    net(x)
    with recorder.recording() as taps:
        pass
    assert taps == {}


def test_a_misnamed_module_is_one_line_naming_it_and_the_near_names():
    with pytest.raises(ValueError, match=r"module 'layer5' of the teacher \(resnet20\), which has no module of "
                                         r"that name; did you mean layer3, layer2, layer1\?"):
        TapRecorder(build_model("resnet20", 100, width=4), {"x": Tap("layer5")}, "teacher")


@pytest.mark.parametrize("arch, classifier", [("resnet18", "fc"), ("resnet20", "fc"), ("wrn_16_2", "fc"),
                                              ("vgg8", "classifier"), ("mobilenetv2", "classifier"),
                                              ("shufflenetv2", "linear")])
def test_the_embedding_is_the_classifiers_input_in_every_family(arch, classifier):
    net = build_model(arch, 100, width=4 if arch != "shufflenetv2" else None).eval()
    recorder = TapRecorder(net, {"embedding": classifier_input(net)}, "student")
    with torch.no_grad(), recorder.recording() as taps:
        logits = net(torch.randn(2, 3, 32, 32))
    layer = dict(net.named_modules())[classifier]
    torch.testing.assert_close(layer(taps["embedding"]), logits)


class IndexedKD(LogitKD):
    """Logit-KD that records what the loop hands over: indices, and the labels it bound."""

    needs_indices = True

    def bind_training_set(self, labels):
        self.register_buffer("labels", labels.clone())
        self.seen: list[torch.Tensor] = []

    def taps(self, network, role):
        return {"embedding": classifier_input(network)}

    def forward(self, student, teacher, targets, indices):
        assert torch.equal(self.labels[indices], targets)  # each index is its image's
        assert student.taps["embedding"].requires_grad and not teacher.taps["embedding"].requires_grad
        self.seen.append(indices.cpu())
        return super().forward(student, teacher, targets)


@pytest.mark.parametrize("loader", ["tensor", "torch"])
def test_a_method_gets_each_images_training_split_index_on_every_loader(tmp_path, splits, teacher, loader):
    loop = tiny_loop(tmp_path, splits, teacher, f"data.loader={loader}", "trainer.max_steps_per_epoch=null",
                     f"method._target_={__name__}.IndexedKD")
    loop.fit()
    epochs = torch.cat(loop.method.seen).split(len(splits.train_y))
    assert len(epochs) == 2 and all(torch.equal(e.sort().values, torch.arange(len(splits.train_y))) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])  # shuffled per epoch
    assert "labels" in loop.method.state_dict()  # what bind_training_set registers is saved in last.pt


def test_image_folder_batches_carry_the_training_split_index(tmp_path):
    root = write_fake_imagenet(tmp_path / "imagenet", 24, 16, num_classes=3)
    splits = load_folders(root, val_size=6, split_seed=0)
    train, _, _ = build_folder_batches(splits, 5, 8, seed=0, device=CPU, image_size=16)
    indices, labels = zip(*[(b.index, b.y) for b in train.epoch(1)])
    indices, labels = torch.cat(indices), torch.cat(labels)
    assert torch.equal(indices.sort().values, torch.arange(len(splits.train_idx)))
    assert torch.equal(splits.train_y[indices], labels)


def test_methods_reading_more_than_teacher_logits_never_use_the_teacher_cache():
    assert LogitKD.can_use_teacher_cache() and not IndexedKD.can_use_teacher_cache()
