"""The multirun summary (kdexp/summary.py) lists every job that did not succeed: a reason shared by
many jobs (sbatch refusing the array, a driver that stopped waiting) once with their number, a job
the driver recorded (no run dir) by its overrides; its exit code is the worst job's."""
from __future__ import annotations

from kdexp.outcome import Outcome
from kdexp.summary import outcome_record, record_outcome_if_missing, summarize


def test_a_reason_shared_by_several_jobs_is_one_line_with_their_number():
    refused = Outcome("rejected", "sbatch refused the job array: Invalid partition name specified")
    text, code = summarize([outcome_record(refused, None, [f"seed={s}"]) for s in range(81)])
    assert text.splitlines() == ["multirun summary: 81 rejected",
                                 f"  rejected (nothing written): 81 jobs: {refused.reason}"]
    assert code == 2


def test_failed_runs_are_each_named_by_their_result_file_and_slurm_ends_by_their_overrides(tmp_path):
    nan = Outcome("failed", "loss became NaN/inf in epoch 1; lower trainer.lr")
    records = [outcome_record(nan, tmp_path / f"run{i}", [f"seed={i}"]) for i in range(2)]
    records.append(outcome_record(Outcome("unfinished", "SLURM job 5_2 ended CANCELLED"), None, ["seed=2"]))
    records.append(outcome_record(Outcome("completed"), tmp_path / "run3", ["seed=3"]))
    text, code = summarize(records)
    assert text.splitlines() == ["multirun summary: 1 completed, 2 failed, 1 unfinished",
                                 f"  failed: {tmp_path}/run0/result.json: {nan.reason}",
                                 f"  failed: {tmp_path}/run1/result.json: {nan.reason}",
                                 "  unfinished: seed=2: SLURM job 5_2 ended CANCELLED"]
    assert code == 1


def test_interrupted_jobs_make_the_multirun_exit_130():
    left = Outcome("interrupted", "still queued or running in SLURM when the driver stopped waiting")
    _, code = summarize([outcome_record(left, None, ["seed=0"]), outcome_record(Outcome("failed", "x"), None, [])])
    assert code == 130


def test_the_jobs_own_record_wins_over_the_drivers(tmp_path, monkeypatch):
    monkeypatch.setenv("KDEXP_MULTIRUN_ID", "test")
    assert record_outcome_if_missing(tmp_path, 0, Outcome("unfinished", "no record"), ["seed=0"]) == "unfinished"
    assert record_outcome_if_missing(tmp_path, 0, Outcome("interrupted", "later"), ["seed=0"]) == "unfinished"
