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

from .aggregate import run_records
from .schema import load_yaml

HYDRA_FILE = Path(".hydra") / "hydra.yaml"
STUDY_FINAL_SEEDS = (0, 1, 2, 3, 4)
STUDY_TEACHER_SEEDS = (0, 1, 2)
_PRESENT = ("completed", "duplicate")
_SEVERITY = ("failed", "corrupt", "incomplete")  # the state shown when a cell has only such runs


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
    bad = frame["status"].isin(_SEVERITY)
    return frame[bad & ~frame["config_hash"].isin(done)]


def _sweep_cells(runs: list[dict[str, Any]]) -> list[CellState]:
    families: dict[tuple, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    sweeps: dict[tuple, dict[str, list[str]]] = {}
    for run in runs:
        sweep_info = _job_sweep(Path(run["run_dir"]))
        if sweep_info is None:
            continue
        sweep, overrides = sweep_info
        fixed = tuple(sorted((k, v) for k, v in overrides.items() if k not in sweep))
        family = (run["experiment"] or "", fixed, tuple((k, tuple(v)) for k, v in sorted(sweep.items())))
        sweeps[family] = sweep
        families[family][tuple(overrides[k] for k in sorted(sweep))].append(run)
    states = []
    for family, observed in families.items():
        experiment, fixed, _ = family
        keys = sorted(sweeps[family])
        fixed_text = " ".join(f"{k}={v}" for k, v in fixed) or "(no other overrides)"
        for values in itertools.product(*(sweeps[family][k] for k in keys)):
            state = _state(observed.get(values, []))
            if state:
                cell = " ".join(f"{k}={v}" for k, v in zip(keys, values))
                states.append(CellState(experiment, fixed_text, cell, state,
                                        tuple(r["run_dir"] for r in observed.get(values, []))))
    return states


def _state(runs: list[dict[str, Any]]) -> str | None:
    if not runs:
        return "missing"
    statuses = {r["status"] for r in runs}
    if statuses & set(_PRESENT):
        return None
    return next(s for s in _SEVERITY if s in statuses)


def _job_sweep(run_dir: Path) -> tuple[dict[str, list[str]], dict[str, str]] | None:
    """(swept key → expanded values, this job's overrides) or None for a job outside a multirun."""
    try:
        hydra = (load_yaml(run_dir / HYDRA_FILE) or {}).get("hydra") or {}
    except (OSError, yaml.YAMLError, AttributeError, UnicodeDecodeError):
        return None
    if not isinstance(hydra, dict) or hydra.get("mode") != "MULTIRUN":
        return None
    overrides = dict(_split_override(o) for o in ((hydra.get("overrides") or {}).get("task") or []))
    params = (hydra.get("sweeper") or {}).get("params") or {}
    sweep = {}
    for key, spec in params.items():
        values = expand(spec)
        # A key set on the command line overrides the sweep: for this job it is fixed, not swept.
        if values and overrides.get(key) in values:
            sweep[key] = values
    return sweep, overrides


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
            groups[(run["kind"], run["teacher"], run["student"], run["kd"], run["alpha"], run["T"],
                    run["stem"], run["epochs"])].append(run)
    states = []
    for (kind, teacher, student, kd, alpha, T, stem, _), same in groups.items():
        seeds = {r["seed"] for r in same}
        if kind == "teacher":
            expected = STUDY_TEACHER_SEEDS
        elif stem == "cifar" and len(seeds) > 1:
            expected = STUDY_FINAL_SEEDS
        else:
            continue
        name = f"{teacher}→{student}" if teacher else student
        hyper = "".join(f" {k}={v:g}" for k, v in (("α", alpha), ("T", T)) if v is not None)
        family = f"study protocol v2: {kind} {name} {kd}{hyper} ({stem} stem)"
        states += [CellState(same[0]["experiment"], family, f"seed={s}", "missing")
                   for s in expected if s not in seeds]
    return states
