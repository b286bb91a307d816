"""VGG with batch norm for CIFAR as the CRD benchmark builds it (RepDistiller models/vgg.py,
`vgg8_bn`/`vgg13_bn`, selected there as vgg8/vgg13): five blocks of 3x3 conv-BN-ReLU, a 2x2
max-pool after each of the first three (the reference pools after the fourth only for 64x64
inputs), global average pool, one Linear. No VGG fully connected layers.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kdexp.archs.common import CifarNet, reference_init


def conv_block(in_channels: int, channels: list[int]) -> nn.Sequential:
    """conv-BN-ReLU repeated, ending at the last BN: the ReLU after it is applied in forward
    (the reference's `_make_layers(...)[:-1]`, which keeps the pre-activation reachable)."""
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv2d(in_channels, c, kernel_size=3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        in_channels = c
    return nn.Sequential(*layers[:-1])


class Variant(NamedTuple):
    blocks: list[list[int]]  # each block's convs, as multiples of the first conv's channels
    width: int = 64          # the reference's first-conv channels


class VGG(CifarNet):
    VARIANTS = {
        "vgg8": Variant([[1], [2], [4], [8], [8]]),                  # the reference's cfg "S"
        "vgg13": Variant([[1, 1], [2, 2], [4, 4], [8, 8], [8, 8]]),  # cfg "B"
    }

    def __init__(self, arch: str, num_classes: int = 100, stem: str = "cifar", width: int | None = None):
        variant = self.VARIANTS[arch]
        super().__init__(arch, num_classes, stem, variant.width if width is None else width)
        in_channels = 3
        for i, multiples in enumerate(variant.blocks):
            channels = [self.width * m for m in multiples]
            self.add_module(f"block{i}", conv_block(in_channels, channels))
            self.stage_channels.append(channels[-1])
            in_channels = channels[-1]
        self.stage_strides = [1, 2, 4, 8, 8]
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        reference_init(self, linear_std=0.01)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i, block in enumerate((self.block0, self.block1, self.block2, self.block3, self.block4)):
            if 0 < i < 4:
                x = self.pool(x)
            x = F.relu(block(x))
            features.append(x)
        return features

    def classify(self, last_stage: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(last_stage), 1))
