"""The KD literature's CIFAR networks: the CRD benchmark's (Tian et al. 2020; HobbitLong/RepDistiller
models/, also megvii-research/mdistiller models/cifar/), written for kdexp under the reference's
module names so the benchmark's published checkpoints load strictly."""
from __future__ import annotations

from kdexp.archs.common import CifarNet
from kdexp.archs.mobilenetv2 import MobileNetV2
from kdexp.archs.resnet import CifarResNet
from kdexp.archs.shufflenetv2 import ShuffleNetV2
from kdexp.archs.vgg import VGG
from kdexp.archs.wrn import WideResNet

FAMILIES: tuple[type[CifarNet], ...] = (CifarResNet, WideResNet, VGG, MobileNetV2, ShuffleNetV2)
# arch name -> its family; every family's VARIANTS[name].width is the published network's width
CIFAR_ARCHS: dict[str, type[CifarNet]] = {name: family for family in FAMILIES for name in family.VARIANTS}
