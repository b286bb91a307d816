"""The cells a sweep was meant to produce, and those that have no completed run.

kdexp: every multirun job records its sweep in `.hydra/hydra.yaml`: `hydra.sweeper.params` (the
kd_grid and seeds groups, e.g. `method.alpha: 0.3,0.5,0.7`) and `hydra.overrides.task` (this
job's overrides, swept values included). A job's non-swept overrides name its family (e.g.
`pair=r50_to_r18`); the family's expected cells are the product of the swept values. A family
none of whose jobs left a directory cannot be seen here.
The study: its files carry no sweep, so protocol v2 gives the seeds (finals 0–4, teachers 0–2).
"""
from __future__ import annotations

import itertools
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kdexp.records import MULTIRUN_FILE, load_yaml

from .aggregate import UNNAMED, run_records
from .collect import ENV_KEY

HYDRA_FILE = Path(".hydra") / "hydra.yaml"
ONE_CELL = "(its only cell: every swept key was set on the command line)"
STUDY_FINAL_SEEDS = (0, 1, 2, 3, 4)
STUDY_TEACHER_SEEDS = (0, 1, 2)
_PRESENT = ("completed", "duplicate")
# Most severe first: a cell shows the worst. "unknown method": finished, but its method class cannot be
# imported, so it is in no table until it can (--strict fails on it).
UNFINISHED_STATUSES = ("failed", "corrupt", "unknown method", "incomplete")


@dataclass(frozen=True)
class CellState:
    """An expected cell without a completed run."""

    experiment: str
    family: str                   # the overrides shared by the sweep, or the study group
    cell: str                     # the swept values of this cell
    state: str                    # missing | failed | corrupt | incomplete
    run_dirs: tuple[str, ...] = ()


def problem_cells(frame: pd.DataFrame) -> list[CellState]:
    """Expected cells that are missing, or whose every run failed / is corrupt / is unfinished."""
    runs = run_records(frame)
    cells = _sweep_cells([r for r in runs if r["source"] == "kdexp"])
    cells += _study_cells([r for r in runs if r["source"] == "study" and r["status"] in _PRESENT])
    return sorted(cells, key=lambda c: (c.experiment, c.family, c.cell))


def unfinished_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """Failed / incomplete / corrupt runs whose configuration has no completed run elsewhere."""
    done = set(frame.loc[frame["status"].isin(_PRESENT), "config_hash"].dropna())
    bad = frame["status"].isin(UNFINISHED_STATUSES)
    return frame[bad & ~frame["config_hash"].isin(done)]


def _sweep_cells(runs: list[dict[str, Any]]) -> list[CellState]:
    """Each family's product of swept values; a cell is found wherever a job with exactly its
    overrides ran, in this family or another (e.g. an earlier multirun that swept a key this one pinned)."""
    jobs: dict[tuple, list[dict]] = defaultdict(list)   # (experiment, overrides) → runs
    families: dict[tuple, dict[str, list[str]]] = {}    # (experiment, fixed, sweep) → sweep
    multiruns = _Multiruns()
    for run in runs:
        sweep_info = _job_sweep(Path(run["run_dir"]), multiruns)
        if sweep_info is None:
            continue
        sweep, overrides = sweep_info
        experiment = run["experiment"] or UNNAMED
        jobs[(experiment, _frozen(overrides))].append(run)
        fixed = tuple(sorted((k, v) for k, v in overrides.items() if k not in sweep))
        families[(experiment, fixed, tuple((k, tuple(v)) for k, v in sorted(sweep.items())))] = sweep
    states: dict[tuple, CellState] = {}
    for (experiment, fixed, _), sweep in families.items():
        keys = sorted(sweep)
        fixed_text = " ".join(f"{k}={v}" for k, v in fixed) or "(no other overrides)"
        for values in itertools.product(*(sweep[k] for k in keys)):
            overrides = dict(fixed) | dict(zip(keys, values))
            found = jobs.get((experiment, _frozen(overrides)), [])
            state = _state(found)
            if state:
                cell = " ".join(f"{k}={v}" for k, v in zip(keys, values)) or ONE_CELL
                states.setdefault((experiment, _frozen(overrides)), CellState(
                    experiment, fixed_text, cell, state, tuple(r["run_dir"] for r in found)))
    return list(states.values())


def _frozen(overrides: dict[str, str]) -> tuple:
    return tuple(sorted(overrides.items()))


def _state(runs: list[dict[str, Any]]) -> str | None:
    if not runs:
        return "missing"
    statuses = {r["status"] for r in runs}
    if statuses & set(_PRESENT):
        return None
    return next(s for s in UNFINISHED_STATUSES if s in statuses)


def _job_sweep(run_dir: Path, multiruns: _Multiruns) -> tuple[dict[str, list[str]], dict[str, str]] | None:
    """(swept key → expanded values, this job's overrides) or None for a job outside a multirun.

    Keys that say where or how a job ran (retry_failed, dry_run, trainer.device, ...) are left out:
    a resubmission with retry_failed=true is the same cell, not another family.
    """
    hydra = _hydra_node(run_dir / HYDRA_FILE)
    if hydra is None or hydra.get("mode") != "MULTIRUN":
        return None
    overrides = _overrides((hydra.get("overrides") or {}).get("task"))
    params = (hydra.get("sweeper") or {}).get("params") or {}
    command_line = _command_line(run_dir, params, overrides, multiruns)
    sweep = {}
    for key, spec in params.items():
        if command_line is not None and key in command_line:
            continue  # the command line overrides the sweep: swept there or pinned (fixed)
        values = expand(spec)
        # A key set on the command line overrides the sweep: for this job it is fixed, not swept.
        if values and overrides.get(key) in values:
            sweep[key] = values
    for key, spec in (command_line or {}).items():
        if len(values := expand(spec)) > 1 and overrides.get(key) in values:
            sweep[key] = values  # a sweep typed on the command line (`seed=0,1`)
    return sweep, {k: v for k, v in overrides.items() if not ENV_KEY.match(k)}


def _hydra_node(path: Path) -> dict | None:
    try:
        hydra = (load_yaml(path) or {}).get("hydra")
    except (OSError, yaml.YAMLError, AttributeError, UnicodeDecodeError):
        return None
    return hydra if isinstance(hydra, dict) else None


def _overrides(task: Any) -> dict[str, str]:
    return dict(_split_override(o) for o in (task or []) if isinstance(o, str))


def _command_line(run_dir: Path, params: dict, overrides: dict[str, str],
                  multiruns: _Multiruns) -> dict[str, str] | None:
    """The overrides typed on the command line of this job's multirun (key → raw spec), or None.

    A job's own `hydra.overrides.task` cannot tell `seed=0` typed on the command line from seed 0
    of the sweep; Hydra's `multirun.yaml` in the sweep dir (an ancestor of the job's dir) records
    the command line, but only the latest multirun's. It is used for this job only if it describes
    it: the same sweep parameters, and every typed value agrees with the job's overrides.
    """
    hydra = multiruns.hydra_node(run_dir)
    if hydra is None or ((hydra.get("sweeper") or {}).get("params") or {}) != params:
        return None
    typed = dict(_split_raw(o) for o in ((hydra.get("overrides") or {}).get("task") or []) if isinstance(o, str))
    if all(overrides.get(k) in (expand(v) or [normalise(v)]) for k, v in typed.items()):
        return typed
    return None


class _Multiruns:
    """Hydra's `multirun.yaml` above each run dir (in its sweep dir), found and read once for all
    the run dirs that share it."""

    def __init__(self) -> None:
        self.nearest: dict[Path, Path | None] = {}
        self.nodes: dict[Path, dict | None] = {}

    def hydra_node(self, run_dir: Path) -> dict | None:
        path = self.file_above(run_dir.parent)
        if path is None:
            return None
        if path not in self.nodes:
            self.nodes[path] = _hydra_node(path)
        return self.nodes[path]

    def file_above(self, directory: Path) -> Path | None:
        visited = []
        for candidate in (directory, *directory.parents):
            if candidate in self.nearest:
                answer = self.nearest[candidate]
                break
            visited.append(candidate)
            if (candidate / MULTIRUN_FILE).is_file():
                answer = candidate / MULTIRUN_FILE
                break
        else:
            answer = None
        self.nearest.update(dict.fromkeys(visited, answer))
        return answer


def _split_raw(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def _split_override(text: str) -> tuple[str, str]:
    key, _, value = str(text).partition("=")
    return key.lstrip("+~"), normalise(value)


_RANGE = re.compile(r"^range\(\s*(-?\d+)\s*,\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?\)$")
_CHOICE = re.compile(r"^choice\((.*)\)$")


def expand(spec: Any) -> list[str]:
    """Values of a basic-sweeper parameter: `a,b,c`, `range(start, stop[, step])`, `choice(...)`.

    Anything else (glob, interval, nested lists) returns [] and is not treated as a sweep.
    """
    if isinstance(spec, list):
        return [normalise(v) for v in spec]
    text = str(spec).strip()
    if m := _RANGE.match(text):
        start, stop, step = int(m[1]), int(m[2]), int(m[3] or 1)
        return [str(v) for v in range(start, stop, step)]
    if m := _CHOICE.match(text):
        text = m[1]
    if any(ch in text for ch in "()[]{}"):
        return []
    return [normalise(v) for v in text.split(",")]


def normalise(value: Any) -> str:
    """One spelling per value, so `T=4`, `T=4.0` and a sweep's `4` name the same cell."""
    text = str(value).strip().strip("'\"")
    try:
        number = float(text)
    except ValueError:
        return text.lower() if text.lower() in ("true", "false", "null") else text
    return repr(int(number)) if number.is_integer() else repr(number)


def _study_cells(runs: list[dict[str, Any]]) -> list[CellState]:
    """Protocol v2: finals (KD and baselines, CIFAR stem, more than one seed) have seeds 0–4,
    teachers 0–2. A group with one seed is a stage-1 selection run and complete as it is."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        if run["protocol"] == "v2":
            groups[(run["kind"], run["teacher"], run["student"], run["kd"], run["cell"],
                    run["stem"], run["epochs"])].append(run)
    states = []
    for (kind, teacher, student, kd, cell, stem, _), same in groups.items():
        seeds = {r["seed"] for r in same}
        if kind == "teacher":
            expected = STUDY_TEACHER_SEEDS
        elif stem == "cifar" and len(seeds) > 1:
            expected = STUDY_FINAL_SEEDS
        else:
            continue
        name = f"{teacher}→{student}" if teacher else student
        family = f"study protocol v2: {kind} {name} {kd}{f' {cell}' if cell else ''} ({stem} stem)"
        states += [CellState(same[0]["experiment"], family, f"seed={s}", "missing")
                   for s in expected if s not in seeds]
    return states
