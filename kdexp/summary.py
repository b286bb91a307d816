"""The multirun's closing summary: how each job ended (kdexp/outcome.py), the reason for every job
that did not succeed, and the exit code for the whole sweep.

Jobs may run on other machines (SLURM), so each job leaves its outcome as a small file in the
sweep dir and the driver reads them back when the sweep ends. Several multiruns of one experiment
share its sweep dir (and job numbers) and may run at once, so each driver gets its own folder,
named by an id it puts in the environment its jobs inherit (locally and through sbatch). A job that
could not write its record (SLURM cancelled it, sbatch refused the array) gets one from the driver
(hydra_plugins/kdexp_launcher/slurm.py)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from kdexp import sweep_record
from kdexp.dry_run import remove_empty_dirs
from kdexp.outcome import EXIT_CODES, Outcome, multirun_exit_code
from kdexp.records import RESULT_FILE, atomic_write_json, unwritable

OUTCOMES = ".kdexp-outcomes"
RUN_ID_ENV = "KDEXP_MULTIRUN_ID"


def record_outcome(run_dir: Path, outcome: Outcome) -> None:
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    atomic_write_json(_folder(hc.sweep.dir) / f"{hc.job.num}.json",
                      outcome_record(outcome, run_dir, list(hc.overrides.task)))


def record_outcome_if_missing(sweep_dir: Path, job_num: int, outcome: Outcome, overrides: list[str]) -> str:
    """The driver's record of a job that may not have written its own; the job's own record wins.
    Returns the status recorded."""
    path = _folder(sweep_dir) / f"{job_num}.json"
    if path.exists():
        return json.loads(path.read_text())["status"]
    atomic_write_json(path, outcome_record(outcome, None, overrides))
    return outcome.status


def outcome_record(outcome: Outcome, run_dir: Path | None, overrides: list[str]) -> dict:
    """What a job leaves for the summary (summarize reads a list of these); run_dir None: a job
    whose run dir the driver does not know (it never started, or SLURM ended it)."""
    return {**dataclasses.asdict(outcome), "exit_code": outcome.exit_code,
            "run_dir": None if run_dir is None else str(run_dir), "overrides": overrides}


def _folder(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / OUTCOMES / os.environ.get(RUN_ID_ENV, "default")


# How the summary names each job that did not succeed; a reason shared by several jobs (sbatch's
# refusal, a driver stopped waiting) is said once, with their number.
LISTED = {"failed": "failed", "rejected": "rejected (nothing written)", "locked": "locked",
          "interrupted": "interrupted", "unfinished": "unfinished"}


def summarize(outcomes: list[dict]) -> tuple[str, int]:
    """The summary's text and the sweep's exit code, from the jobs' recorded outcomes."""
    counts = Counter(o["status"] for o in outcomes)
    lines = ["multirun summary: " + ", ".join(f"{counts[k]} {k}" for k in EXIT_CODES if counts[k])]
    listed = [o for o in outcomes if o["status"] in LISTED]
    shared = Counter((o["status"], o["reason"]) for o in listed)
    for status, reason in dict.fromkeys((o["status"], o["reason"]) for o in listed):
        if shared[status, reason] > 1 and status != "failed":
            lines.append(f"  {LISTED[status]}: {shared[status, reason]} jobs: {reason}")
            continue
        for o in (o for o in listed if (o["status"], o["reason"]) == (status, reason)):
            lines.append(f"  {LISTED[status]}: {_job_name(o)}{o['reason']}")
    lines += _dry_run_problems([o for o in outcomes if o["status"] == "dry_run" and o["reason"]])
    return "\n".join(lines), multirun_exit_code([o["exit_code"] for o in outcomes])


def _job_name(outcome: dict) -> str:
    """A failed run by its result file; a job without a run dir by its overrides; else nothing (a
    locked run's reason names its dir)."""
    if outcome["status"] == "failed" and outcome["run_dir"]:
        return f"{outcome['run_dir']}/{RESULT_FILE}: "
    if outcome["status"] in ("failed", "rejected", "unfinished"):
        return f"{' '.join(outcome['overrides'])}: "
    return ""


def _dry_run_problems(failing: list[dict]) -> list[str]:
    """A count per problem across the failing jobs (missing data: all of them), then one count and
    one command per missing teacher set, not a line per job."""
    if not failing:
        return []
    lines = [f"dry run: {len(failing)} jobs would fail"]
    others = Counter(problem for o in failing for problem in o["problems"])
    lines += [f"  {n} jobs: {problem}" for problem, n in others.items()]
    commands = sorted({o["train_teacher"] for o in failing if o["train_teacher"]})
    if commands:
        lines.append(f"  {sum(1 for o in failing if o['train_teacher'])} jobs need one of {len(commands)} "
                     f"missing teachers; train them once with:")
        lines += [f"    {command}" for command in _merge_models(commands)]
    return lines


def _merge_models(commands: list[str]) -> list[str]:
    """Commands that differ only in `model=` become one multirun over the models."""
    groups: dict[str, list[str]] = {}
    for command in commands:
        model = re.search(r" model=(\S+)", command).group(1)
        groups.setdefault(command.replace(f" model={model}", " model=MODELS", 1), []).append(model)
    return [template.replace("MODELS", ",".join(models)).replace("kdexp.train ", "kdexp.train -m ", 1)
            if len(models) > 1 else template.replace("MODELS", models[0]) for template, models in groups.items()]


class MultirunSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[RUN_ID_ENV] = uuid.uuid4().hex
        self.previous_record = sweep_record.snapshot(Path(config.hydra.sweep.dir))  # Hydra replaces it next

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        folder = _folder(sweep_dir)
        outcomes = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"), key=lambda p: int(p.stem))]
        shutil.rmtree(folder, ignore_errors=True)
        sweep_record.keep_what_ran(sweep_dir, self.previous_record, outcomes)
        remove_empty_dirs(folder.parent, Path(config.paths.output_dir))  # and the sweep dir, if nothing ran
        text, code = summarize(outcomes)
        print(text, flush=True)
        if code:  # Hydra turns a callback's exception into a warning: exit here so the driver fails
            bad = sum(1 for o in outcomes if o["exit_code"])
            print(f"{bad} of {len(outcomes)} jobs did not succeed (listed above)", file=sys.stderr, flush=True)
            sys.exit(code)


class OutputsWritable(Callback):
    """Hydra makes the run (or sweep) dir before any kdexp code runs, and a failure there is a
    traceback: check first, and say it in one line (exit 2, nothing written)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _require_writable(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _require_writable(config.hydra.sweep.dir)


def _require_writable(folder: str) -> None:
    why = unwritable(Path(folder))
    if why:  # SystemExit: Hydra turns a callback's exception into a warning
        print(f"kdexp: cannot write the output dir {folder}: {why}; set paths.output_dir (or KDEXP_OUTPUTS) "
              f"to a writable folder", file=sys.stderr, flush=True)
        sys.exit(2)
