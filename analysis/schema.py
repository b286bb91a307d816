"""The columns of `collect`'s frame and the helpers both run readers share."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import yaml

from .methods import UnknownMethod, identify

# "unknown method": a run whose method class cannot be imported; its numbers are read but not
# tabulated (its KD column and grid cell come from the class).
STATUSES = ("completed", "failed", "incomplete", "corrupt", "duplicate", "unknown method")

COLUMNS = [
    # identity and state
    "source", "run_dir", "status", "reason", "notes", "experiment", "protocol", "kind",
    # configuration
    # a teacher is named by arch, stem, width, seed, init and label smoothing (kdexp.teachers); a
    # network's init is null (from scratch), "imagenet" or a weights file
    "pair", "teacher", "teacher_stem", "teacher_width", "teacher_seed", "teacher_init", "teacher_label_smoothing",
    "student", "stem", "width", "init", "label_smoothing", "image_size",
    # method: the class's name; kd: its KD column (label); hparams: its grid cell {key: value};
    # cell: that cell as tables show it ("α=0.5, T=4"); grid: {key: display symbol} (methods.py)
    "method", "kd", "hparams", "cell", "grid", "seed", "epochs", "val_size", "data",
    "clip_norm",
    # metrics (accuracies are fractions in [0, 1])
    "epochs_completed", "best_val_acc", "best_val_epoch", "test_at_best_val", "test_final",
    "best_test", "best_test_epoch", "agreement", "kl_t1", "kl_t4", "teacher_test_acc",
    "grad_norm_max", "proj_grad_norm_max", "clip_fraction", "clipped_epoch_fraction",
    "wall_seconds", "train_seconds", "images_per_s", "device", "precision",
    "numerics",  # reference | fast (analysis/numerics.py); null: not recorded
    "params_student", "params_method", "params_teacher",
    "gflops_student", "gflops_teacher",  # forward GFLOPs per image at the run's input size
    "error", "failed_epoch", "kdexp_version", "git_commit", "torch", "cuda", "finished_at",
    # provenance of the configuration itself
    "config_hash", "config",
]
INT_COLUMNS = ["teacher_width", "teacher_seed", "width", "image_size", "seed", "epochs", "val_size",
                "epochs_completed", "best_val_epoch", "best_test_epoch", "failed_epoch",
                "params_student", "params_method", "params_teacher"]
FLOAT_COLUMNS = ["teacher_label_smoothing", "label_smoothing", "clip_norm", "best_val_acc", "test_at_best_val", "test_final",
                 "best_test", "agreement", "kl_t1", "kl_t4", "teacher_test_acc", "grad_norm_max",
                 "proj_grad_norm_max", "clip_fraction", "clipped_epoch_fraction", "wall_seconds",
                 "train_seconds", "images_per_s", "gflops_student", "gflops_teacher", "finished_at"]


# What a run saved before these keys existed trained with (as kdexp.teachers.UNRECORDED says); the
# study's runs too (CIFAR at 32 pixels, from scratch, no label smoothing).
UNRECORDED = {"init": None, "label_smoothing": 0.0, "image_size": 32}


def coerce_types(row: dict[str, Any]) -> dict[str, Any]:
    """Numbers where numbers belong: a hand-edited or foreign file may hold anything."""
    for column in FLOAT_COLUMNS:
        value = row[column]
        row[column] = float(value) if _is_number(value) and math.isfinite(value) else None
    for column in INT_COLUMNS:
        value = row[column]
        row[column] = int(value) if _is_number(value) and float(value).is_integer() else None
    return row


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_fraction(value: Any) -> bool:
    """An accuracy as the files store it: a finite number in [0, 1]."""
    return _is_number(value) and math.isfinite(value) and 0 <= value <= 1


def load_yaml(path: Path) -> Any:
    """A YAML file, with libyaml where PyYAML has it: ~10x faster, which matters at thousands of runs."""
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def mark(row: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
    """The row of a run that is not averaged in, with its status and why."""
    row.update(status=status, reason=reason)
    return row


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def empty_row(run_dir: Path, source: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(source=source, run_dir=str(run_dir), notes="")
    return row


def set_method(row: dict[str, Any], method_cfg: dict) -> str | None:
    """The method columns from the class `method_cfg` names; None, or why the method is unknown."""
    try:
        identity = identify(method_cfg)
    except UnknownMethod as err:
        return str(err)
    row.update(method=identity.name, kd=identity.kd, hparams=identity.hparams, cell=identity.cell,
               grid=identity.grid)
    return None


def clipped_fraction(history: list[dict], clip_norm: float | None) -> float | None:
    """Fraction of epochs whose largest pre-clip gradient norm exceeded the clip threshold."""
    norms = [h["grad_norm_max"] for h in history if isinstance(h.get("grad_norm_max"), (int, float))]
    if not norms or clip_norm is None:
        return None
    return sum(n > clip_norm for n in norms) / len(norms)


def config_hash(flat: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]
