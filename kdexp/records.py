"""The files a run leaves behind, and the only code that writes them.

A run dir holds `.hydra/` (written by Hydra when the run starts, but not by a start that skips
a finished run: see `kdexp.config.hydra_metadata_dir`), `metrics.jsonl` (one JSON object per evaluated
epoch, rewritten atomically from the checkpoint's history on resume), `result.json` (written
once, atomically, when the run ends: `status` is "completed" or "failed"; a completed run's is its
`kdexp.run_record.RunRecord`, schema_version 2) and `last.pt`; with a
`logger`, `trackers.json` (each tracker's run id and last logged epoch, so a resumed start continues
that run: kdexp/trackers/tracking.py) and what the tracker itself writes there.
Accuracies are fractions in [0, 1], as in the study's own files; tables turn them into percent.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import yaml

if TYPE_CHECKING:
    from kdexp.run_record import RunRecord

METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
CONFIG_FILE = Path(".hydra") / "config.yaml"  # Hydra's record of the run's config, unresolved
TRACKER_FILE = "trackers.json"
# What `python -m kdexp.check` writes into its --out (a canary's folder): its verdicts, and its log.
CHECK_FILE = "check.json"
CHECK_LOG = "check.log"
MULTIRUN_FILE = "multirun.yaml"  # Hydra's record of a multirun, in its sweep dir (kdexp/sweep_record.py)
RESULT_STATUSES = ("completed", "failed")  # what a result.json's `status` can be
SCHEMA_VERSION = 1  # of a failure's result.json (a completed run's is its RunRecord's)
log = logging.getLogger(__name__)
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results and teachers are shared files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path, name: str = "*") -> list[Path]:
    """The temp files atomic_write_bytes left in `folder` for `name` (`.<name>.*.tmp`) when its process
    was killed (SIGKILL skips its cleanup). Only for a caller that is the file's one writer now (it holds
    the run's lock, or the export's claim): another writer's temp file would be live."""
    stale = sorted(Path(folder).glob(f".{name}.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def clean_up_after_a_killed_start(folder: Path, name: str = "*") -> None:
    """Half-written files a killed process of this run (or export) left: this one is their only writer now."""
    for path in remove_stale_temporaries(folder, name):
        log.info("removed %s, left half-written by a killed process", path)


def unwritable(folder: Path) -> str | None:
    """Why no file can be created in `folder` (or, while it does not exist, in its nearest existing
    parent, where it will be made), or None when one can; the probe leaves nothing behind."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            return None
    except OSError as err:
        return f"{existing} is not writable ({err.strerror})"


def _jsonable(value: Any) -> Any:
    """NaN/inf are not JSON: store them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2) + "\n").encode())


def write_metrics(run_dir: Path, history: Iterable[dict]) -> None:
    """(Re)write the whole per-epoch log; called after every epoch with the full history."""
    lines = "".join(json.dumps(_jsonable(row)) + "\n" for row in history)
    atomic_write_bytes(Path(run_dir) / METRICS_FILE, lines.encode())


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-epoch log's readable epochs."""
    return read_history(run_dir)[0]


def read_history(run_dir: Path) -> tuple[list[dict], str]:
    """The per-epoch log (metrics.jsonl) up to its first unreadable line, and a note saying what was
    cut (empty: nothing). A killed write or a hand edit may leave anything there."""
    path = Path(run_dir) / METRICS_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return [], ""
    except UnicodeDecodeError:
        return [], f"{METRICS_FILE} is not text; curves unavailable"
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
            return history, (f"{METRICS_FILE} line {number} is not valid JSON (truncated?); "
                             f"curves use the {len(history)} epochs before it")
        if not isinstance(entry, dict):
            return history, f"{METRICS_FILE} line {number} is not a JSON object"
        history.append(entry)
    return history, ""


def write_result(run_dir: Path, result: dict) -> None:
    atomic_write_json(Path(run_dir) / RESULT_FILE, {"schema_version": SCHEMA_VERSION, **result})


def write_record(run_dir: Path, record: RunRecord) -> None:
    atomic_write_json(Path(run_dir) / RESULT_FILE, record.to_json())


def load_yaml(path: Path) -> Any:
    """A YAML file, with libyaml where PyYAML has it: ~10x faster, which matters at thousands of runs."""
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def read_config(run_dir: Path) -> dict:
    """The run's `.hydra/config.yaml` as Hydra wrote it (interpolations unresolved). ValueError: not a mapping."""
    cfg = load_yaml(Path(run_dir) / CONFIG_FILE)
    if not isinstance(cfg, dict):
        raise ValueError("not a mapping")
    return cfg


def read_result(run_dir: Path) -> dict | None:
    """The run's result, or None when it has not ended. Raises ValueError on a corrupt file: not
    JSON, or not an object with a known `status` (what every reader branches on)."""
    path = Path(run_dir) / RESULT_FILE
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(result, dict):
        raise ValueError(f"{path} is not a JSON object")
    if result.get("status") not in RESULT_STATUSES:
        raise ValueError(f"{path} has status {result.get('status')!r}, not one of {', '.join(RESULT_STATUSES)}")
    return result


def kept_result(run_dir: Path, retry_failed: bool) -> dict | None:
    """The result a new start of this run keeps, so it does not train: a completed one, or one that
    failed while training unless retrying. A run that failed before its first epoch (no data, no
    teacher yet: `failed_epoch` null) is redone, as is one with a corrupt result.json."""
    try:
        result = read_result(run_dir)
    except ValueError as err:
        log.warning("ignoring corrupt %s", err)
        return None
    if result is None or (result["status"] == "failed" and (retry_failed or result.get("failed_epoch") is None)):
        return None
    return result
