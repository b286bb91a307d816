"""kdexp multiruns through kdexp's submitit launcher on the real one-node SLURM (hydra/launcher=slurm_local):
one run dir per array task; a failing task fails the driver with a summary, and its array task is
FAILED in sacct; scancel of a task, Ctrl-C on the driver and sbatch refusing the array each end in
the summary, never a traceback; resubmission skips every finished run; a preempted task is requeued
and resumes to exactly an uninterrupted run's metrics."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from helpers import REPO, TINY, communicate, run_train, student_args, without_timing
from slurm_helpers import ONE_THREAD, run_dirs, sacct, slurm_job_id, squeue_states, wait_for
from kdexp.records import read_metrics, read_result

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_clean")]

SHORT = ("trainer.epochs=2", "trainer.max_steps_per_epoch=3")
SLURM = ("hydra/launcher=slurm_local",)


def test_grid_runs_one_slurm_array_task_per_job(tmp_path, fake_root, slurm_cluster):
    teacher = run_train(*TINY, "experiment=teacher", "model.width=8", *SHORT, f"data.root={fake_root}",
                        f"paths.output_dir={tmp_path}", env=ONE_THREAD)  # a plain local run first
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    out = tmp_path / "grid"
    proc = run_train("-m", *student_args(out, fake_root, "kd_grid=smoke", "seed=0,1", *SHORT,
                                         f"paths.teachers_dir={tmp_path}/teachers"), *SLURM, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multirun summary: 4 completed" in proc.stdout
    dirs = run_dirs(out)
    assert len(dirs) == 4  # 2 cells x 2 seeds
    for d in dirs:
        assert read_result(d)["status"] == "completed"
        assert [r["epoch"] for r in read_metrics(d)] == [1, 2]
    tasks = {slurm_job_id(d) for d in dirs}
    arrays = {t.split("_")[0] for t in tasks}
    assert len(tasks) == 4 and len(arrays) == 1, tasks

    def accounted():  # slurmdbd records the tasks a moment after they end
        records = sacct(arrays.copy().pop(), "JobID,JobName,State")
        return records if len(records) == 4 and all(state == "COMPLETED" for *_, state in records) else None

    records = wait_for(accounted, "4 COMPLETED array tasks in sacct")
    assert {job for job, _, _ in records} == tasks
    assert {name for _, name, _ in records} == {"kdexp-test"}


def test_dry_run_with_a_slurm_launcher_submits_nothing(tmp_path, fake_root, slurm_cluster):
    """A dry run checks a grid before it is submitted: its jobs run here, never through sbatch."""
    name = f"kdexp-dry-{uuid.uuid4().hex[:8]}"  # tells this test's jobs from the session's other ones
    proc = run_train("-m", *TINY, "experiment=baseline", "seed=0,1", "dry_run=true", f"data.root={fake_root}",
                     f"paths.output_dir={tmp_path}", *SLURM, f"hydra.launcher.name={name}", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # slurmctld keeps ended jobs in squeue --states=all for MinJobAge (300 s): no accounting lag to wait for
    queued = subprocess.run(["squeue", "-h", "--states=all", f"--name={name}", "-o", "%i"], capture_output=True,
                            text=True, check=True).stdout
    accounted = subprocess.run(["sacct", "-X", "-n", "-a", f"--name={name}", "--starttime=now-1hours", "-o", "JobID"],
                               capture_output=True, text=True, check=True).stdout
    assert (queued.strip(), accounted.strip()) == ("", "")
    assert proc.stdout.count("dry run: would train") == 2 and not list(tmp_path.rglob(".submitit"))
    assert not list(tmp_path.rglob(".hydra"))  # a dry run writes nothing into the tree
    assert "multirun summary: 2 dry_run" in proc.stdout
    assert "instead of submitting them through hydra/launcher=slurm_local" in proc.stdout


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, fake_root, slurm_cluster):
    """A 2-job baseline multirun whose second job's loss turns NaN: (output dir, args, driver process)."""
    out = tmp_path_factory.mktemp("mixed")
    args = ("-m", *TINY, "experiment=baseline", "trainer.lr=0.1,1e30", "trainer.clip_norm=null", *SHORT,
            f"data.root={fake_root}", f"paths.output_dir={out}", *SLURM)
    return out, args, run_train(*args, env=ONE_THREAD)


def test_failing_task_fails_the_driver_after_the_others_complete(mixed):
    out, _, proc = mixed
    assert proc.returncode == 1
    assert "multirun summary: 1 completed, 1 failed" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    results = {d: read_result(d) for d in run_dirs(out)}
    failed = [d for d, r in results.items() if r["status"] == "failed"]
    assert len(results) == 2 and len(failed) == 1
    assert f"failed: {failed[0]}/result.json" in proc.stdout
    assert results[failed[0]]["failed_epoch"] == 1 and "NonFiniteLossError" in results[failed[0]]["error"]


def test_a_failed_run_is_a_failed_array_task_in_sacct(mixed):
    """sacct tells the same story as kdexp: COMPLETED for the run that completed, FAILED for the
    one kdexp records as failed (afterok dependencies then do not start after it)."""
    out, _, _ = mixed
    states = {read_result(d)["status"]: slurm_job_id(d) for d in run_dirs(out)}

    def accounted():
        rows = dict(sacct(",".join(states.values()), "JobID,State"))
        return rows if len(rows) == 2 else None

    rows = wait_for(accounted, "both array tasks in sacct")
    assert {status: rows[job] for status, job in states.items()} == {"completed": "COMPLETED", "failed": "FAILED"}


def test_resubmission_skips_every_finished_run(mixed):
    """Completed runs are never redone; failed ones only with retry_failed=true, and until then a
    resubmission still fails (exit 1: SLURM's afterok and scripts must not read it as success)."""
    out, args, first = mixed
    before = {d: (d / "result.json").read_bytes() for d in run_dirs(out)}
    again = run_train(*args, env=ONE_THREAD)
    assert again.returncode == 1, again.stderr[-3000:]
    assert "multirun summary: 1 skipped, 1 failed" in again.stdout
    assert "retry_failed=true" in again.stdout + again.stderr
    assert {d: (d / "result.json").read_bytes() for d in run_dirs(out)} == before
    for d in before:
        assert "skipping" in (d / "train.log").read_text()


def test_preempted_task_is_requeued_and_resumes_exactly(tmp_path, fake_root, slurm_cluster):
    # ~1 s epochs, so the signal after epoch 1 lands well before the run would end
    args = ("protocol=quickstart", "trainer.progress=false", "experiment=baseline", "model.width=8",
            "trainer.epochs=6", "trainer.max_steps_per_epoch=8", f"data.root={fake_root}")
    driver = subprocess.Popen([sys.executable, "-m", "kdexp.train", "-m", *args, f"paths.output_dir={tmp_path / 'slurm'}",
                               *SLURM], cwd=REPO, env={**os.environ, **ONE_THREAD},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    straight = subprocess.Popen([sys.executable, "-m", "kdexp.train", *args, f"paths.output_dir={tmp_path / 'local'}"],
                                cwd=REPO, env={**os.environ, **ONE_THREAD},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = wait_for(lambda: next((d for d in run_dirs(tmp_path / "slurm") if (d / "last.pt").exists()), None),
                       "the SLURM run's first checkpoint")
    job = slurm_job_id(run_dir)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM sends before preempting
    # submitit requeues the job; SLURM holds a requeued job ~120 s (BeginTime): release it early
    wait_for(lambda: "PENDING" in squeue_states(job), f"job {job} requeued")
    release_requeued(job)
    output, _ = communicate(driver)
    assert driver.returncode == 0, output[-3000:]
    assert "multirun summary: 1 completed" in output
    communicate(straight)
    assert straight.returncode == 0
    log = (run_dir / "train.log").read_text()
    assert f"resuming {run_dir} after epoch" in log, log[-2000:]
    assert read_metrics(run_dir)[-1]["epoch"] == 6
    assert "REQUEUED" in {state.split()[0] for _, state in sacct(job, "JobID,State")}
    reference = run_dirs(tmp_path / "local")[0]
    numbers = [without_timing(read_metrics(d)) for d in (run_dir, reference)]
    assert numbers[0] == numbers[1]


# Long enough to be cancelled or interrupted mid-run (~0.1 s per epoch here), short enough to end
# the test if something goes wrong.
LONG = ("trainer.epochs=300", "trainer.max_steps_per_epoch=3")


def start_driver(*args: str) -> subprocess.Popen:
    """A multirun driver as a terminal starts it: SIGINT (Ctrl-C) raises KeyboardInterrupt in it."""
    return subprocess.Popen([sys.executable, "-m", "kdexp.train", "-m", *args, *SLURM], cwd=REPO,
                            env={**os.environ, **ONE_THREAD}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def running_jobs(out, count: int) -> list[str]:
    """The SLURM ids of `count` runs once each has trained an epoch."""
    started = [d for d in run_dirs(out) if (d / "last.pt").exists()]
    return sorted(slurm_job_id(d) for d in started) if len(started) == count else []


def test_scancel_of_one_task_ends_in_the_summary(tmp_path, fake_root, slurm_cluster):
    args = (*TINY, "experiment=baseline", "trainer.max_steps_per_epoch=3", "trainer.epochs=2,300",
            f"data.root={fake_root}", f"paths.output_dir={tmp_path}")
    driver = start_driver(*args)
    long_run = wait_for(lambda: next((d for d in run_dirs(tmp_path) if "epochs=300" in str(d)
                                      and (d / "last.pt").exists()), None), "the long run's first epoch")
    job = slurm_job_id(long_run)
    subprocess.run(["scancel", job], check=True)
    output, _ = communicate(driver)
    assert driver.returncode == 1, output[-3000:]
    assert "multirun summary: 1 completed, 1 unfinished" in output
    [line] = [line for line in output.splitlines() if line.startswith("  unfinished: ")]
    assert f"SLURM job {job} ended CANCELLED" in line and "the same command resumes it" in line
    assert "Traceback" not in output and "UncompletedJobError" not in output
    assert not (long_run / "result.json").exists()  # nothing pretends it ended


def test_ctrl_c_on_the_driver_leaves_the_jobs_running_and_says_so(tmp_path, fake_root, slurm_cluster):
    driver = start_driver(*TINY, "experiment=baseline", *LONG, "seed=0,1", f"data.root={fake_root}",
                          f"paths.output_dir={tmp_path}")
    jobs = wait_for(lambda: running_jobs(tmp_path, 2), "both runs' first epoch")
    driver.send_signal(signal.SIGINT)
    output, _ = communicate(driver)
    assert driver.returncode == 130, output[-3000:]
    assert "multirun summary: 2 interrupted" in output
    [line] = [line for line in output.splitlines() if line.startswith("  interrupted: 2 jobs: ")]
    array = jobs[0].split("_")[0]
    assert f"({', '.join(jobs)})" in line and f"`scancel {array}` cancels them" in line
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert set(squeue_states(array)) == {"RUNNING"}  # left running, as the summary says


def test_sbatch_refusing_the_array_is_the_summary_not_a_traceback(tmp_path, fake_root, slurm_cluster):
    """The README's example site file names partition `gpu`, which the test cluster does not have."""
    driver = start_driver(*TINY, "experiment=baseline", "seed=0,1", f"data.root={fake_root}",
                          f"paths.output_dir={tmp_path}", "hydra.launcher.partition=gpu")
    output, _ = communicate(driver)
    assert driver.returncode == 2, output[-3000:]
    assert "multirun summary: 2 rejected" in output
    [line] = [line for line in output.splitlines() if line.startswith("  rejected (nothing written): 2 jobs: ")]
    assert "sbatch refused the job array: " in line and "Invalid partition name specified" in line
    assert "Traceback" not in output and "FailedJobError" not in output
    assert not run_dirs(tmp_path) and not list(tmp_path.rglob("multirun.yaml"))  # nothing ran, nothing recorded


def release_requeued(job_id: str) -> None:
    """Start a requeued job now instead of after SLURM's ~120 s hold, but not within the second of
    the requeue: slurmd revokes the old attempt's credential with a whole-second timestamp and
    refuses one issued in that same second ("Job credential revoked"), failing the job for good."""
    time.sleep(2 - time.time() % 1)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def test_runs_of_the_shared_launcher_share_one_gpu(tmp_path, fake_root, slurm_cluster):
    """hydra/launcher=slurm_local_shared: each array task asks for a GPU shard, not a GPU, and SLURM
    puts both on the same (fake) GPU. (That sharing leaves a run's numbers unchanged cannot be shown
    here, where the GPUs are fake and runs train on the CPU: a GPU session's job.)"""
    args = ("-m", *TINY, "experiment=baseline", "model.width=8", *SHORT, "seed=0,1", f"data.root={fake_root}")
    proc = run_train(*args, f"paths.output_dir={tmp_path}", "hydra/launcher=slurm_local_shared",
                     'hydra.launcher.setup=["echo kdexp-gpu=$CUDA_VISIBLE_DEVICES"]', env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multirun summary: 2 completed" in proc.stdout
    logs = list(tmp_path.rglob("*_log.out"))
    gpus = [line for log in logs for line in log.read_text().splitlines() if line.startswith("kdexp-gpu=")]
    assert len(logs) == 2 and gpus == ["kdexp-gpu=0"] * 2, gpus
    array = slurm_job_id(run_dirs(tmp_path)[0]).split("_")[0]

    def accounted():
        rows = sacct(array, "AllocTRES")
        return rows if len(rows) == 2 else None

    for (tres,) in wait_for(accounted, "2 array tasks in sacct"):
        assert "gres/shard=1" in tres and "gres/gpu" not in tres, tres
