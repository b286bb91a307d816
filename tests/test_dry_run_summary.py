"""The dry run's multirun summary counts every problem its jobs found (missing data too, not only
missing teachers), and an unexpected error in a dry run points where its traceback is. In-process:
each job's dry run as kdexp.train's task runs it, its record as the summary reads it back."""
from __future__ import annotations

import json
from pathlib import Path

from helpers import compose_cfg
from kdexp import job, task
from kdexp.summary import outcome_record, summarize

# The command: a quickstart student grid on CIFAR-10 that is not on disk, no teacher trained.
MISSING_CIFAR = ("protocol=quickstart", "experiment=quickstart", "data.name=cifar10", "data.root=/missing",
                 "dry_run=true")


def _dry_job(out: Path, seed: int) -> dict:
    cfg = compose_cfg(*MISSING_CIFAR, f"paths.output_dir={out}", f"seed={seed}")
    run_dir = out / f"seed{seed}"
    outcome = job.run(cfg, run_dir)
    return json.loads(json.dumps(outcome_record(outcome, run_dir, [f"seed={seed}"])))  # as the job file holds it


def test_dry_run_summary_names_missing_data_beside_missing_teachers(tmp_path):
    text, code = summarize([_dry_job(tmp_path, seed) for seed in (0, 1)])
    assert code == 2
    lines = text.splitlines()
    assert "dry run: 2 jobs would fail" in lines
    [data] = [line for line in lines if "CIFAR-10 not found" in line]
    assert data.startswith("  2 jobs: CIFAR-10 not found under data.root=/missing (expected data_batch_1")
    assert "is missing" not in data  # the teacher is counted on its own line, with its command
    assert "  2 jobs need one of 1 missing teachers; train them once with:" in lines
    assert not list(tmp_path.rglob("*"))  # a dry run writes nothing


def test_single_dry_run_still_says_every_problem_in_one_line(tmp_path):
    cfg = compose_cfg(*MISSING_CIFAR, f"paths.output_dir={tmp_path}")
    outcome = job.run(cfg, tmp_path / "run")
    assert outcome.exit_code == 2 and "\n" not in outcome.reason
    assert outcome.reason.startswith("CIFAR-10 not found under data.root=/missing")
    assert outcome.reason.endswith("resnet18_cifar_w16_seed0.pt is missing")


def test_unexpected_error_in_a_dry_run_points_to_hydra_full_error(tmp_path, monkeypatch):
    """A dry run writes no train.log: its one line must not send the user there."""
    def broken(cfg, run_dir):
        raise RuntimeError("something unforeseen")
    monkeypatch.setattr(job, "run", broken)
    dry = task._outcome(compose_cfg(*MISSING_CIFAR, f"paths.output_dir={tmp_path}"), tmp_path / "run")
    assert (dry.status, dry.reason) == ("failed", "RuntimeError: something unforeseen (rerun with "
                                                  "HYDRA_FULL_ERROR=1 for its traceback)")
    real = task._outcome(compose_cfg("protocol=quickstart", f"paths.output_dir={tmp_path}"), tmp_path / "run")
    assert real.reason.endswith(f"(traceback in {tmp_path / 'run'}/train.log)")
