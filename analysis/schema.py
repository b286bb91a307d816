"""The columns of `collect`'s frame and the helpers both run readers share."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from kdexp.run_record import MethodId, column_types

from .methods import UnknownMethod, identify

# "unknown method": a run whose method class cannot be imported; its numbers are read but not
# tabulated (its KD column and grid cell come from the class).
STATUSES = ("completed", "failed", "incomplete", "corrupt", "duplicate", "unknown method")

# Every column a run record fills (kdexp.run_record: each field of it, under the column name it
# declares), between those analysis adds: where the run is and what became of it, its pair, what it
# derives from the record and the files beside it, and the configuration that tells runs apart.
RECORD_COLUMNS = column_types()
COLUMNS = ["source", "run_dir", "status", "reason", "notes", "pair", *RECORD_COLUMNS,
           "clipped_epoch_fraction",  # of the epochs in metrics.jsonl, those whose gradient norm was clipped
           "precision", "numerics",  # reference | fast (analysis/numerics.py); null: not recorded
           "finished_at", "config_hash", "config"]
INT_COLUMNS = [c for c, kind in RECORD_COLUMNS.items() if kind is int]
FLOAT_COLUMNS = [c for c, kind in RECORD_COLUMNS.items() if kind is float] + ["clipped_epoch_fraction", "finished_at"]


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


def method_of(method_cfg: dict) -> tuple[MethodId | None, str | None]:
    """The identity of the class `method_cfg` names, or None and why the method is unknown."""
    try:
        return identify(method_cfg), None
    except UnknownMethod as err:
        return None, str(err)


def clipped_fraction(history: list[dict], clip_norm: float | None) -> float | None:
    """Fraction of epochs whose largest pre-clip gradient norm exceeded the clip threshold."""
    norms = [h["grad_norm_max"] for h in history if isinstance(h.get("grad_norm_max"), (int, float))]
    if not norms or clip_norm is None:
        return None
    return sum(n > clip_norm for n in norms) / len(norms)


def config_hash(flat: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]
