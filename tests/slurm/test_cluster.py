"""The test SLURM cluster behaves like the real one kdexp targets: GPUs, accounting, arrays,
dependencies, and submitit on top (no mocks; see conftest.py for how it is started)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import submitit

from cluster.testcluster import ClusterInfo
from slurm_helpers import sacct, squeue_states, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_clean")]


def sbatch(*args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], check=True, capture_output=True,
                         text=True).stdout
    return out.strip().split(";")[0]


def wait_sacct(job_id: str, state: str, count: int = 1, timeout: float | None = None) -> list[str]:
    """Wait until sacct reports ``count`` records of job_id, all in ``state``."""
    def states():
        found = [row[0].split()[0] for row in sacct(job_id, "State")]  # "CANCELLED by 0"
        return found if len(found) >= count and all(s == state for s in found) else None
    return wait_for(states, f"{count} x {state} for job {job_id} in sacct", timeout)


def wait_queue(job_id: str, done: bool = False, timeout: float | None = None) -> None:
    """Wait until every record of job_id runs, or with ``done`` until it left the queue.
    Faster than sacct, which lags a few seconds behind for array tasks."""
    def reached() -> bool:
        states = squeue_states(job_id)
        return not states if done else bool(states) and all(s == "RUNNING" for s in states)
    wait_for(reached, f"job {job_id} {'to leave the queue' if done else 'running'}", timeout)


def stamps(path: Path) -> tuple[float, float]:
    start, end = path.read_text().split()
    return float(start), float(end)


def test_gpu_job_completes_and_is_accounted(slurm_cluster: ClusterInfo, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    job = sbatch(f"--partition={slurm_cluster.partition}", "--gres=gpu:a100:1", f"--output={out}",
                 "--wrap", 'echo "CVD=$CUDA_VISIBLE_DEVICES"')
    wait_sacct(job, "COMPLETED")
    assert out.read_text().strip() in {f"CVD={i}" for i in range(slurm_cluster.gpus)}
    assert "gres/gpu=1" in sacct(job, "AllocTRES")[0][0]


def test_scancel_is_recorded_as_cancelled(slurm_cluster: ClusterInfo, tmp_path: Path) -> None:
    job = sbatch(f"--output={tmp_path}/out.txt", "--wrap", "sleep 300")
    wait_queue(job)
    subprocess.run(["scancel", job], check=True)
    assert wait_sacct(job, "CANCELLED")[0] == "CANCELLED"


def test_array_tasks_run_concurrently(slurm_cluster: ClusterInfo, tmp_path: Path) -> None:
    job = sbatch("--array=0-3", f"--output={tmp_path}/%a.txt", "--wrap",
                 "date +%s.%N; sleep 2; date +%s.%N")
    wait_queue(job, done=True)
    spans = [stamps(tmp_path / f"{i}.txt") for i in range(4)]
    # every task started before any finished: all four ran at the same time
    assert max(s for s, _ in spans) < min(e for _, e in spans)


def test_afterok_dependency_orders_jobs(slurm_cluster: ClusterInfo, tmp_path: Path) -> None:
    first = sbatch(f"--output={tmp_path}/a.txt", "--wrap", "date +%s.%N; sleep 1; date +%s.%N")
    second = sbatch(f"--dependency=afterok:{first}", f"--output={tmp_path}/b.txt", "--wrap",
                    "date +%s.%N; date +%s.%N")
    wait_queue(second, done=True)
    assert stamps(tmp_path / "b.txt")[0] >= stamps(tmp_path / "a.txt")[1]


def _executor(cluster: ClusterInfo, folder: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(timeout_min=60, slurm_partition=cluster.partition,
                               gpus_per_node=1, cpus_per_task=1)
    return executor


def test_submitit_runs_function(slurm_cluster: ClusterInfo, tmp_path: Path) -> None:
    def job_env() -> dict[str, str]:
        # Local, so cloudpickle ships it by value: the job cannot import this test module.
        return dict(os.environ)

    job = _executor(slurm_cluster, tmp_path).submit(job_env)
    env = job.result()
    assert env["SLURM_JOB_ID"] == job.job_id
    assert env["SLURM_JOB_PARTITION"] == slurm_cluster.partition
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert env["SLURM_CONF"] == str(slurm_cluster.slurm_conf)  # jobs inherit the test's env


def test_submitit_sees_scancel_through_sacct(slurm_cluster: ClusterInfo, tmp_path: Path) -> None:
    job = _executor(slurm_cluster, tmp_path).submit(time.sleep, 600)
    # submitit waits this long for a result file after SLURM says the job ended; the default
    # 15 s only slows the test down. Without accounting result() would hang forever instead.
    job._results_timeout_s = 2
    wait_queue(job.job_id)
    subprocess.run(["scancel", job.job_id], check=True)
    start = time.monotonic()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()
    assert time.monotonic() - start < 60
