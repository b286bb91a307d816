"""Distillation methods: one file per method, each picked by Hydra through `_target_`.

A method is an `nn.Module` turning student (and teacher) outputs into named loss parts. Adding
one (say DKD) is one file here plus one YAML in conf/method/: nothing else is edited.
"""
from kdexp.methods.base import DistillationMethod, ModelOutputs

__all__ = ["DistillationMethod", "ModelOutputs"]
