"""Experiment trackers (the `logger` group): TensorBoard, W&B and MLflow follow a run as it trains.
They add to the run's own files, never replace them: metrics.jsonl and result.json stay the record.
A tracker is one module here (a `Tracker` subclass) and one `conf/logger/<name>.yaml`; the job
drives them through `tracking.Tracking`."""
from __future__ import annotations

import importlib
import pkgutil

from kdexp.trackers.base import Tracker


def tracker_classes() -> list[type[Tracker]]:
    """Every tracker defined in this package (importing each module defines its class; none
    imports its client until it starts)."""
    for module in pkgutil.iter_modules(__path__, prefix=f"{__name__}."):
        importlib.import_module(module.name)
    return [cls for cls in Tracker.__subclasses__() if cls.__module__.startswith(__name__)]
