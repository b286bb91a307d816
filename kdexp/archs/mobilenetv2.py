"""MobileNetV2 as the CRD benchmark builds it for CIFAR (RepDistiller models/mobilenetv2.py,
`mobile_half`, selected there as MobileNetV2): expansion 6, width multiplier 0.5, a stride-2 first
conv, seven groups of inverted residual blocks (every block has its 1x1 expansion, also at ratio 1),
a 1x1 conv to 1280 channels, global average pool, one Linear.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from kdexp.archs.common import CifarNet, reference_init

# (expand ratio, channels at width multiplier 1, blocks, stride): the reference's setting with T=6
GROUPS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
          (6, 320, 1, 1)]
STAGE_ENDS = (1, 2, 4, 6)  # the groups whose outputs are the reference's features f1..f4
LAST_CHANNELS = 1280       # the reference keeps 1280 for every multiplier <= 1


def conv_bn_relu(in_channels: int, channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, channels, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_res_connect = stride == 1 and in_channels == channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, 1, 0, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class Variant(NamedTuple):
    width: int  # the reference's first-conv channels: int(32 * width multiplier)


class MobileNetV2(CifarNet):
    VARIANTS = {"mobilenetv2": Variant(width=16)}  # `mobile_half`: multiplier 0.5

    def __init__(self, arch: str, num_classes: int = 100, stem: str = "cifar", width: int | None = None):
        variant = self.VARIANTS[arch]
        super().__init__(arch, num_classes, stem, variant.width if width is None else width)
        multiplier = self.width / 32
        if int(GROUPS[0][1] * multiplier) < 1:
            raise ValueError(f"width={width} is too small for {arch}: its narrowest layer has width/2 channels; "
                             f"use width >= 2 (the published network: {variant.width})")
        self.conv1 = conv_bn_relu(3, self.width, 3, stride=2)
        self.blocks = nn.ModuleList()
        in_channels, stride_so_far = self.width, 2
        for index, (expand_ratio, c, n, stride) in enumerate(GROUPS):
            channels = int(c * multiplier)
            strides = [stride] + [1] * (n - 1)
            self.blocks.append(nn.Sequential(*(
                InvertedResidual(in_channels if i == 0 else channels, channels, s, expand_ratio)
                for i, s in enumerate(strides))))
            in_channels, stride_so_far = channels, stride_so_far * stride
            if index in STAGE_ENDS:
                self.stage_channels.append(channels)
                self.stage_strides.append(stride_so_far)
        self.conv2 = conv_bn_relu(in_channels, LAST_CHANNELS, 1, stride=1)
        self.classifier = nn.Sequential(nn.Linear(LAST_CHANNELS, num_classes))
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's AvgPool2d(2, ceil_mode=True) at 32x32
        reference_init(self, linear_std=0.01)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv1(x)
        features = []
        for i, group in enumerate(self.blocks):
            x = group(x)
            if i in STAGE_ENDS:
                features.append(x)
        return features

    def classify(self, last_stage: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.conv2(last_stage)), 1))
