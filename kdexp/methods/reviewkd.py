"""ReviewKD (Chen, Liu, Zhao & Jia, CVPR 2021, "Distilling Knowledge via Knowledge Review"), as
mdistiller's distillers/ReviewKD.py computes it:

    s_1..s_L, s_pool   the student's stage outputs (post-activation) and its pooled embedding (1x1)
    t_1..t_L, t_pool   the teacher's stage outputs BEFORE their last activation, and its pooled embedding
    r_pool, y = ABF_pool(s_pool)                  the review path starts at the deepest level
    r_l, y    = ABF_l(s_l, residual y)            from level L up to 1: attention-based fusion
    HCL(r, t) = sum_levels [MSE(r, t) + sum_k w_k MSE(pool_k(r), pool_k(t))] / (1 + sum_k w_k)
    L         = ce_weight * CE + kd_weight * min(epoch / warmup, 1) * HCL

ABF_l: 1x1 conv + BN to `mid` channels (min(max_mid_channel, the student's embedding channels));
unless it is the deepest, the residual y is resized (nearest) to this level's size and fused by a
2-channel sigmoid attention over both; the fused map is resized to the teacher's size at this level
and a 3x3 conv + BN gives the teacher's channels; the fused map (at the teacher's size) is the
residual passed up. HCL's pyramid: adaptive average pools to 4, 2 and 1 pixels, each only where the
map is larger, weights halving from 1/2 over the pools taken (the reference's `cnt`).

Shapes and channels are derived from the networks (mdistiller reads them per pair from its config:
REVIEWKD.IN_CHANNELS, OUT_CHANNELS, SHAPES, OUT_SHAPES; every combination it ships or the authors'
CIFAR-100 code builds is what kdexp derives): channels in `bind`, each level's spatial size from the
tensors themselves. Which tensors (mdistiller's `feats[1:]` + `pooled_feat` of the student,
`preact_feats[1:]` + `pooled_feat` of the teacher), all read through `taps` by module name (not as
`needs_features`: the stage-by-stage check that Feature-KD needs would refuse the cross-family pairs),
per kdexp family:

- pooled embedding, every family: the classifier's input (kdexp pools adaptively to 1x1 where the
  reference pools with a fixed AvgPool2d(8), (4) or (2, ceil_mode): the same at 32x32).
- student: each stage's output (ResNets and ShuffleNetV2: layer1..; WRN: block1..3; MobileNetV2: the
  groups blocks.1, .2, .4, .6). VGG: block1..block4's outputs, through the ReLU that its forward
  applies as a function (so no module outputs it); block0 is mdistiller's f0, whose `feats[0]` is dropped.
- teacher, CIFAR ResNets and the torchvision ResNets: the residual sum of each stage's last block
  before its final ReLU. kdexp's block runs one ReLU module twice (after bn1, after the sum), so the
  tap is that module's input on its last call, the one the tap recorder keeps.
- teacher, WRN: mdistiller's preact is the next BN applied to the stage output (block2.layer.0.bn1,
  block3.layer.0.bn1, the final bn1): those modules' outputs, the same modules on the same tensors.
- teacher, VGG: block1..block4's outputs (each block ends at its last BN).
- teacher MobileNetV2 or ShuffleNetV2: refused in `bind` (mdistiller's MobileNetV2 has no
  preact_feats; ShuffleNetV2's is a concatenation that no module outputs, and no benchmark pair
  distils from it).
The torchvision ResNets (resnet18..101, the study's) are mapped the same way as mdistiller's
ResNets (its cifar/resnetv2.py and imagenet/resnet.py have the same feats and preact_feats); no
published ReviewKD setting exists for them at CIFAR resolution.

mdistiller's STU_PREACT (the student's pre-activations, used on ImageNet only) is not ported: its
CIFAR-100 setting is False, which is what this computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdexp.archs.mobilenetv2 import STAGE_ENDS, MobileNetV2
from kdexp.archs.resnet import CifarResNet
from kdexp.archs.shufflenetv2 import ShuffleNetV2
from kdexp.archs.vgg import VGG
from kdexp.archs.wrn import WideResNet
from kdexp.methods.base import DistillationMethod, Tap, classifier_input, fmt
from kdexp.models import KDResNet

POOLED = "pooled"  # the tap key of each network's pooled embedding (its classifier's input)


class ReviewKD(DistillationMethod):
    name = "reviewkd"
    grid = {"kd_weight": "λ"}

    def __init__(self, kd_weight: float = 5.0, ce_weight: float = 1.0, warmup: int = 20,
                 max_mid_channel: int = 512):
        super().__init__()
        for key, value in (("kd_weight", kd_weight), ("ce_weight", ce_weight), ("warmup", warmup)):
            if not value >= 0:
                raise ValueError(f"method.{key}={fmt(value)} must be >= 0")
        if not max_mid_channel >= 1:
            raise ValueError(f"method.max_mid_channel={fmt(max_mid_channel)} must be >= 1 (the most "
                             f"channels of the fusion modules' shared width; the reference's is 512)")
        self.kd_weight, self.ce_weight = float(kd_weight), float(ce_weight)
        self.warmup, self.max_mid_channel = int(warmup), int(max_mid_channel)
        self.abfs = nn.ModuleList()  # deepest level first, as the reference orders (and names) them
        self.activate_student = False  # VGG: its stage taps are pre-ReLU

    def taps(self, network: nn.Module, role: str) -> dict[str, Tap]:
        levels = teacher_levels(network) if role == "teacher" else student_levels(network)
        return {**{f"level{i}": tap for i, tap in enumerate(levels)}, POOLED: classifier_input(network)}

    def bind(self, student, teacher):
        student, teacher = _network(student), _network(teacher)
        teacher_levels(teacher)  # refuses a teacher family without mapped pre-activations first
        self.activate_student = isinstance(student, VGG)
        in_channels = level_channels(student) + [embedding_channels(student)]
        out_channels = level_channels(teacher) + [embedding_channels(teacher)]
        if len(in_channels) != len(out_channels):
            raise ValueError(f"method=reviewkd pairs the student's levels with the teacher's one to one: "
                             f"{student.arch} has {len(in_channels)} (stages + embedding), {teacher.arch} "
                             f"{len(out_channels)}; choose networks with as many stages")
        mid = min(self.max_mid_channel, in_channels[-1])
        deepest = len(in_channels) - 1
        self.abfs = nn.ModuleList(ABF(in_channels[i], mid, out_channels[i], fuse=i < deepest)
                                  for i in reversed(range(len(in_channels))))

    def forward(self, student, teacher, targets):
        ce = self.cross_entropy(student.logits, targets)
        s_levels = review_levels(student.taps, len(self.abfs), activate=self.activate_student)
        t_levels = review_levels(teacher.taps, len(self.abfs))
        hcl = hcl_loss(self.review(s_levels, [t.shape[-2:] for t in t_levels]), t_levels)
        loss = self.ce_weight * ce + self.kd_weight * self.warmup_weight() * hcl
        return {"loss": loss, "ce": ce, "kd": hcl}

    def review(self, levels: list[torch.Tensor], out_sizes: list[torch.Size]) -> list[torch.Tensor]:
        """The ABFs' outputs, shallowest level first: the review path runs from the deepest level up,
        each level fused with the residual of the level below it."""
        outputs, residual = [], None
        for abf, x, size in zip(self.abfs, reversed(levels), reversed(out_sizes)):
            out, residual = abf(x, residual, size)
            outputs.append(out)
        return outputs[::-1]

    def warmup_weight(self) -> torch.Tensor:
        """min(epoch / warmup, 1), epoch 1-based (mdistiller's `kwargs["epoch"]`); warmup 0: 1."""
        if self.warmup == 0:
            return torch.ones_like(self.epoch)
        return (self.epoch / self.warmup).clamp(max=1.0)


class ABF(nn.Module):
    """Attention-based fusion of one level (module names as the reference's, so its weights load)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        for conv in (self.conv1[0], self.conv2[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # the reference's init; att_conv keeps PyTorch's

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                out_size: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """(this level's output at `out_size` with the teacher's channels, the fused map passed up)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, :1] + residual * attention[:, 1:]
        if x.shape[-2:] != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


def hcl_loss(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
    """The hierarchical context loss, summed over the levels."""
    return sum(context_loss(s, t) for s, t in zip(students, teachers))


def context_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One level's MSE and its pyramid's (average pools to 4, 2, 1 pixels where the map is larger),
    weighted 1, 1/2, 1/4, ... and normalised by the weights' sum. The weight halves over the pools
    taken, not over all three: a 4-pixel map pools at 2 (weight 1/2) and 1 (1/4), as the reference's."""
    loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
    for size in (4, 2, 1):
        if size < s.shape[2]:
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size))
            weights += weight
    return loss / weights


def student_levels(network: nn.Module) -> list[Tap]:
    """Where mdistiller's `feats[1:]` are in kdexp's network, shallowest first (VGG's before its ReLU)."""
    if isinstance(network, WideResNet):
        return [Tap(f"block{i}") for i in (1, 2, 3)]
    if isinstance(network, VGG):
        return [Tap(f"block{i}") for i in (1, 2, 3, 4)]
    if isinstance(network, MobileNetV2):
        return [Tap(f"blocks.{i}") for i in STAGE_ENDS]
    if isinstance(network, (CifarResNet, KDResNet, ShuffleNetV2)):
        return [Tap(stage) for stage in _stages(network)]
    raise ValueError(f"method=reviewkd does not know the stages of a {_arch(network)} student")


def teacher_levels(network: nn.Module) -> list[Tap]:
    """Where mdistiller's `preact_feats[1:]` are in kdexp's network, shallowest first."""
    if isinstance(network, (CifarResNet, KDResNet)):
        return [Tap(f"{stage}.{len(getattr(network, stage)) - 1}.relu", "input") for stage in _stages(network)]
    if isinstance(network, WideResNet):
        return [Tap("block2.layer.0.bn1"), Tap("block3.layer.0.bn1"), Tap("bn1")]
    if isinstance(network, VGG):
        return [Tap(f"block{i}") for i in (1, 2, 3, 4)]
    raise ValueError(f"method=reviewkd cannot distil from a {_arch(network)} teacher: it reads the teacher's "
                     f"pre-activation stage outputs, which kdexp maps for ResNets, WRNs and VGGs only")


def level_channels(network: nn.Module) -> list[int]:
    """The channels of the stage outputs the review reads: all of them, except VGG's first (block0)."""
    return network.stage_channels[1:] if isinstance(network, VGG) else list(network.stage_channels)


def review_levels(taps: dict[str, torch.Tensor], count: int, activate: bool = False) -> list[torch.Tensor]:
    """The tapped stage levels, shallowest first (`activate`: through a ReLU), then the pooled
    embedding (N, C) as a 1x1 map."""
    stages = [F.relu(taps[f"level{i}"]) if activate else taps[f"level{i}"] for i in range(count - 1)]
    return stages + [taps[POOLED][:, :, None, None]]


def embedding_channels(network: nn.Module) -> int:
    """The pooled embedding's channels: the classifier's input features."""
    return dict(network.named_modules())[classifier_input(network).module].in_features


def _network(model: nn.Module) -> nn.Module:
    """The network inside a frozen teacher (kdexp.teachers.FrozenTeacher holds it as `.model`)."""
    return getattr(model, "model", model)


def _stages(network: nn.Module) -> list[str]:
    return [name for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(network, name)]


def _arch(network: nn.Module) -> str:
    return getattr(network, "arch", type(network).__name__)
