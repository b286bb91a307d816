"""What every distillation method provides to the training loop."""
from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field, make_dataclass
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import nn


@dataclass
class ModelOutputs:
    logits: torch.Tensor
    features: list[torch.Tensor] | None = None  # the stage outputs, when the method `needs_features`
    taps: dict[str, torch.Tensor] = field(default_factory=dict)  # what the method's `taps` name, by key
    strong: "ModelOutputs | None" = None  # the same images' strongly augmented view (`needs_strong_view`)


@dataclass(frozen=True)
class Tap:
    """A tensor a method reads from a network by module name (as `named_modules()` lists it, which
    for kdexp's networks is the reference code's): the module's output, or (`side="input"`) its
    first positional input, e.g. the classifier's input, the penultimate embedding."""

    module: str
    side: str = "output"

    def __post_init__(self) -> None:
        if self.side not in ("output", "input"):
            raise ValueError(f"Tap({self.module!r}, side={self.side!r}): side is 'output' or 'input'")


def classifier_input(network: nn.Module) -> Tap:
    """The penultimate embedding: the input of the network's last Linear layer (its classifier),
    whatever the architecture calls it (fc, classifier, linear)."""
    linears = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(network).__name__} has no Linear layer whose input is its embedding")
    return Tap(linears[-1], "input")


class DistillationMethod(nn.Module):
    """Base class. `forward` returns named loss parts; "loss" is the one that is minimised, the
    others are logged as `loss_<name>`. Parameters a method owns (projections) are trained by the
    same optimiser as the student and, unless `clip_with_student` is False, clipped with it.

    A method also owns its identity, which the run label, analysis and the study launcher read
    from the class (found through a run config's `_target_`), never from a list of names:
    `name`, the `grid` of hyperparameters that make a grid cell (with the symbol tables show),
    the `variant` a non-default switch makes (e.g. "bugged", "std"), and what it needs."""

    name: ClassVar[str]
    grid: ClassVar[dict[str, str]] = {}  # cell-defining hyperparameters -> display symbol, in table order
    needs_teacher: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False  # the stage outputs (ModelOutputs.features)
    needs_indices: ClassVar[bool] = False  # forward(..., indices=): each image's index in the training split
    needs_strong_view: ClassVar[bool] = False  # ModelOutputs.strong: a second, strongly augmented view
    clip_with_student: bool = True
    label_smoothing: float = 0.0  # of every CE term (`cross_entropy`): trainer.label_smoothing, set by the job
    Config: ClassVar[type]  # the method's Hydra schema, made from __init__'s signature

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.Config = arguments_schema(cls)

    def __init__(self) -> None:
        super().__init__()
        # The epoch in progress (1-based) as a tensor, so a schedule inside `forward` (DKD's
        # warm-up) reads it without torch.compile recapturing the graph each epoch.
        self.register_buffer("epoch", torch.zeros(()), persistent=False)
        self.epochs = 1  # total epochs of the run: constant, so a plain attribute

    @classmethod
    def can_use_teacher_cache(cls) -> bool:
        """Teacher logits of each augmented view can replace the live teacher: methods that read the
        teacher's logits of the one view only (no stage outputs, no tapped module, no strong view).
        A method whose `taps` reads the student alone may override this to use the cache."""
        return (cls.needs_teacher and not cls.needs_features and not cls.needs_strong_view
                and cls.taps is DistillationMethod.taps)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the loop before each training epoch (also after a resume)."""
        self.epoch.fill_(epoch)
        self.epochs = epochs

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The CE term of any method, with the run's label smoothing (0: plain cross-entropy)."""
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called once both networks exist, before the optimiser is built (create parameters here)."""

    def bind_training_set(self, labels: torch.Tensor) -> None:
        """With `needs_indices`: called once after `bind`, with the training split's labels (CPU int64,
        indexed as `forward`'s `indices`); buffers registered here are saved in last.pt."""

    def taps(self, network: nn.Module, role: str) -> dict[str, Tap]:
        """The tensors this method reads from `network` (`role` "student" or "teacher") by key: the
        loop hooks them and hands them over as `ModelOutputs.taps[key]`."""
        return {}

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None,
                targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """A method with `needs_indices` also takes `indices` (int64, one per image of the batch)."""
        raise NotImplementedError

    @classmethod
    def cell(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The grid coordinates of a run's method config: {hyperparameter: value} over `grid`."""
        return {key: cfg.get(key) for key in cls.grid}

    @classmethod
    def variant(cls, cfg: Mapping[str, Any]) -> str | None:
        """A switch that makes a different method, not another cell (None: the plain method)."""
        return None

    @classmethod
    def label(cls, cfg: Mapping[str, Any]) -> str:
        """The KD column of tables: `logit`, `feature(bugged)`, `logit(std)`."""
        variant = cls.variant(cfg)
        return f"{cls.name}({variant})" if variant else cls.name

    @classmethod
    def cell_label(cls, cfg: Mapping[str, Any]) -> str:
        """A grid cell as tables show it: `α=0.5, T=4`."""
        return ", ".join(f"{symbol}={fmt(cfg[key])}" for key, symbol in cls.grid.items())

    @classmethod
    def run_tag(cls, cfg: Mapping[str, Any]) -> str:
        """A short, readable name for run directories: `logit_a0.5_T4`, and every other argument
        that differs from the method's default, `feature_a0.5_b0.5_clip_projection-false`: two
        configs that train differently never share a directory (`method.*` stays out of Hydra's
        override_dirname, see config.label_excluded_keys)."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls.Config)}
        cells = [f"{TAG_NAMES.get(key, key)}{fmt(value)}" for key, value in cls.cell(cfg).items()]
        others = [f"{key}-{fmt(value)}" for key, value in cfg.items()
                  if key not in cls.grid and key != "_target_" and value != defaults.get(key)]
        return "_".join([cls.name, *cells, *others])


TAG_NAMES = {"alpha": "a", "beta": "b", "gamma": "g"}  # short forms in directory names


def arguments_schema(cls: type) -> type:
    """A dataclass of `_target_` and `cls.__init__`'s arguments, typed and defaulted as there: the
    method group's schema (`conf/method/<name>.yaml` starts from `base_<name>`), so Hydra refuses
    `method.T=abc` or a misspelt key the way it does in every other group, without a hand-written
    copy of each signature. It is reachable as `cls.Config`, so a pickled config (the SLURM
    launcher's) finds its node type again."""
    hints = typing.get_type_hints(cls.__init__)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))]
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = MISSING if param.default is param.empty else param.default
        fields.append((param.name, hints.get(param.name, Any), field(default=default)))
    schema = make_dataclass(f"{cls.__name__}Config", fields)
    schema.__module__, schema.__qualname__ = cls.__module__, f"{cls.__qualname__}.Config"
    return schema


def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"method.alpha={fmt(alpha)} is outside [0, 1]: alpha weights the KD term "
                         f"(L = alpha*L_kd + (1-alpha)*CE; alpha=0 is plain cross-entropy)")
    return float(alpha)


def fmt(value: Any) -> str:
    """0.5 → '0.5', 4.0 → '4', True → 'true': values as a person writes them in a directory name."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)
