"""The canary on the real one-node SLURM, made to fail: kdexp.check's documented test switch
(KDEXP_CHECK_BREAK=<check>, inherited by the job from the submitting environment) fails the canary
of `launch.study`, which exits 1 naming it, and no training job ever starts: SLURM cancels every
driver waiting for it, so `sacct` holds the canary and cancelled drivers only. `launch.check` on a
launcher whose setup line is broken (as a moved venv) reports the job's own last words in one line.
The passing canary: tests/slurm/test_study.py."""
from __future__ import annotations

import json
import sys

import pytest

from helpers import REPO, run_process
from slurm_helpers import sacct, wait_for
from test_study import DRIVERS, canaries, study

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_clean")]


def test_a_failing_canary_starts_no_training_job(slurm_cluster, tmp_path, fake_root):
    proc = study(tmp_path, fake_root, env={"KDEXP_CHECK_BREAK": "reference"})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    exp = tmp_path / "quickstart"
    [canary] = canaries(exp)
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"launch.study: canary job {canary} on ") and "FAILED: reference" in proc.stderr
    assert "no training job starts" in proc.stderr
    assert not json.loads((exp / "canary" / canary / "check.json").read_text())["ok"]
    assert any(line.startswith("check: FAILED: reference") for line in (exp / "canary" / f"{canary}.out").read_text()
               .splitlines())  # the canary's log says it in one line too

    drivers = json.loads((exp / ".study" / "jobs.json").read_text())
    assert set(drivers) == DRIVERS
    ids = sorted([canary, *drivers.values()], key=int)

    # job ids count up: a training array would be one of the 20 after the last driver
    since = ",".join(str(i) for i in range(int(ids[0]), int(ids[-1]) + 20))

    def ended() -> dict[str, str] | None:
        """Every job submitted since the canary, once the drivers are accounted and none is queued."""
        rows = {job: state for job, state in sacct(since, "JobID,State")}
        done = set(ids) <= set(rows) and all(s not in ("PENDING", "RUNNING") for s in rows.values())
        return rows if done else None
    states = wait_for(ended, "the drivers to be cancelled")
    assert states[canary] == "FAILED" and set(states) == set(ids), states
    assert all(states[job].startswith("CANCELLED") for job in drivers.values()), states
    assert not (exp / ".submitit").exists()


def test_launch_check_names_a_broken_setup_line(slurm_cluster, tmp_path):
    """The canary alone, on the launcher as a multirun's overrides leave it: a setup line that fails
    (a venv that moved) fails the job before kdexp.check starts; launch.check exits 1 with the log's line."""
    proc = run_process([sys.executable, "-m", "launch.check", "--cluster", "slurm_local", "--output-dir",
                        str(tmp_path), "experiment=paper_v1", 'hydra.launcher.setup=["source /nonexistent/activate"]'],
                       cwd=REPO)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    [canary] = canaries(tmp_path / "paper_v1")
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"launch.check: canary job {canary} FAILED before kdexp.check finished: ")
    assert "/nonexistent/activate: No such file or directory" in proc.stderr
    assert "kdexp.check, 1 GPU job on hydra/launcher=slurm_local, time limit 20 min (--partition=a100" in proc.stdout
