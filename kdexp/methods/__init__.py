"""Distillation methods: one file per method, each picked by Hydra through `_target_`.

A method is an `nn.Module` turning student (and teacher) outputs into named loss parts. Adding
one (say DKD) is one file here plus one YAML in conf/method/ starting from `defaults: [base_<name>,
_self_]`, the schema kdexp makes from the class's `__init__` (typed arguments with defaults), so
Hydra checks `method.<arg>` values and keys: nothing else is edited.
"""
from kdexp.methods.base import DistillationMethod, ModelOutputs

__all__ = ["DistillationMethod", "ModelOutputs"]
