"""Forward GFLOPs per image against counts made without kdexp: by hand, and torchvision's published
multiply-accumulates (FLOPs here are 2 per multiply-accumulate)."""
import pytest
import torchvision
from torch import nn

from kdexp.cost import forward_gflops, network_gflops
from kdexp.models import build_model


def test_a_conv_and_a_linear_layer_counted_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 10 * 10, 5))
    conv_macs = 8 * 10 * 10 * (3 * 3 * 3)  # each output value: a 3x3x3 window
    linear_macs = 800 * 5
    assert forward_gflops(net, 10) * 1e9 == 2 * (conv_macs + linear_macs)


@pytest.mark.parametrize("arch, weights", [("resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
                                           ("resnet34", torchvision.models.ResNet34_Weights.IMAGENET1K_V1)])
def test_imagenet_resnets_at_224_are_twice_torchvisions_published_macs(arch, weights):
    """torchvision's `_ops` (1.814 for ResNet-18, 3.664 for ResNet-34: the seeds' report's 1.8 and
    3.6 "GFLOPs") are multiply-accumulates of the 1000-class network at 224 pixels."""
    gflops = network_gflops(arch, 1000, "imagenet", 64, 224)
    assert gflops == pytest.approx(2 * weights.meta["_ops"], rel=1e-3)


def test_cifar_resnet18_at_32_pixels():
    """The CIFAR stem's ResNet-18: 0.56 G multiply-accumulates, as the CIFAR literature quotes it."""
    assert network_gflops("resnet18", 10, "cifar", 64, 32) == pytest.approx(2 * 0.556, abs=0.01)


def test_the_count_scales_with_the_pixels_and_is_the_same_on_the_meta_device():
    model = build_model("resnet18", stem="imagenet", width=8).train()
    on_cpu = forward_gflops(model, 64)
    assert model.training  # counted in eval mode, left as it was
    assert on_cpu == network_gflops("resnet18", 10, "imagenet", 8, 64)
    assert network_gflops("resnet18", 10, "imagenet", 8, 128) == pytest.approx(4 * on_cpu, rel=0.01)
