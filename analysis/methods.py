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
from typing import Any

from omegaconf import MISSING

from kdexp.methods.base import DistillationMethod
from kdexp.run_record import MethodId


class UnknownMethod(Exception):
    """The class a config names cannot be used; the message says which and what to do."""


def identify(method_cfg: Mapping[str, Any]) -> MethodId:
    """The identity of a run's `method` node, for the runs that do not record it (v1 result files,
    the study's); UnknownMethod if its class cannot be used."""
    target = method_cfg.get("_target_")
    if not isinstance(target, str) or not target:
        raise UnknownMethod("the config has no method._target_ (the method's class), so its method is unknown")
    cls = method_class(target)
    cfg = {**_defaults(cls), **method_cfg}  # a run saved before an argument existed trained with its default
    try:
        return MethodId.of_class(cls, cfg)
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
