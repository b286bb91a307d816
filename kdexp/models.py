"""The networks kdexp trains, by name (`model.arch`, `teacher.arch`):

- resnet18/34/50/101: torchvision's ResNets with a CIFAR or ImageNet stem (the study's);
- the KD literature's CIFAR networks (kdexp.archs, the CRD benchmark's): resnet20/32/56/110,
  resnet8x4/32x4, wrn_40_2/16_2/40_1, vgg8/13, mobilenetv2, shufflenetv2; CIFAR stem only.

`width` is the channels of the first conv: the reference width (64 for torchvision's, the
published one for the CIFAR networks; `build_model`'s default) gives the published network
parameter for parameter, other widths scale every layer so tests can train the real architectures
tiny. Every model has `arch, stem, width, num_classes`, and `forward(x, with_features=True)` also
returns its stage outputs, whose channels are `stage_channels` and whose downsampling w.r.t. the
input is `stage_strides` (Feature-KD matches two networks stage by stage).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Collection, Mapping

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from kdexp.archs import CIFAR_ARCHS

TORCHVISION_RESNETS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}
STEMS = ("cifar", "imagenet")


class KDResNet(ResNet):
    """torchvision's ResNet with a configurable base width and stem; forward can expose stages."""

    def __init__(self, arch: str, num_classes: int = 10, stem: str = "cifar", width: int = 64):
        # torchvision's __init__ hard-codes 64 channels, so the trunk is built here with its
        # `_make_layer` and its init; width 64 gives torchvision's network, parameter for parameter.
        nn.Module.__init__(self)
        block, layers = TORCHVISION_RESNETS[arch]
        self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if stem == "cifar":
            # The study replaces conv1 after construction, so it keeps PyTorch's default Conv2d
            # init (not torchvision's kaiming-normal); we do the same on purpose.
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.arch, self.stem, self.width, self.num_classes = arch, stem, width, num_classes
        self.stage_channels = [width * m * block.expansion for m in (1, 2, 4, 8)]
        self.stage_strides = [m * (1 if stem == "cifar" else 4) for m in (1, 2, 4, 8)]

    def forward(self, x: torch.Tensor, with_features: bool = False):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        return (logits, features) if with_features else logits


@dataclass(frozen=True)
class Arch:
    build: Callable[..., nn.Module]  # (num_classes, stem, width) -> the model
    reference_width: int             # the published network's width (model=<arch>'s: kdexp.config.register_configs)


ARCHS: dict[str, Arch] = {
    **{name: Arch(functools.partial(KDResNet, name), 64) for name in TORCHVISION_RESNETS},
    **{name: Arch(functools.partial(family, name), family.VARIANTS[name].width) for name, family in CIFAR_ARCHS.items()},
}


def build_model(arch: str, num_classes: int = 10, stem: str = "cifar", width: int | None = None) -> nn.Module:
    """The network `arch` (`width` None: the published network's); a ValueError names what is wrong."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {list(STEMS)}")
    spec = ARCHS[arch]
    return spec.build(num_classes, stem, spec.reference_width if width is None else width)


@functools.lru_cache(maxsize=128)
def model_layout(arch: str, num_classes: int = 10, stem: str = "cifar", width: int | None = None) -> nn.Module:
    """`build_model` on the meta device: no memory, no init. For checking a config (its ValueErrors)
    and reading `stage_channels`/`stage_strides` before any training. Built once per network per
    process (a dry run's 81 jobs validate a few networks, each ~0.1 s to build): callers share it, so
    they read it and count with it, never change it."""
    with torch.device("meta"):
        return build_model(arch, num_classes, stem, width)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def state_dict_misfit(expected: Mapping[str, torch.Tensor], state: object,
                      filled: Collection[str] = ()) -> str | None:
    """Why `state` cannot load where `expected` (a model's state_dict) would: the first few missing,
    unexpected and mis-shaped keys; None when it fits. `filled`: keys loading fills itself when
    absent (`filled_on_load`), so not missing."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a state_dict"
    missing = [k for k in expected if k not in state and k not in filled]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{label} {_first(keys)}" for label, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("size mismatch (checkpoint vs model)", shapes))
             if keys]
    return "; ".join(parts) or None


def filled_on_load(model: nn.Module, state: object) -> set[str]:
    """The keys `model.load_state_dict(state)` fills itself, strict or not, when `state` lacks them:
    each BatchNorm's `num_batches_tracked` where `state` was saved before PyTorch 0.4.1 added it (no
    module version >= 2 in its metadata), as RepDistiller's CIFAR-100 teachers were. By torch's rule
    (`_NormBase._load_from_state_dict`) the module keeps its own counter: 0 in a fresh network."""
    metadata = getattr(state, "_metadata", None) or {}
    return {f"{name}.num_batches_tracked" for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            and (metadata.get(name, {}).get("version") or 0) < 2}


def _first(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def main() -> None:
    """`python -m kdexp.models`: every `model=`/`teacher=` architecture, its stems, published width
    and size (built on the meta device: no memory, no time)."""
    from tabulate import tabulate

    rows = [(arch, ", ".join(STEMS if arch in TORCHVISION_RESNETS else ("cifar",)), spec.reference_width,
             *(f"{count_parameters(model_layout(arch, classes)) / 1e6:.2f}M" for classes in (10, 100)))
            for arch, spec in sorted(ARCHS.items())]
    print(tabulate(rows, headers=["arch", "stems", "width", "params (10 classes)", "params (100 classes)"]))


if __name__ == "__main__":
    main()
