"""A run's method identity, read from the class its config names (`method._target_`).

Nothing here knows a method by name: the class says what it is called (`name`), which KD column
its runs go to (`label`: "logit", "feature(bugged)"), which hyperparameters make a grid cell
(`grid`, with the symbols tables show) and whether it distils at all (`needs_teacher`; runs of a
method without a teacher are the "none" column: baselines and teachers). A user's method works the
same way once its module can be imported.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from kdexp.methods.base import DistillationMethod

NO_KD = "none"  # the KD column of runs whose method needs no teacher


class UnknownMethod(Exception):
    """The class a config names cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class MethodIdentity:
    name: str                  # the class's `name`: "logit"
    kd: str                    # the KD column: "logit(std)", "feature(bugged)", "none"
    hparams: dict[str, Any]    # the grid cell, in the grid's order: {"alpha": 0.5, "T": 4.0}
    cell: str                  # the cell as tables show it: "α=0.5, T=4"
    grid: dict[str, str]       # grid key -> display symbol: {"alpha": "α", "T": "T"}


def identify(method_cfg: Mapping[str, Any]) -> MethodIdentity:
    """The identity of a run's `method` node; UnknownMethod if its class cannot be used."""
    target = method_cfg.get("_target_")
    if not isinstance(target, str) or not target:
        raise UnknownMethod("the config has no method._target_ (the method's class), so its method is unknown")
    cls = method_class(target)
    cfg = {**_defaults(cls), **method_cfg}  # a run saved before an argument existed trained with its default
    try:
        hparams = {key: _number(value) for key, value in cls.cell(cfg).items()}
        kd = cls.label(cfg) if cls.needs_teacher else NO_KD
        return MethodIdentity(cls.name, kd, hparams, cls.cell_label(cfg), dict(cls.grid))
    except Exception as err:  # a user's method may fail in any way: say whose code failed
        raise UnknownMethod(f"method._target_ {target}: reading its identity (label, cell) failed with "
                            f"{type(err).__name__}: {err}") from err


@functools.lru_cache(maxsize=None)
def method_class(target: str) -> type[DistillationMethod]:
    """The class `target` names (imported once per analysis, however many runs name it)."""
    module_name, _, class_name = target.rpartition(".")
    fix = ("put the directory holding its module on PYTHONPATH (PYTHONPATH=/path/to/dir python -m analysis "
           "...) or install its package, then rerun")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ModuleNotFoundError as err:
        raise UnknownMethod(f"method._target_ {target} cannot be imported (no module named {err.name!r}): "
                            f"{fix}") from err
    except AttributeError as err:
        raise UnknownMethod(f"method._target_ {target}: module {module_name} has no class {class_name} "
                            f"(renamed or removed since the run?)") from err
    except Exception as err:  # the module exists but fails to import
        raise UnknownMethod(f"method._target_ {target}: importing {module_name} failed with "
                            f"{type(err).__name__}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, DistillationMethod)):
        raise UnknownMethod(f"method._target_ {target} is not a kdexp DistillationMethod subclass")
    return cls


def _defaults(cls: type[DistillationMethod]) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls.Config)
            if f.default is not dataclasses.MISSING and f.default != MISSING}


def _number(value: Any) -> Any:
    """4 and 4.0 are one cell (a sweep typed `T=4` against a schema's 4.0); a list is a tuple, so a
    cell's values can be grouped and sorted."""
    if isinstance(value, (list, tuple)):
        return tuple(_number(v) for v in value)
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
