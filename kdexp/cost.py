"""What a network costs to run: forward GFLOPs per image, counted from the network itself.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`: two per multiply-accumulate of
every convolution and matrix product (normalisation, activations, pooling and additions are not
counted; they are a few per cent of a ResNet's). The KD and ResNet literature usually reports
multiply-accumulates under the name "FLOPs" (torchvision's 1.8 G for ResNet-18 at 224 pixels, the
seeds' report's 1.8 and 3.6 G): those numbers are half of these.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdexp.models import model_layout


def forward_gflops(model: nn.Module, image_size: int) -> float:
    """GFLOPs of one eval-mode forward pass of `model` on one 3 x image_size x image_size image,
    on the device its parameters are on (the meta device costs nothing)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def network_gflops(arch: str, num_classes: int, stem: str, width: int, image_size: int) -> float:
    """Forward GFLOPs per image of the network a config names, built on the meta device: no
    weights, no memory, a fraction of a second."""
    return forward_gflops(model_layout(arch, num_classes, stem, width), image_size)
