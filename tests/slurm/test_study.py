"""The staged study on the real one-node SLURM: `launch.study --protocol quickstart` on generated data
submits its canary (kdexp.check, tiny on these CPU nodes) and its drivers, and returns once the canary
has passed; SLURM then runs the teacher, the students strictly after it (by dependency), the baselines
alongside, and the analysis last, which writes the key-results table. Running the command again
submits nothing; after a run failed while training it resubmits that driver (with --skip-check: no
canary), which skips the run, counts it failed and fails, and the command says so and exits 1.
`--grids dkd` runs a DKD grid as the students' stage.
A driver that sbatch refuses is one line and exit 1, and the canary submitted before it is cancelled.
A failing canary: tests/slurm/test_canary.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import REPO, run_process
from kdexp.records import read_result, write_result
from slurm_helpers import ONE_THREAD, run_dirs, sacct, slurm_job_id, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_clean")]

DRIVERS = {"teacher-resnet18", "smoke-quickstart", "baselines", "analysis"}


def study(out: Path, fake_root: Path, *options: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # tinier than the quickstart: width 4 everywhere, 2 short epochs, and seed=0 trims its seeds 0,1
    # to one (1 teacher, 2 students, 1 baseline); the command waits for its canary's verdict
    argv = [sys.executable, "-m", "launch.study", "--cluster", "slurm_local", "--protocol", "quickstart",
            "--output-dir", str(out), *options, f"data.root={fake_root}", "model.width=4", "teacher.width=4",
            "trainer.epochs=2", "trainer.max_steps_per_epoch=2", "seed=0"]
    return run_process(argv, cwd=REPO, env={**os.environ, **ONE_THREAD, **(env or {})})


def canaries(exp_dir: Path) -> list[str]:
    """The job ids of the canaries that ran for this experiment: SLURM writes each one's log."""
    return sorted(log.stem for log in (exp_dir / "canary").glob("*.out"))


def accounting(job_ids: list[str]) -> dict[str, tuple[str, datetime, datetime]] | None:
    """job id -> (state, start, end), once every job (array tasks too) has ended and is accounted."""
    if subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split():
        return None  # anything still queued or running
    rows = sacct(",".join(job_ids), "JobID,State,Start,End")
    records = {job: (state, start, end) for job, state, start, end in rows}
    if not set(job_ids) <= set(records) or any(end in ("Unknown", "None") for _, _, end in records.values()):
        return None
    return {job: (state, datetime.fromisoformat(start), datetime.fromisoformat(end))
            for job, (state, start, end) in records.items()}


def wait_until_ended(job_ids: list[str], timeout: float | None = None) -> dict[str, tuple[str, datetime, datetime]]:
    return wait_for(lambda: accounting(job_ids), f"jobs {job_ids} to end and be accounted", timeout)


def run_jobs(exp_dir: Path) -> dict[Path, str]:
    """Each training run's dir -> the SLURM job (array task) that ran it."""
    return {d: slurm_job_id(d) for d in run_dirs(exp_dir)}


def test_study_runs_stages_in_dependency_order(slurm_cluster, tmp_path, fake_root):
    proc = study(tmp_path, fake_root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    exp = tmp_path / "quickstart"
    drivers = json.loads((exp / ".study" / "jobs.json").read_text())
    assert set(drivers) == DRIVERS
    [canary] = canaries(exp)
    assert "squeue -u $USER" in proc.stdout and ",".join([canary, *drivers.values()]) in proc.stdout
    # the command returned with the canary's verdict: kdexp.check passed on the node, at tiny sizes
    record = json.loads((exp / "canary" / canary / "check.json").read_text())
    assert record["ok"] and record["size"] == "tiny" and record["execution"] == "reference", record
    verdict = proc.stdout.strip().splitlines()[-1]
    assert verdict.startswith(f"canary job {canary} on ") and "passed" in verdict, proc.stdout[-2000:]

    wait_until_ended([drivers["analysis"]])
    runs = run_jobs(exp)
    assert len(runs) == 4, runs
    jobs = wait_until_ended([canary, *drivers.values(), *runs.values()])
    assert {state for state, _, _ in jobs.values()} == {"COMPLETED"}, jobs
    _, teacher_start, teacher_end = jobs[drivers["teacher-resnet18"]]
    assert teacher_start >= jobs[canary][2] and jobs[drivers["baselines"]][1] >= jobs[canary][2]
    for run_dir, job in runs.items():
        result = json.loads((run_dir / "result.json").read_text())
        assert result["status"] == "completed"
        _, start, end = jobs[job]
        if result["kind"] == "student":  # started only after its teacher's driver had ended
            assert start >= teacher_end, (run_dir, start, teacher_end)
        elif result["kind"] == "teacher":
            assert teacher_start <= start and end <= teacher_end
    assert jobs[drivers["smoke-quickstart"]][1] >= teacher_end
    analysis_start = jobs[drivers["analysis"]][1]
    assert all(analysis_start >= end for job, (_, _, end) in jobs.items() if job != drivers["analysis"])
    assert "logit" in (exp / "report" / "key_results.md").read_text()

    again = study(tmp_path, fake_root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to submit: every stage is complete" in again.stdout
    assert "-> SKIP (no training driver to submit)" in again.stdout
    assert json.loads((exp / ".study" / "jobs.json").read_text()) == drivers and canaries(exp) == [canary]

    # a run that failed while training (as after a NaN loss): the resubmission skips it, counts it as
    # failed, and so the driver and this command exit non-zero instead of passing for success
    student = next(d for d in runs if read_result(d)["kind"] == "student")
    write_result(student, {**read_result(student), "status": "failed", "error": "NonFiniteLossError: loss is nan",
                           "failed_epoch": 2})
    resubmitted = study(tmp_path, fake_root, "--skip-check")
    assert resubmitted.returncode == 1, resubmitted.stderr[-3000:]
    assert "stage 0 check: none (--skip-check" in resubmitted.stdout
    assert "Traceback" not in resubmitted.stderr and len(resubmitted.stderr.splitlines()) == 1
    assert "1 run that failed while training will be skipped and counted as failed" in resubmitted.stderr
    assert "retry_failed=true" in resubmitted.stderr
    again_ids = json.loads((exp / ".study" / "jobs.json").read_text())
    driver_job = again_ids["smoke-quickstart"]
    assert driver_job != drivers["smoke-quickstart"] and again_ids["teacher-resnet18"] == drivers["teacher-resnet18"]
    ended = wait_until_ended([driver_job, again_ids["analysis"]])
    assert ended[driver_job][0] == "FAILED", ended
    assert read_result(student)["status"] == "failed"  # skipped, not retrained
    assert canaries(exp) == [canary]


def test_a_dkd_grid_runs_as_a_stage(slurm_cluster, tmp_path, fake_root):
    """`--grids dkd`: a DKD grid is one more students' driver: its 8 cells train on SLURM after the
    teacher's driver, and the analysis reports them."""
    proc = study(tmp_path, fake_root, "--grids", "dkd", "--skip-check")  # the canary: the test above
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    exp = tmp_path / "quickstart"
    drivers = json.loads((exp / ".study" / "jobs.json").read_text())
    assert set(drivers) == {"teacher-resnet18", "dkd-quickstart", "baselines", "analysis"}
    wait_until_ended([drivers["analysis"]])
    runs = run_jobs(exp)
    jobs = wait_until_ended([*drivers.values(), *runs.values()])
    assert {state for state, _, _ in jobs.values()} == {"COMPLETED"}, jobs
    students = [d for d in runs if read_result(d)["kind"] == "student"]
    assert len(students) == 8 and {read_result(d)["status"] for d in students} == {"completed"}
    assert {OmegaConf.load(d / ".hydra" / "config.yaml").method._target_ for d in students} == {"kdexp.methods.dkd.DKD"}
    assert min(jobs[runs[d]][1] for d in students) >= jobs[drivers["teacher-resnet18"]][2]
    assert "dkd" in (exp / "report" / "key_results.md").read_text()


def test_a_driver_that_sbatch_refuses_is_one_line(slurm_cluster, tmp_path, fake_root):
    """--driver-sbatch goes to the drivers only: the canary is submitted, and cancelled when no driver
    could be submitted to wait for it."""
    proc = study(tmp_path, fake_root, "--driver-sbatch=--partition=nope")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("launch.study: sbatch --parsable ") and "invalid partition" in proc.stderr.lower()
    cancelled = re.search(r"; canary job (\d+) cancelled \(no driver waits for it\)", proc.stderr)
    assert cancelled, proc.stderr
    canary = cancelled.group(1)
    assert wait_until_ended([canary])[canary][0].startswith("CANCELLED")
    assert not subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
