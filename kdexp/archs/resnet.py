"""CIFAR ResNets (He et al. 2016, section 4.2) as the CRD benchmark builds them (RepDistiller
models/resnet.py): a 3x3 conv, three stages of post-activation basic blocks at 32, 16 and 8 pixels,
global average pool, fc. resnet<6n+2> has n blocks per stage; the "x4" variants are 4x wider.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from kdexp.archs.common import CifarNet, reference_init, run_stages


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class Variant(NamedTuple):
    blocks: int                       # basic blocks per stage: (depth - 2) / 6
    multipliers: tuple[int, int, int]  # stage channels as multiples of the first conv's
    width: int                        # the reference's first-conv channels


class CifarResNet(CifarNet):
    VARIANTS = {
        "resnet20": Variant(3, (1, 2, 4), 16),
        "resnet32": Variant(5, (1, 2, 4), 16),
        "resnet56": Variant(9, (1, 2, 4), 16),
        "resnet110": Variant(18, (1, 2, 4), 16),
        "resnet8x4": Variant(1, (2, 4, 8), 32),
        "resnet32x4": Variant(5, (2, 4, 8), 32),
    }

    def __init__(self, arch: str, num_classes: int = 100, stem: str = "cifar", width: int | None = None):
        variant = self.VARIANTS[arch]
        super().__init__(arch, num_classes, stem, variant.width if width is None else width)
        w = self.width
        self.conv1 = conv3x3(3, w)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.stage_channels = [w * m for m in variant.multipliers]
        self.stage_strides = [1, 2, 4]
        in_channels = w
        for i, (channels, stride) in enumerate(zip(self.stage_channels, (1, 2, 2)), start=1):
            blocks = [BasicBlock(in_channels, channels, stride)]
            blocks += [BasicBlock(channels, channels) for _ in range(variant.blocks - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            in_channels = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's AvgPool2d(8) at 32x32
        self.fc = nn.Linear(in_channels, num_classes)
        reference_init(self)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return run_stages(self.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3))

    def classify(self, last_stage: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(last_stage), 1))
