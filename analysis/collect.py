"""Find every run under one or more roots and read each into one row of a DataFrame.

Everything comes from the files a run wrote (`.hydra/config.yaml`, `result.json`,
`metrics.jsonl` for kdexp; `results.json` + `fidelity.json` for the study), never from
directory names. Runs that cannot be used stay in the frame with a `status` other than
"completed" and a `reason`, so the report can list them instead of silently dropping them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd
import yaml

from kdexp import records
from kdexp.execution import NUMERICS_KEYS, RESULT_NEUTRAL_KEYS
from kdexp.records import CONFIG_FILE
from kdexp.run_record import SCHEMA_VERSION, RunRecord, TeacherId

from . import numerics, study_format
from .schema import (COLUMNS, FLOAT_COLUMNS, INT_COLUMNS, clipped_fraction, coerce_types, config_hash, empty_row,
                     is_fraction, mark, method_of, one_line)

V1 = 1  # the result.json written before the run record (RunRecord.from_v1 reads it)
# kdexp.check's record: its dir is a canary (analysis/canary.py), never a run, and holds none.

# Config keys that do not make two runs different configurations (a run repeated on another machine
# is a duplicate): those that change no result, and those that change its numerics but not its
# recipe (kdexp/execution.py: the numerics are a column of their own, and a reference and a fast run
# of one configuration are neither duplicates nor averaged together: _mark_duplicates,
# aggregate.SPLIT_COLUMNS); teacher.ckpt, whose teacher the identity columns and the recorded file
# hash name; and Hydra's own.
ENV_KEY = re.compile("^({})$".format("|".join(
    rf"{re.escape(key)}(\..*)?" for key in (*RESULT_NEUTRAL_KEYS, *NUMERICS_KEYS, "teacher.ckpt", "hydra"))))

# Config keys that already have a column; any other key that varies between otherwise equal
# runs becomes an extra grouping column in the tables (see aggregate.extra_keys).
# A method's arguments need no entry: its grid keys are the `hparams` column and a switch that
# makes a variant is in its `kd` label, so neither varies within a cell.
KNOWN_CONFIG_KEYS = frozenset({
    "experiment_name", "protocol_name", "seed", "model.arch", "model.stem", "model.width", "model.init",
    "trainer.label_smoothing", "data.image_size", "method._target_", "trainer.epochs", "data.name", "data.val_size",
    *TeacherId.config_keys("student"),
})


def collect(roots: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """One row per run directory found recursively under `roots` (a path or several).

    Columns are `schema.COLUMNS`; `status` is one of `schema.STATUSES`. Of several completed
    runs of one configuration (same `config_hash`) the newest is kept, the others marked "duplicate".
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    rows = []
    for root in roots:
        for run_dir, source in find_run_dirs(Path(root)):
            if source == "canary":
                continue
            read = study_format.read_study_run if source == "study" else read_kdexp_run
            rows.append(read(run_dir))
    study_format.assign_teacher_kind(rows)
    _mark_duplicates(rows)
    # COLUMNS first, in their order; then what newer records hold besides (a number a later kdexp measures)
    columns = list(dict.fromkeys([*COLUMNS, *(key for row in rows for key in row)]))
    frame = pd.DataFrame.from_records([coerce_types(r) for r in rows], columns=columns)
    # Explicit dtypes: a column that is empty for every run would otherwise be `object`.
    frame[INT_COLUMNS] = frame[INT_COLUMNS].astype("Int64")
    frame[FLOAT_COLUMNS] = frame[FLOAT_COLUMNS].astype("float64")
    return frame


def find_run_dirs(root: Path) -> Iterator[tuple[Path, str]]:
    """(dir, "kdexp" | "study" | "canary") for every directory holding a run's files or a canary's, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        kind = dir_kind(dirpath, filenames, dirnames)
        if kind is not None:
            yield Path(dirpath), kind
        if kind == "canary":
            dirnames[:] = []  # whatever the check left beside its record is no run
            continue
        # Hidden dirs hold Hydra/submitit bookkeeping, never runs; a run dir may hold nested runs.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))


def dir_kind(dirpath: str, filenames: Iterable[str], dirnames: Iterable[str]) -> str | None:
    """"canary" | "study" | "kdexp" for a directory holding a canary's or a run's files (given its
    entries, as os.walk lists them), else None."""
    names = set(filenames)
    if records.CHECK_FILE in names:
        return "canary"
    if study_format.RESULTS_FILE in names:
        return "study"
    if (records.RESULT_FILE in names or records.METRICS_FILE in names
            or (".hydra" in dirnames and os.path.isfile(os.path.join(dirpath, CONFIG_FILE)))):
        return "kdexp"
    return None


def run_dir_kind(directory: Path) -> str | None:
    """dir_kind of an existing directory (None where it is missing or cannot be listed)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return None
    files = [e.name for e in entries if not e.is_dir()]
    return dir_kind(str(directory), files, [e.name for e in entries if e.is_dir()])


def read_kdexp_run(run_dir: Path) -> dict[str, Any]:
    row = empty_row(run_dir, "kdexp")
    try:
        result = records.read_result(run_dir)
    except (ValueError, UnicodeDecodeError) as err:
        result, result_error = None, one_line(err)
    else:
        result_error = None
    if result is not None and result.get("schema_version") == SCHEMA_VERSION:
        record, unknown_method, dry_run = RunRecord.from_json(result), _unknown(result), False
    else:
        try:
            cfg = resolve_interpolations(records.read_config(run_dir))
        except FileNotFoundError:
            return mark(row, "corrupt", f"no {CONFIG_FILE}: the configuration is unknown")
        except (yaml.YAMLError, ValueError, UnicodeDecodeError) as err:
            return mark(row, "corrupt", f"{CONFIG_FILE} is not valid YAML ({one_line(err)})")
        v1 = result if result is not None and result.get("schema_version") == V1 else None
        method, unknown_method = method_of(cfg.get("method") if isinstance(cfg.get("method"), dict) else {})
        record, dry_run = RunRecord.from_v1(cfg, v1, method), cfg.get("dry_run") is True
    _fill(row, record)

    history, history_note = records.read_history(run_dir)
    row["notes"] = history_note
    row["clipped_epoch_fraction"] = clipped_fraction(history, row["clip_norm"])
    if result is None or "epochs_completed" not in result:
        row["epochs_completed"] = len(history)

    if result_error:
        return mark(row, "corrupt", result_error)
    if result is None:
        if dry_run:
            return mark(row, "incomplete", "dry run: composed and validated, never trained")
        return mark(row, "incomplete", _no_result(len(history)))
    if result.get("schema_version") not in (V1, SCHEMA_VERSION):
        return mark(row, "corrupt",
                        f"unsupported {records.RESULT_FILE} schema_version {result.get('schema_version')!r}")
    row["finished_at"] = (run_dir / records.RESULT_FILE).stat().st_mtime
    if result.get("status") == "failed":
        where = f" in epoch {result.get('failed_epoch')}" if result.get("failed_epoch") is not None else ""
        return mark(row, "failed", f"failed{where}: {result.get('error')}")
    if not is_fraction(row["test_final"]):
        return mark(row, "corrupt", f"{records.RESULT_FILE} has no valid test_acc_final")
    if unknown_method:  # a finished run whose KD column and grid cell cannot be told
        return mark(row, "unknown method", unknown_method)
    row["status"] = "completed"
    return row


def _unknown(result: dict) -> str | None:
    """Why a v2 record holds no method identity (its class could not be told when it ran), or None."""
    return None if isinstance(result.get("identity", {}).get("method"), dict) else "the record names no method"


def _no_result(epochs_logged: int) -> str:
    """What a run dir without result.json can be: a job still running or killed (no process
    writes result.json on SIGKILL or a node failure), or one that stopped before its first epoch."""
    if epochs_logged:
        return (f"no {records.RESULT_FILE} after {epochs_logged} epoch(s) logged (running, or killed: "
                "rerun the same command to resume)")
    return (f"no {records.RESULT_FILE} and no epoch logged (running, or stopped before its first epoch: "
            "see its train.log)")


def _fill(row: dict[str, Any], record: RunRecord) -> None:
    """The record's columns, and those analysis derives from it: the pair, the numerics, and the
    configuration that tells runs apart (without the keys that only say where it ran)."""
    row.update(record.columns())
    if row["teacher"]:
        row["pair"] = f"{row['teacher']}→{row['student']}"
    execution = record.cost.execution
    row.update(precision=execution.get("precision"), numerics=numerics.of_execution(execution))
    flat = {k: v for k, v in flatten(record.config).items() if not ENV_KEY.match(k)}
    row["config"] = flat
    row["config_hash"] = config_hash(flat)


def load_history(run_dir: str | Path, source: str) -> list[dict]:
    """Per-epoch history of one run (for curves); unreadable tails are already noted by collect."""
    if source == "study":
        return study_format.read_history(Path(run_dir))
    return records.read_history(Path(run_dir))[0]


_INTERPOLATION = re.compile(r"\$\{(\.*)([A-Za-z_][\w.]*)\}")


def resolve_interpolations(cfg: dict) -> dict:
    """Resolve `${a.b}` and relative `${.b}` references in Hydra's saved (unresolved) config.

    Hydra writes `.hydra/config.yaml` before resolving (e.g. `teacher.stem: ${model.stem}`).
    OmegaConf would resolve it but costs milliseconds per run; plain references are all the
    columns need. Resolver calls (`${oc.env:...}`) and unknown keys stay as written.
    """
    def lookup(path: list[str], node_path: list[str], dots: str, depth: int) -> Any:
        base = [] if not dots else node_path[: len(node_path) - (len(dots) - 1)]
        node: Any = cfg
        for part in base + path:
            if not isinstance(node, dict) or part not in node:
                raise KeyError(part)
            node = node[part]
        return resolve(node, base + path[:-1], depth + 1)

    def resolve(value: Any, node_path: list[str], depth: int = 0) -> Any:
        if not isinstance(value, str) or "${" not in value or depth > 20:
            return value
        whole = _INTERPOLATION.fullmatch(value)
        try:
            if whole:  # the whole value is one reference: keep the target's type
                return lookup(whole[2].split("."), node_path, whole[1], depth)
            return _INTERPOLATION.sub(
                lambda m: str(lookup(m[2].split("."), node_path, m[1], depth)), value)
        except KeyError:
            return value

    def walk(node: dict, node_path: list[str]) -> dict:
        return {k: walk(v, node_path + [k]) if isinstance(v, dict) else resolve(v, node_path)
                for k, v in node.items()}

    return walk(cfg, [])


def flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _mark_duplicates(rows: list[dict]) -> None:
    """Keep the newest completed run of each configuration and numerics (a fast rerun of a
    reference run is a run of its own); name it in the others' reason."""
    by_config: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "completed":
            by_config.setdefault((row["config_hash"], row["numerics"]), []).append(row)
    for same in by_config.values():
        if len(same) < 2:
            continue
        same.sort(key=lambda r: (r["finished_at"] or 0.0, r["run_dir"]), reverse=True)
        for row in same[1:]:
            mark(row, "duplicate", f"same configuration and seed as the newer {same[0]['run_dir']}")


