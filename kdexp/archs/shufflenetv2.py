"""ShuffleNetV2 (Ma et al. 2018) as the CRD benchmark builds it for CIFAR (RepDistiller
models/ShuffleNetv2.py, `ShuffleV2`: net size 1): a 1x1 conv to 24 channels at full resolution,
three stages (a stride-2 down block, then 3, 7, 3 split-shuffle blocks) of 116, 232, 464 channels,
a 1x1 conv to 1024, global average pool, one Linear. PyTorch's default init, as the reference.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kdexp.archs.common import CifarNet, run_stages


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """[N, C, H, W] -> [N, g, C/g, H, W] -> [N, C/g, g, H, W] -> [N, C, H, W]: channels of the two
    branches interleave."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def conv(in_channels: int, channels: int, kernel_size: int = 1, stride: int = 1,
         depthwise: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, channels, kernel_size, stride, kernel_size // 2,
                     groups=in_channels if depthwise else 1, bias=False)


class BasicBlock(nn.Module):
    """Split the channels in half; the second half goes 1x1-dw3x3-1x1; concatenate and shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = conv(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = conv(half, half, 3, depthwise=True)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = conv(half, half)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, x = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return channel_shuffle(torch.cat([kept, out], 1))


class DownBlock(nn.Module):
    """Two stride-2 branches (dw3x3-1x1 | 1x1-dw3x3-1x1), half the output channels each; concatenate and shuffle."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        mid = channels // 2
        self.conv1 = conv(in_channels, in_channels, 3, stride=2, depthwise=True)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = conv(in_channels, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = conv(in_channels, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = conv(mid, mid, 3, stride=2, depthwise=True)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = conv(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1))


class Variant(NamedTuple):
    stage_channels: tuple[int, int, int]
    blocks: tuple[int, int, int]
    last_channels: int
    width: int = 24  # the reference's first-conv channels


class ShuffleNetV2(CifarNet):
    VARIANTS = {"shufflenetv2": Variant((116, 232, 464), (3, 7, 3), 1024)}

    def __init__(self, arch: str, num_classes: int = 100, stem: str = "cifar", width: int | None = None):
        variant = self.VARIANTS[arch]
        super().__init__(arch, num_classes, stem, variant.width if width is None else width)
        scale = self.width / variant.width
        # stage channels stay even: every block splits them in half
        self.stage_channels = [max(2, 2 * round(c * scale / 2)) for c in variant.stage_channels]
        self.stage_strides = [2, 4, 8]
        last_channels = max(1, round(variant.last_channels * scale))
        self.conv1 = nn.Conv2d(3, self.width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.width)
        in_channels = self.width
        for i, (channels, blocks) in enumerate(zip(self.stage_channels, variant.blocks), start=1):
            self.add_module(f"layer{i}", nn.Sequential(DownBlock(in_channels, channels),
                                                       *(BasicBlock(channels) for _ in range(blocks))))
            in_channels = channels
        self.conv2 = nn.Conv2d(in_channels, last_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's avg_pool2d(4) at 32x32
        self.linear = nn.Linear(last_channels, num_classes)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return run_stages(F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3))

    def classify(self, last_stage: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.avgpool(F.relu(self.bn2(self.conv2(last_stage)))), 1))
