"""What every CIFAR network of the KD benchmark shares: kdexp's model interface and the reference init."""
from __future__ import annotations

import torch
from torch import nn


class CifarNet(nn.Module):
    """A network of the CRD benchmark (HobbitLong/RepDistiller models/, mdistiller models/cifar/).

    Subclasses build their layers under the reference's module names, so a published checkpoint's
    state_dict loads strictly, and implement `stage_outputs` (the stages Feature-KD matches) and
    `classify` (the head on the last stage's output). `width` is the channels of the first conv:
    the reference width builds the published network exactly, other widths scale every layer.
    """

    def __init__(self, arch: str, num_classes: int, stem: str, width: int):
        super().__init__()
        if stem != "cifar":
            raise ValueError(f"stem={stem!r} is not available for {arch}: the CIFAR networks of the KD "
                             f"benchmark have their own 32x32 input layer; use stem=cifar")
        if width < 1:
            raise ValueError(f"width={width} must be a positive number of channels")
        self.arch, self.num_classes, self.stem, self.width = arch, num_classes, stem, width
        self.stage_channels: list[int] = []
        self.stage_strides: list[int] = []  # each stage output's downsampling w.r.t. the input

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def classify(self, last_stage: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, with_features: bool = False):
        features = self.stage_outputs(x)
        logits = self.classify(features[-1])
        return (logits, features) if with_features else logits


def reference_init(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """The benchmark's init: convs He-normal over fan-out (their `normal_(0, sqrt(2 / (k*k*out)))`)
    with zero bias, BN weight 1 and bias 0; Linear as PyTorch leaves it unless told otherwise."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(m.bias)


def run_stages(x: torch.Tensor, stages: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """Each stage's output, the stages applied in turn to the stem's output `x`."""
    features = []
    for stage in stages:
        x = stage(x)
        features.append(x)
    return features
