"""Provenance: the canaries that guarded the runs, beside the runs' own code and environment.

`launch.study` submits `python -m kdexp.check` (the canary) before a study trains; it writes
`<output-dir>/<experiment>/canary/<job id>/check.json`, one per submission. A canary guards the runs
under the directory that holds its `canary/` folder. A canary dir is never a run
(collect.find_run_dirs); an unreadable check.json is a one-line verdict, never an error.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from kdexp.records import CHECK_FILE

from . import numerics
from .collect import find_run_dirs
from .schema import one_line
from .tables import DASH, Table

CANARY_DIR = "canary"  # <experiment dir>/canary/<job id>/check.json
SCHEMA_VERSION = 1
_EXAMPLES = 2  # runs named per reason in a note


@dataclass(frozen=True)
class Canary:
    path: Path                 # its check.json
    record: dict[str, Any]     # the file's content ({} where unreadable)
    problem: str | None = None  # why it could not be read

    @property
    def scope(self) -> Path:
        """The directory whose runs it guarded: the one holding its `canary/` folder (else its parent's)."""
        job_dir = self.path.parent
        return job_dir.parent.parent if job_dir.parent.name == CANARY_DIR else job_dir.parent

    @property
    def passed(self) -> bool:
        return self.problem is None and self.record.get("ok") is True

    @property
    def verdict(self) -> str:
        if self.problem:
            return f"unreadable: {self.problem}"
        if self.passed:
            return "passed"
        failed = self.record.get("failed")
        names = [str(n) for n in failed] if isinstance(failed, list) else []
        return "FAILED" + (f": {', '.join(names)}" if names else "")

    def env(self, key: str) -> Any:
        """One of its environment's fields (None where missing)."""
        environment = self.record.get("environment")
        return environment.get(key) if isinstance(environment, dict) else None

    def field(self, key: str) -> str | None:
        value = self.record.get(key)
        return None if value is None else str(value)

    @property
    def when(self) -> str:
        """When it finished (else started), to the minute."""
        return (self.field("finished") or self.field("started") or DASH)[:16]

    @property
    def gpu(self) -> str:
        """`NVIDIA A100-SXM4-80GB (79 GiB)`, or the device it ran on without a GPU."""
        name, memory = self.env("gpu"), self.env("gpu_memory_gib")
        if not name:
            return self.field("device") or DASH
        return f"{name} ({memory:.0f} GiB)" if isinstance(memory, (int, float)) else str(name)

    @property
    def commit(self) -> str:
        return str(self.env("git_commit") or DASH)[:12]

    @property
    def software(self) -> str:
        """`torch 2.5.1, CUDA 12.4, cuDNN 90100`."""
        parts = [(label, self.env(key)) for label, key in (("torch", "torch"), ("CUDA", "cuda"), ("cuDNN", "cudnn"))]
        return ", ".join(f"{label} {value}" for label, value in parts if value is not None) or DASH

    def line(self) -> str:
        """The canary in one line, for the terminal."""
        return (f"{self.verdict}: {self.path.parent} ({self.when}, {self.gpu}, driver {self.env('driver') or DASH}, "
                f"{self.software}, git {self.commit}, {self.field('execution') or DASH} profile)")


def read(path: Path) -> Canary:
    """A check.json as a Canary; what makes it unusable becomes its `problem`, never an exception."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return Canary(path, {}, f"{CHECK_FILE} is not valid JSON ({one_line(err)})")
    if not isinstance(record, dict):
        return Canary(path, {}, f"{CHECK_FILE} is not a JSON object")
    if record.get("schema_version") != SCHEMA_VERSION:
        return Canary(path, {}, f"unsupported {CHECK_FILE} schema_version {record.get('schema_version')!r}")
    if not isinstance(record.get("ok"), bool):
        return Canary(path, record, f"{CHECK_FILE} has no verdict (`ok` is {record.get('ok')!r})")
    return Canary(path, record)


def find(roots: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Canary]:
    """Every canary under `roots`, in path order."""
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    return [read(found / CHECK_FILE) for root in roots for found, source in find_run_dirs(Path(root))
            if source == "canary"]


# ---------------------------------------------------------------- which runs a canary vouches for
def _same(a: Any, b: Any) -> bool | None:
    """Whether two recorded versions agree (a short commit matches its full hash); None: one is unknown."""
    if a is None or b is None:
        return None
    a, b = str(a), str(b)
    return a.startswith(b) or b.startswith(a)


def on_its_code(canary: Canary, run: dict[str, Any]) -> bool:
    """The run's git commit and torch are the canary's (where both record them)."""
    return (_same(canary.env("git_commit"), run.get("git_commit")) is not False
            and _same(canary.env("torch"), run.get("torch")) is not False)


def vouches(canary: Canary, run: dict[str, Any]) -> bool:
    """A passing canary vouches for a run on its code whose numerics it checked: a fast run needs a
    canary of the fast profile."""
    return (canary.passed and on_its_code(canary, run)
            and (run.get("numerics") != numerics.FAST or canary.field("execution") == numerics.FAST))


def guarded(canary: Canary, runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs under the canary's directory."""
    return [r for r in runs if Path(r["run_dir"]).is_relative_to(canary.scope)]


def _why_not(run: dict[str, Any], canaries: list[Canary]) -> str:
    """Why no canary beside a run vouches for it."""
    passing = [c for c in canaries if c.passed]
    if not passing:
        return "no canary beside them passed"
    if not any(on_its_code(c, run) for c in passing):
        return "their git commit or torch differs from every passing canary's"
    return "they ran fast numerics (bf16/compile) and no passing canary on their code checked the fast profile"


def unvouched_notes(canaries: list[Canary], runs: list[dict[str, Any]]) -> list[str]:
    """Per canary directory, the runs no canary there vouches for, by reason, with examples; and the
    runs under no canary's directory."""
    by_scope: dict[Path, list[Canary]] = defaultdict(list)
    for c in canaries:
        by_scope[c.scope].append(c)
    notes, inside = [], set()
    for scope, beside in sorted(by_scope.items()):
        mine = guarded(beside[0], runs)
        inside.update(id(r) for r in mine)
        reasons: dict[str, list[dict]] = defaultdict(list)
        for run in mine:
            if not any(vouches(c, run) for c in beside):
                reasons[_why_not(run, beside)].append(run)
        if reasons:
            n = sum(len(rs) for rs in reasons.values())
            parts = [f"{len(rs)}: {why}, e.g. {' and '.join(_run_text(r) for r in rs[:_EXAMPLES])}."
                     for why, rs in sorted(reasons.items())]
            notes.append(f"{scope}: {n} of {len(mine)} completed run(s) beside its canaries are vouched for by "
                         "none. " + " ".join(parts))
    if outside := [r for r in runs if id(r) not in inside]:
        notes.append(f"{len(outside)} completed run(s) are under no canary's directory (trained without one: by "
                     f"hand, or with --skip-check), e.g. {', '.join(r['run_dir'] for r in outside[:_EXAMPLES])}.")
    return notes


def _run_text(run: dict[str, Any]) -> str:
    return (f"{run['run_dir']} (git {str(run.get('git_commit') or DASH)[:12]}, torch {run.get('torch') or DASH}, "
            f"{run.get('numerics') or numerics.UNRECORDED})")


# ---------------------------------------------------------------- tables
CANARY_NOTE = (
    "A canary (`python -m kdexp.check`, which launch.study submits before a study trains: "
    "<output-dir>/<experiment>/canary/<job id>/check.json) checks kdexp's GPU path on the nodes the study "
    "uses; it guards the runs under the directory that holds its canary/ folder. Verdict: passed, or FAILED "
    "with the checks that failed. On its code: the runs beside it whose git commit and torch equal the "
    "canary's (a run or canary that recorded neither counts as equal).")


def canary_table(canaries: list[Canary], runs: list[dict[str, Any]]) -> Table | None:
    """One row per canary: when, verdict, hardware and software, and the runs beside it."""
    if not canaries:
        return None
    rows = []
    for c in canaries:
        mine = guarded(c, runs)
        same = str(sum(on_its_code(c, r) for r in mine)) if c.record else DASH  # unreadable: unknown
        rows.append([str(c.path.parent), c.when, c.verdict,
                     f"{c.field('execution') or DASH}, {c.field('size') or DASH}", c.gpu,
                     str(c.env("driver") or DASH), c.software, c.commit, str(c.env("hostname") or DASH),
                     str(len(mine)), same])
    return Table("canaries", "Canaries: the GPU checks that guarded these runs",
                 ["Canary", "Finished", "Verdict", "Profile, size", "GPU", "Driver", "Software", "Git commit",
                  "Host", "Runs beside it", "On its code"], rows,
                 [CANARY_NOTE, *unvouched_notes(canaries, runs)])


def provenance_table(runs: list[dict[str, Any]]) -> Table | None:
    """The runs' own provenance: how many ran on each code, torch, CUDA, device and numerics."""
    if not runs:
        return None
    experiments: dict[tuple, list[str]] = defaultdict(list)
    for r in runs:
        key = (str(r.get("git_commit") or DASH)[:12], *(str(r.get(k) or DASH) for k in ("torch", "cuda", "device")),
               r.get("numerics") or numerics.UNRECORDED)
        experiments[key].append(r.get("experiment") or DASH)
    rows = [[*key, str(len(names)), ", ".join(sorted(set(names)))] for key, names in sorted(experiments.items())]
    return Table("provenance", "The runs' code and environment",
                 ["Git commit", "torch", "CUDA", "Device", "Numerics", "Runs", "Experiments"], rows,
                 ["Completed runs, as each result.json records them (the study's results.json records none of "
                  "these: '-'; its numerics are the reference by definition). Numerics: "
                  f"{numerics.REFERENCE} = {numerics.MEANING[numerics.REFERENCE]}; "
                  f"{numerics.FAST} = {numerics.MEANING[numerics.FAST]}."])
