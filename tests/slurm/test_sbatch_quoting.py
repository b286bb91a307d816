"""What the real sbatch reads from the study's driver scripts: an output dir with a space, `#` and `'`
(sbatch: "Invalid directive" unquoted; an unquoted `#` silently cuts the line) and a value that tries
to break out of its quotes reach SLURM intact, and every directive after them still holds. The
drivers are submitted held (--driver-sbatch=--hold), read back with squeue and scontrol, and cancelled: nothing
runs. What is refused instead: tests/test_sbatch_script.py."""
from __future__ import annotations

import json
import subprocess

import pytest

from launch import study

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_clean")]

COMMENT = "x'; touch /tmp/kdexp-injected; '#"


def job_fields(job_id: str) -> dict[str, str]:
    """What SLURM holds for the queued job: its name, time limit, partition, memory, comment and log."""
    keys = {"%j": "name", "%l": "time", "%P": "partition", "%m": "mem", "%k": "comment"}
    row = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "|".join(keys)], capture_output=True, text=True,
                         check=True).stdout.rstrip("\n")
    fields = dict(zip(keys.values(), row.split("|")))
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    fields["log"] = next(line.strip() for line in shown.splitlines() if line.strip().startswith("StdOut="))[7:]
    return fields


def test_quoted_values_reach_sbatch_intact(slurm_cluster, tmp_path, capsys):
    out = tmp_path / "o b#c'd"
    code = study.main(["--cluster", "slurm_local", "--protocol", "quickstart", "--skip-check", "--output-dir", str(out),
                       "--driver-sbatch=--hold", f"--driver-sbatch=--comment={COMMENT}",
                       f"data.root={tmp_path / 'data'}"])
    assert code == 0, capsys.readouterr().err
    study_dir = out / "quickstart" / ".study"
    jobs = json.loads((study_dir / study.JOBS_FILE).read_text())
    assert set(jobs) == {"teacher-resnet18", "smoke-quickstart", "baselines", "analysis"}
    for name, job_id in jobs.items():
        assert job_fields(job_id) == {"name": f"kdexp-quickstart-{name}", "time": "3-00:00:00", "partition": "a100",
                                      "mem": "2G", "comment": COMMENT, "log": str(study_dir / f"{name}-{job_id}.out")}
