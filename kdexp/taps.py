"""Features by name: forward hooks that keep the tensors a method's `taps` name (kdexp.methods.Tap),
so a method reads any module's input or output of any network without an edit of the network."""
from __future__ import annotations

import contextlib
import difflib
from typing import Iterator

import torch
from torch import nn

from kdexp.methods.base import Tap


class TapRecorder:
    """Hooks registered once on `network`'s named modules; while `recording()`, each forward keeps
    the tapped tensors under their keys. Each is cloned at capture: a later in-place op (the
    reference networks' `ReLU(inplace=True)` after a BatchNorm) would otherwise change what the
    method reads; the clone stays in the autograd graph."""

    def __init__(self, network: nn.Module, taps: dict[str, Tap], role: str):
        modules = dict(network.named_modules())
        self._kept: dict[str, torch.Tensor] | None = None
        self._handles = []
        for key, tap in taps.items():
            if tap.module not in modules:
                raise ValueError(_unknown(tap.module, modules, network, role))
            module = modules[tap.module]
            if tap.side == "input":
                self._handles.append(module.register_forward_pre_hook(self._keep_input(key)))
            else:
                self._handles.append(module.register_forward_hook(self._keep_output(key)))

    def _keep_input(self, key: str):
        def hook(module, args):
            self._keep(key, args[0])
        return hook

    def _keep_output(self, key: str):
        def hook(module, args, output):
            self._keep(key, output)
        return hook

    def _keep(self, key: str, tensor: torch.Tensor) -> None:
        if self._kept is not None:  # not while the network evaluates or predicts
            self._kept[key] = tensor.clone()

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        """The tensors of the forward passes inside the block, by key (a key seen twice: the last)."""
        self._kept = kept = {}
        try:
            yield kept
        finally:
            self._kept = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _unknown(name: str, modules: dict[str, nn.Module], network: nn.Module, role: str) -> str:
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    arch = getattr(network, "arch", type(network).__name__)
    return f"the method taps module {name!r} of the {role} ({arch}), which has no module of that name{hint}"
