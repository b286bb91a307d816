"""Distillation methods: one file per method, each picked by Hydra through `_target_`.

A method is an `nn.Module` turning student (and teacher) outputs into named loss parts. Adding
one (say DKD) is one file here plus one YAML in conf/method/ starting from `defaults: [base_<name>,
_self_]`, the schema kdexp makes from the class's `__init__` (typed arguments with defaults), so
Hydra checks `method.<arg>` values and keys: nothing else is edited. A method reads more of
the networks than their logits by declaring it: `needs_features` (the stage outputs), `taps`
(any module's input or output by name, collected with forward hooks: kdexp/taps.py),
`needs_indices` (each image's index in the training split) and `needs_strong_view`.
"""
from kdexp.methods.base import DistillationMethod, ModelOutputs, Tap, classifier_input

__all__ = ["DistillationMethod", "ModelOutputs", "Tap", "classifier_input"]
