"""Find every run under one or more roots and read each into one row of a DataFrame.

Everything comes from the files a run wrote (`.hydra/config.yaml`, `result.json`,
`metrics.jsonl` for kdexp; `results.json` + `fidelity.json` for the study), never from
directory names. Runs that cannot be used stay in the frame with a `status` other than
"completed" and a `reason`, so the report can list them instead of silently dropping them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd
import yaml

from kdexp import records

from . import numerics, study_format
from .schema import (COLUMNS, FLOAT_COLUMNS, INT_COLUMNS, UNRECORDED, clipped_fraction, coerce_types, config_hash, empty_row,
                     is_fraction, load_yaml, mark, one_line, set_method)

CONFIG_FILE = Path(".hydra") / "config.yaml"
# kdexp.check's record: its dir is a canary (analysis/canary.py), never a run, and holds none.

# Config keys that say where/how a run executed, not what it computed: they do not make two
# runs different configurations (a run repeated on another machine is a duplicate).
# The speed settings (the `execution` group, and the trainer.* keys that held them before it) are
# how a run executed too; its numerics (reference | fast) is a column of its own, and a reference and
# a fast run of one configuration are neither duplicates nor averaged together (_mark_duplicates,
# aggregate.SPLIT_COLUMNS).
ENV_KEY = re.compile(
    r"^(paths\..*|hydra\..*|dry_run|retry_failed|export_teacher|teacher\.ckpt|data\.root|"
    r"data\.download|data\.verify_md5|data\.num_workers|trainer\.device|trainer\.progress|"
    r"execution|execution\..*|trainer\.(amp|channels_last|fused|compile|teacher_cache))$"
)

# Config keys that already have a column; any other key that varies between otherwise equal
# runs becomes an extra grouping column in the tables (see aggregate.extra_keys).
# A method's arguments need no entry: its grid keys are the `hparams` column and a switch that
# makes a variant is in its `kd` label, so neither varies within a cell.
KNOWN_CONFIG_KEYS = frozenset({
    "experiment_name", "protocol_name", "seed", "model.arch", "model.stem", "model.width",
    "teacher.arch", "teacher.stem", "teacher.width", "teacher.seed", "teacher.init", "teacher.label_smoothing",
    "model.init", "trainer.label_smoothing", "data.image_size", "method._target_", "trainer.epochs",
    "data.name", "data.val_size",
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
    frame = pd.DataFrame.from_records([coerce_types(r) for r in rows], columns=COLUMNS)
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
        cfg = load_yaml(run_dir / CONFIG_FILE)
        if not isinstance(cfg, dict):
            raise ValueError("not a mapping")
    except FileNotFoundError:
        return mark(row, "corrupt", f"no {CONFIG_FILE}: the configuration is unknown")
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as err:
        return mark(row, "corrupt", f"{CONFIG_FILE} is not valid YAML ({one_line(err)})")
    cfg = resolve_interpolations(cfg)
    try:
        result = records.read_result(run_dir)
    except (ValueError, UnicodeDecodeError) as err:
        result, result_error = None, one_line(err)
    else:
        result_error = (None if result is None or isinstance(result, dict)
                        else f"{run_dir / records.RESULT_FILE} is not a JSON object")
    unknown_method = _fill_config(row, cfg)

    history, history_note = _read_metrics(run_dir)
    row["notes"] = history_note
    row["clipped_epoch_fraction"] = clipped_fraction(history, row["clip_norm"])
    row["epochs_completed"] = len(history)

    if result_error:
        return mark(row, "corrupt", result_error)
    if result is None:
        if cfg.get("dry_run") is True:
            return mark(row, "incomplete", "dry run: composed and validated, never trained")
        return mark(row, "incomplete", _no_result(len(history)))
    if result.get("schema_version") != records.SCHEMA_VERSION:
        return mark(row, "corrupt",
                        f"unsupported {records.RESULT_FILE} schema_version {result.get('schema_version')!r}")
    row["finished_at"] = (run_dir / records.RESULT_FILE).stat().st_mtime
    _fill_result(row, result)
    if result.get("status") == "failed":
        where = f" in epoch {result.get('failed_epoch')}" if result.get("failed_epoch") is not None else ""
        return mark(row, "failed", f"failed{where}: {result.get('error')}")
    if result.get("status") != "completed":
        return mark(row, "corrupt", f"unknown status {result.get('status')!r}")
    if not is_fraction(row["test_final"]):
        return mark(row, "corrupt", f"{records.RESULT_FILE} has no valid test_acc_final")
    if unknown_method:  # a finished run whose KD column and grid cell cannot be told
        return mark(row, "unknown method", unknown_method)
    row["status"] = "completed"
    return row


def _no_result(epochs_logged: int) -> str:
    """What a run dir without result.json can be: a job still running or killed (no process
    writes result.json on SIGKILL or a node failure), or one that stopped before its first epoch."""
    if epochs_logged:
        return (f"no {records.RESULT_FILE} after {epochs_logged} epoch(s) logged (running, or killed: "
                "rerun the same command to resume)")
    return (f"no {records.RESULT_FILE} and no epoch logged (running, or stopped before its first epoch: "
            "see its train.log)")


def _fill_config(row: dict[str, Any], cfg: dict) -> str | None:
    """The configuration columns; returns why the method is unknown, or None."""
    model, teacher, method, trainer, data = (_node(cfg, key)
                                             for key in ("model", "teacher", "method", "trainer", "data"))
    row.update(
        experiment=cfg.get("experiment_name"), protocol=cfg.get("protocol_name"),
        student=model.get("arch"), stem=model.get("stem"), width=model.get("width"),
        init=model.get("init", UNRECORDED["init"]),
        label_smoothing=trainer.get("label_smoothing", UNRECORDED["label_smoothing"]),
        image_size=data.get("image_size", UNRECORDED["image_size"]),
        seed=cfg.get("seed"), epochs=trainer.get("epochs"), clip_norm=trainer.get("clip_norm", 1.0),
        val_size=data.get("val_size", 0), data=data.get("name"),
        # Provisional until result.json says: a run without a teacher may be a teacher or a baseline.
        kind="student" if teacher.get("arch") else None,
    )
    if teacher.get("arch"):
        row.update(teacher=teacher["arch"], teacher_stem=teacher.get("stem"),
                   teacher_width=teacher.get("width"), teacher_seed=teacher.get("seed"),
                   teacher_init=teacher.get("init", UNRECORDED["init"]),
                   teacher_label_smoothing=teacher.get("label_smoothing", UNRECORDED["label_smoothing"]))
        row["pair"] = f"{row['teacher']}→{row['student']}"
    unknown_method = set_method(row, method)
    flat = {k: v for k, v in flatten(cfg).items() if not ENV_KEY.match(k)}
    row["config"] = flat
    row["config_hash"] = config_hash(flat)
    return unknown_method


def _node(cfg: dict, key: str) -> dict:
    value = cfg.get(key)
    return value if isinstance(value, dict) else {}


def _fill_result(row: dict[str, Any], result: dict) -> None:
    if result.get("kind"):
        row["kind"] = result["kind"]
    fidelity, params, gflops = _node(result, "fidelity"), _node(result, "params"), _node(result, "gflops")
    execution = _node(result, "execution")
    row.update(
        epochs_completed=result.get("epochs_completed", row["epochs_completed"]),
        best_val_acc=result.get("best_val_acc"), best_val_epoch=result.get("best_val_epoch"),
        test_at_best_val=result.get("test_acc_at_best_val"), test_final=result.get("test_acc_final"),
        best_test=result.get("best_test_acc"), best_test_epoch=result.get("best_test_epoch"),
        agreement=fidelity.get("agreement"), kl_t1=fidelity.get("kl_t1"), kl_t4=fidelity.get("kl_t4"),
        teacher_test_acc=fidelity.get("teacher_test_acc"),
        grad_norm_max=result.get("grad_norm_max"), proj_grad_norm_max=result.get("proj_grad_norm_max"),
        clip_fraction=result.get("clip_fraction"), wall_seconds=result.get("wall_seconds"),
        train_seconds=result.get("train_seconds"), images_per_s=result.get("images_per_s"),
        device=result.get("device"), precision=execution.get("precision"),
        numerics=numerics.of_execution(execution),
        params_student=params.get("student"),
        params_method=params.get("method"), params_teacher=params.get("teacher"),
        gflops_student=gflops.get("student"), gflops_teacher=gflops.get("teacher"),
        error=result.get("error"), failed_epoch=result.get("failed_epoch"),
        kdexp_version=result.get("kdexp_version"), git_commit=result.get("git_commit"),
        torch=result.get("torch"), cuda=result.get("cuda"),
    )


def _read_metrics(run_dir: Path) -> tuple[list[dict], str]:
    """The per-epoch log up to its first unreadable line, and a note saying what was cut."""
    path = run_dir / records.METRICS_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return [], ""
    except UnicodeDecodeError:
        return [], f"{records.METRICS_FILE} is not text; curves unavailable"
    entries = [line for line in lines if line.strip()]
    try:  # one decode of the whole log is several times faster than one per line
        history = json.loads("[" + ",".join(entries) + "]")
    except json.JSONDecodeError:
        history = None
    if history is not None and len(history) == len(entries) and all(isinstance(h, dict) for h in history):
        return history, ""
    history = []  # something is wrong: find the first bad line
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return history, (f"{records.METRICS_FILE} line {number} is not valid JSON (truncated?); "
                             f"curves use the {len(history)} epochs before it")
        if not isinstance(entry, dict):
            return history, f"{records.METRICS_FILE} line {number} is not a JSON object"
        history.append(entry)
    return history, ""


def load_history(run_dir: str | Path, source: str) -> list[dict]:
    """Per-epoch history of one run (for curves); unreadable tails are already noted by collect."""
    if source == "study":
        return study_format.read_history(Path(run_dir))
    return _read_metrics(Path(run_dir))[0]


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


