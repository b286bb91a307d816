"""Wide ResNets (Zagoruyko & Komodakis 2016) as the CRD benchmark builds them (RepDistiller
models/wrn.py): wrn_<depth>_<k> has (depth - 4) / 6 pre-activation blocks in each of three stages
of 16k, 32k, 64k channels, then BN-ReLU, global average pool, fc. No dropout (the benchmark's 0).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from kdexp.archs.common import CifarNet, reference_init, run_stages


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; when the shape changes, the shortcut is a 1x1 conv of the
    activated input (the reference's `convShortcut`), else the input itself."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.convShortcut = None
        if in_channels != channels:
            self.convShortcut = nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + self.conv2(self.relu2(self.bn2(self.conv1(activated))))


class NetworkBlock(nn.Module):
    """One stage; exists for the reference's module names (`block1.layer.0...`)."""

    def __init__(self, blocks: int, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(BasicBlock(in_channels, channels, stride),
                                   *(BasicBlock(channels, channels, 1) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class Variant(NamedTuple):
    depth: int
    widen_factor: int
    width: int = 16  # the reference's first-conv channels


class WideResNet(CifarNet):
    VARIANTS = {
        "wrn_40_2": Variant(40, 2),
        "wrn_16_2": Variant(16, 2),
        "wrn_40_1": Variant(40, 1),
    }

    def __init__(self, arch: str, num_classes: int = 100, stem: str = "cifar", width: int | None = None):
        variant = self.VARIANTS[arch]
        super().__init__(arch, num_classes, stem, variant.width if width is None else width)
        w, k, blocks = self.width, variant.widen_factor, (variant.depth - 4) // 6
        self.stage_channels = [w * k, 2 * w * k, 4 * w * k]
        self.stage_strides = [1, 2, 4]
        self.conv1 = nn.Conv2d(3, w, kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks, w, self.stage_channels[0], 1)
        self.block2 = NetworkBlock(blocks, self.stage_channels[0], self.stage_channels[1], 2)
        self.block3 = NetworkBlock(blocks, self.stage_channels[1], self.stage_channels[2], 2)
        self.bn1 = nn.BatchNorm2d(self.stage_channels[2])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's avg_pool2d(8) at 32x32
        self.fc = nn.Linear(self.stage_channels[2], num_classes)
        reference_init(self, zero_linear_bias=True)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return run_stages(self.conv1(x), (self.block1, self.block2, self.block3))

    def classify(self, last_stage: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.relu(self.bn1(last_stage))), 1))
