"""One run on two ranks through kdexp's SLURM launcher on the real one-node cluster: a job of two
tasks (tasks_per_node=2, gloo on the CPU) is one run in one run dir, trained to completion; a rank
killed mid-run fails the job in bounded time, with the failure recorded; a preempted job requeues and
resumes every rank exactly."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, TINY, communicate, run_train, without_timing
from slurm_helpers import ONE_THREAD, run_dirs, slurm_job_id, squeue_states, wait_for
from test_multirun import release_requeued
from kdexp.records import read_metrics, read_result

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_clean")]

TWO_TASKS = ("hydra/launcher=slurm_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.mem_gb=2")


def test_a_two_task_job_trains_one_run(tmp_path, fake_root, slurm_cluster):
    out = tmp_path / "out"
    proc = run_train("-m", *TINY, "experiment=baseline", "seed=0", "trainer.epochs=2", "trainer.max_steps_per_epoch=3",
                     "trainer.batch_size=32", f"data.root={fake_root}", f"paths.output_dir={out}", *TWO_TASKS,
                     env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "multirun summary: 1 completed" in proc.stdout
    (run_dir,) = run_dirs(out)
    assert read_result(run_dir)["status"] == "completed"
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]
    assert "rank 0 of 2" in (run_dir / "train.log").read_text()
    task_logs = {p.name.split("_")[-2] for p in out.rglob("*_log.err")}
    assert task_logs == {"0", "1"}  # one SLURM job of two tasks: ranks 0 and 1


def _task_pid(folder: Path, task: int) -> int | None:
    """The process of SLURM task `task` that runs the job submitted from `folder`."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if "submitit.core._submit" in cmdline and str(folder) in cmdline and f"SLURM_PROCID={task}".encode() in environ:
            return int(proc.name)
    return None


def test_a_killed_rank_fails_the_job_in_bounded_time(tmp_path, fake_root, slurm_cluster):
    """Rank 1 killed (SIGKILL: it says nothing) while training: rank 0 sees the broken collective at
    once, records the failure, naming rank 1 (its heartbeat stopped), and the job ends failed, long
    before trainer.dist_timeout_s."""
    out = tmp_path / "out"
    driver = subprocess.Popen([sys.executable, "-m", "kdexp.train", "-m", *TINY, "experiment=baseline",
                               "trainer.epochs=300", "trainer.max_steps_per_epoch=3", "trainer.batch_size=32",
                               "trainer.dist_timeout_s=300", f"data.root={fake_root}", f"paths.output_dir={out}",
                               *TWO_TASKS], cwd=REPO, env={**os.environ, **ONE_THREAD}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    run_dir = wait_for(lambda: next((d for d in run_dirs(out) if (d / "last.pt").exists()), None), "the first epoch")
    os.kill(wait_for(lambda: _task_pid(out, 1), "rank 1's process"), signal.SIGKILL)
    killed = time.monotonic()
    output, _ = communicate(driver)
    assert time.monotonic() - killed < 120, output[-3000:]  # not the 300 s timeout
    assert driver.returncode == 1, output[-3000:]
    assert "multirun summary: 1 failed" in output
    result = read_result(run_dir)
    assert result["status"] == "failed", result
    assert result["error"].startswith("rank 1 stopped without raising an error (killed: "), result


def _local_two_ranks(*args: str) -> list[subprocess.Popen]:
    """`python -m kdexp.train *args` as ranks 0 and 1 of one run on this machine, as torchrun starts them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [subprocess.Popen([sys.executable, "-m", "kdexp.train", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL,
                             env={**os.environ, **ONE_THREAD, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                  "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
            for rank in (0, 1)]


def test_a_preempted_two_task_job_resumes_exactly(tmp_path, fake_root, slurm_cluster):
    """USR2 (what SLURM sends before preempting) to a two-task job after its first checkpoint: submitit
    requeues it, both ranks resume from rank 0's last.pt, and the metrics are those of two ranks
    trained straight through on this machine."""
    args = ("protocol=quickstart", "trainer.progress=false", "experiment=baseline", "model.width=8",
            "trainer.epochs=6", "trainer.max_steps_per_epoch=8", "trainer.batch_size=32", f"data.root={fake_root}")
    driver = subprocess.Popen([sys.executable, "-m", "kdexp.train", "-m", *args, f"paths.output_dir={tmp_path / 'slurm'}",
                               *TWO_TASKS], cwd=REPO, env={**os.environ, **ONE_THREAD},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = wait_for(lambda: next((d for d in run_dirs(tmp_path / "slurm") if (d / "last.pt").exists()), None),
                       "the SLURM run's first checkpoint")
    job = slurm_job_id(run_dir)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for(lambda: "PENDING" in squeue_states(job), f"job {job} requeued")
    release_requeued(job)
    output, _ = communicate(driver)
    assert driver.returncode == 0, output[-3000:]
    assert "multirun summary: 1 completed" in output
    straight = _local_two_ranks(*args, f"paths.output_dir={tmp_path / 'local'}")
    for rank in straight:
        communicate(rank)
    assert [rank.returncode for rank in straight] == [0, 0]
    assert f"resuming {run_dir} after epoch" in (run_dir / "train.log").read_text()
    reference = run_dirs(tmp_path / "local")[0]
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(reference))
