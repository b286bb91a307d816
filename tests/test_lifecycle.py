"""What a start does around training, with real processes and files: completed, failed, locked and
rejected runs, one-line errors and their exit codes (kdexp/outcome.py), a teacher's lost export,
the command that trains a missing teacher, and dry runs."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import QUICK, REPO, communicate, read_only, run_process, run_train, wait_until
from kdexp import checkpoint, runlock
from kdexp.data.fake import write_fake_cifar
from kdexp.models import build_model
from kdexp.records import read_metrics, read_result

pytestmark = pytest.mark.e2e  # every test starts `python -m kdexp.train`

# Small generated data (250 training images after the val split): runs here test what happens
# around training, not learning.
SIZES = ("data.fake_train_size=400", "data.fake_test_size=100", "data.val_size=150")
BASE = ("protocol=quickstart", *SIZES, "model.width=4", "trainer.progress=false")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A KDEXP_DATA for the runs (they write their generated data into it)."""
    return tmp_path_factory.mktemp("data")


def _env(data_dir: Path, out: Path) -> dict:
    return {"KDEXP_DATA": str(data_dir), "KDEXP_OUTPUTS": str(out)}


def _start(args: tuple, env: dict) -> subprocess.Popen:
    # SIGINT as a terminal gives it, even where the suite itself was started in the background (a
    # non-interactive shell's `&` ignores SIGINT, an ignored signal is inherited, and Python then
    # installs no KeyboardInterrupt handler)
    return subprocess.Popen([sys.executable, "-m", "kdexp.train", *args], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _only_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdexp: "), stderr[-3000:]
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_files(folder: Path) -> dict[str, bytes]:
    """What a run's start must not rewrite: all but its log and its lock file (who holds it now)."""
    return {k: v for k, v in _files(folder).items() if Path(k).name not in ("train.log", runlock.LOCK_FILE)
            and "multirun.yaml" not in k}


def test_train_it_first_command_trains_the_teacher_the_student_finds(tmp_path, data_dir):
    """The hint is run literally, as a user pastes it: its teacher lands in the run dir the README's
    command makes (no extra keys in its name) and at the checkpoint the student looks up."""
    env = _env(data_dir, tmp_path)
    student = (*BASE, "method=logit", "teacher=resnet18", "teacher.width=4", *QUICK)
    missing = run_train(*student, env=env)
    assert missing.returncode == 1
    command = re.search(r"train it first: (.+?) \(or point", _only_line(missing.stderr)).group(1)
    assert command == ("python -m kdexp.train experiment=teacher protocol=quickstart model=resnet18 "
                       "data.fake_train_size=400 data.fake_test_size=100 data.val_size=150 model.width=4")
    argv = shlex.split(command)
    teacher = run_process([sys.executable, *argv[1:]], cwd=REPO, env={**os.environ, **env})
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    # the same run dir as the README's command with these data sizes: no other key in its name
    assert (tmp_path / "quickstart/teacher/resnet18/seed0/data.fake_test_size=100,data.fake_train_size=400,"
                       "data.val_size=150,model.width=4/result.json").is_file()
    again = run_train(*student, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    [result] = [read_result(p.parent) for p in tmp_path.rglob("result.json") if "-to-" in str(p)]
    [exported] = (tmp_path / "teachers").rglob("*.pt")
    assert result["teacher"] == {"path": str(exported.resolve()), "sha256": checkpoint.file_sha256(exported)}


def test_another_run_of_the_same_teacher_never_replaces_its_export(tmp_path, data_dir):
    """Two teacher runs of one identity (here: other epochs, another output dir) export to one path:
    the second is refused before training, and the first's export, which students load, stays."""
    env = _env(data_dir, tmp_path)
    first = (*BASE, "experiment=teacher", *QUICK, f"paths.teachers_dir={tmp_path / 'teachers'}")
    assert run_train(*first, env=env).returncode == 0
    [export] = (tmp_path / "teachers").rglob("*.pt")
    owner, sha = checkpoint.load(export)["run_dir"], checkpoint.file_sha256(export)
    second = (*first, f"paths.output_dir={tmp_path / 'other'}")
    for args in (second, (*second, "dry_run=true")):
        proc = run_train(*args, env=env)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert _only_line(proc.stderr) == (
            f"kdexp: teacher export {export} already holds the teacher trained in {owner}, which students of this "
            f"identity load; keep it and export this one elsewhere (paths.teachers_dir=...), or delete it and "
            f"{export}.claim to replace it")
    assert checkpoint.file_sha256(export) == sha and not list((tmp_path / "other").rglob("result.json"))
    elsewhere = run_train(*second, f"paths.teachers_dir={tmp_path / 'other_teachers'}", env=env)
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]


def test_two_runs_of_one_teacher_started_together_export_it_once(tmp_path, data_dir):
    """Two teacher runs of one identity (other epochs, so other run dirs) started at once: one claims
    the export before training and exports it, the other is refused in one line (exit 2, nothing
    trained), and the export is the one the winner's result.json names. Each run is stopped once it
    trains (metrics.jsonl) until the other trains or has ended: without the claim, both passed their
    start checks and both exported, the later replacing the earlier."""
    teachers, outs = tmp_path / "teachers", {epochs: tmp_path / f"epochs{epochs}" for epochs in (2, 3)}
    procs = {epochs: _start((*BASE, "experiment=teacher", f"trainer.epochs={epochs}", "trainer.max_steps_per_epoch=1",
                             f"paths.output_dir={out}", f"paths.teachers_dir={teachers}"), _env(data_dir, tmp_path))
             for epochs, out in outs.items()}
    stopped = set()

    def each_trains_or_ended() -> bool:
        for epochs, proc in procs.items():
            if epochs not in stopped and proc.poll() is None and next(outs[epochs].rglob("metrics.jsonl"), None):
                proc.send_signal(signal.SIGSTOP)
                stopped.add(epochs)
        return all(epochs in stopped or proc.poll() is not None for epochs, proc in procs.items())

    try:
        wait_until(each_trains_or_ended, "both runs to train or end")
    finally:
        for epochs in stopped:
            procs[epochs].send_signal(signal.SIGCONT)
    ended = {epochs: (communicate(proc)[1], proc.returncode) for epochs, proc in procs.items()}
    [winner] = [epochs for epochs, (_, code) in ended.items() if code == 0]
    [loser] = set(procs) - {winner}
    stderr, code = ended[loser]
    [export] = teachers.rglob("*.pt")
    [run_dir] = [p.parent for p in outs[winner].rglob("result.json")]
    assert code == 2 and re.fullmatch(  # the claim; or its export, had the winner ended before the loser started
        rf"kdexp: teacher export {re.escape(str(export))} (is claimed by the teacher run in {re.escape(str(run_dir))}, "
        rf"which is running \(pid [^)]+\)|already holds the teacher trained in {re.escape(str(run_dir))})[,;] .+",
        _only_line(stderr)), stderr
    assert read_result(run_dir)["teacher_checkpoint_sha256"] == checkpoint.file_sha256(export)
    assert checkpoint.load(export)["run_dir"] == str(run_dir)
    assert not [p for p in outs[loser].rglob("*") if p.name in ("result.json", "last.pt")]


def test_lost_or_replaced_teacher_export_is_restored_without_retraining(tmp_path, data_dir):
    env = _env(data_dir, tmp_path)
    args = (*BASE, "experiment=teacher", *QUICK)
    assert run_train(*args, env=env).returncode == 0
    [run_dir] = [p.parent for p in tmp_path.rglob("result.json")]
    [export] = (tmp_path / "teachers").rglob("*.pt")
    final = checkpoint.load(run_dir / checkpoint.LAST)["student"]
    kept = _run_files(run_dir)  # result, metrics, last.pt, .hydra: a restoring start changes none of them
    other = {**checkpoint.load(export), "state_dict": build_model("resnet18", width=4).state_dict()}
    damages = {"deleted": export.unlink, "truncated": lambda: export.write_bytes(export.read_bytes()[:300]),
               "another network's weights": lambda: checkpoint.save(export, other)}
    for damage, do in damages.items():
        do()
        proc = run_train(*args, env=env)
        assert proc.returncode == 0, (damage, proc.stderr[-3000:])
        assert "re-exported teacher" in proc.stdout and "epoch 1/1" not in proc.stdout, damage
        restored = checkpoint.load(export)
        assert all(torch.equal(restored["state_dict"][k], v) for k, v in final.items()), damage
        assert restored["data_identity"]["dataset"] == "fake" and restored["data_identity"]["val_size"] == 150
        assert _run_files(run_dir) == kept, damage


def test_failed_run_resubmitted_still_fails(tmp_path, data_dir):
    """A multirun with a NaN job exits 1, and so does the same command again (the failed job is
    skipped, not retried): a script or SLURM's afterok never takes it for success."""
    env = _env(data_dir, tmp_path)
    args = ("-m", *BASE, "experiment=baseline", "trainer.lr=0.1,1e30", "trainer.clip_norm=null",
            "trainer.epochs=1", "trainer.max_steps_per_epoch=3")
    first = run_train(*args, env=env)
    assert first.returncode == 1 and "multirun summary: 1 completed, 1 failed" in first.stdout, first.stdout
    [failed] = [p.parent for p in tmp_path.rglob("result.json") if read_result(p.parent)["status"] == "failed"]
    before = _run_files(tmp_path / "quickstart")
    again = run_train(*args, env=env)
    assert again.returncode == 1, again.stdout
    assert "multirun summary: 1 skipped, 1 failed" in again.stdout
    assert f"failed: {failed}/result.json: skipping {failed}: it failed in epoch 1" in again.stdout
    assert "pass retry_failed=true to run it again" in again.stdout
    assert _run_files(tmp_path / "quickstart") == before


@pytest.fixture(scope="module")
def contended(tmp_path_factory, data_dir):
    """A run held by a first (stopped) process, then started again alone and as a multirun."""
    out = tmp_path_factory.mktemp("locked")
    env = _env(data_dir, out)
    args = (*BASE, "experiment=baseline", "trainer.epochs=30", "trainer.max_steps_per_epoch=1")
    first = _start(args, env)
    try:
        lock = wait_until(lambda: next(out.rglob(runlock.LOCK_FILE), None), "the first start's lock")
        run_dir = lock.parent
        wait_until(lambda: runlock.holder(run_dir), "the lock to be held")
        first.send_signal(signal.SIGSTOP)  # it keeps its lock, and stops writing: the files stay still
        before = _files(run_dir)
        second = run_train(*args, "trainer.progress=true", env=env)  # same run dir, another config
        multirun = run_train("-m", *args, env=env)
        after = _files(run_dir)
    finally:
        first.kill()
        first.wait()
    return run_dir, first, second, multirun, before, after, args, env


def test_second_start_of_a_running_run_is_refused_without_touching_it(contended):
    run_dir, first, second, multirun, before, after, args, env = contended
    assert second.returncode == 75
    line = _only_line(second.stderr)
    assert f"{run_dir} is in use by pid {first.pid} on " in line and " since " in line
    assert multirun.returncode == 75 and "multirun summary: 1 locked" in multirun.stdout
    assert {k: v for k, v in after.items() if not k.startswith(".hydra")} == \
        {k: v for k, v in before.items() if not k.startswith(".hydra")}  # train.log included
    assert "result.json" not in after
    # the kernel dropped the killed process's lock: the next start runs (and resumes or trains)
    assert runlock.holder(run_dir) is None
    third = run_train(*args, env=env)
    assert third.returncode == 0, third.stderr[-3000:]


def test_second_start_of_a_running_run_leaves_its_hydra_config(contended):
    _, _, _, _, before, after, _, _ = contended
    assert {k: v for k, v in after.items() if k.startswith(".hydra")} == \
        {k: v for k, v in before.items() if k.startswith(".hydra")}


def test_unwritable_teacher_export_dir_fails_before_training(tmp_path, data_dir):
    teachers = tmp_path / "teachers"
    teachers.mkdir()
    with read_only(teachers):
        proc = run_train(*BASE, "experiment=teacher", *QUICK, f"paths.teachers_dir={teachers}",
                         env=_env(data_dir, tmp_path / "out"))
    assert proc.returncode == 2
    assert _only_line(proc.stderr).startswith(f"kdexp: cannot write the teacher export into {teachers}/")
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_ctrl_c_is_one_line_and_the_same_command_resumes(tmp_path, data_dir):
    env = _env(data_dir, tmp_path)
    args = (*BASE, "experiment=baseline", "trainer.epochs=40", "trainer.max_steps_per_epoch=1")
    proc = _start(args, env)
    metrics = wait_until(lambda: next((m for m in tmp_path.rglob("metrics.jsonl") if m.read_text()), None),
                        "a first epoch")
    proc.send_signal(signal.SIGINT)
    _, stderr = communicate(proc)
    assert proc.returncode == 130
    epoch = int(re.fullmatch(r"kdexp: interrupted after epoch (\d+); rerun the same command to resume",
                             _only_line(stderr)).group(1))
    run_dir = metrics.parent
    assert epoch >= 1 and not (run_dir / "result.json").exists()
    assert "KeyboardInterrupt" in (run_dir / "train.log").read_text()  # the traceback is in the log
    resumed = run_train(*args, env=env)
    assert resumed.returncode == 0 and f"resuming {run_dir} after epoch {epoch}" in resumed.stdout
    assert len(read_metrics(run_dir)) == 40


def test_data_errors_are_one_line_with_the_traceback_in_the_log(tmp_path, data_dir):
    missing = run_train(*BASE, "experiment=baseline", "data=cifar10", f"data.root={tmp_path / 'none'}",
                        env=_env(data_dir, tmp_path))
    assert missing.returncode == 1
    assert _only_line(missing.stderr).startswith(f"kdexp: CIFAR-10 not found under data.root={tmp_path / 'none'}")
    [log] = tmp_path.rglob("train.log")
    assert "Traceback" in log.read_text() and "DataError" in log.read_text()
    full = run_train(*BASE, "experiment=baseline", "data=cifar10", f"data.root={tmp_path / 'none'}",
                     env={**_env(data_dir, tmp_path), "HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stdout + full.stderr

    corrupt = tmp_path / "corrupt"
    write_fake_cifar(corrupt / "fake/400_100", train_size=400, test_size=100)
    batch = corrupt / "fake/400_100/cifar-10-batches-py/data_batch_2"
    batch.write_bytes(batch.read_bytes()[:1000])
    proc = run_train(*BASE, "experiment=baseline", env=_env(corrupt, tmp_path / "out"))
    line = _only_line(proc.stderr)
    assert proc.returncode == 1 and f"{batch} (" in line
    assert "it is generated again on the next run" in line and "download" not in line


def test_rejected_job_in_a_multirun_is_named_and_leaves_no_run_dir(tmp_path, data_dir):
    proc = run_train("-m", *BASE, "experiment=baseline", "trainer.epochs=1,-1", "dry_run=true",
                     env=_env(data_dir, tmp_path))
    assert proc.returncode == 2
    assert "multirun summary: 1 dry_run, 1 rejected" in proc.stdout
    [line] = [line for line in proc.stdout.splitlines() if "rejected (nothing written):" in line]
    assert " trainer.epochs=-1 " in line  # the job, by its overrides
    assert line.endswith(": invalid config: trainer.epochs=-1 must be > 0")
    assert not [p for p in tmp_path.rglob("*") if "trainer.epochs=-1" in p.name]


def test_dry_run_counts_missing_teachers_and_gives_one_command(tmp_path, data_dir):
    env = _env(data_dir, tmp_path)
    proc = run_train("-m", *BASE, "dry_run=true", "method=logit", "teacher=resnet18,resnet34", "teacher.width=4",
                     "seed=0,1", env=env)
    assert proc.returncode == 2
    assert "dry run: 4 jobs would fail" in proc.stdout
    assert "4 jobs need one of 2 missing teachers; train them once with:" in proc.stdout
    assert proc.stdout.count("experiment=teacher") == 1
    assert ("python -m kdexp.train -m experiment=teacher protocol=quickstart model=resnet18,resnet34 "
            "data.fake_train_size=400 data.fake_test_size=100 data.val_size=150 model.width=4") in proc.stdout
    assert "kdexp:" not in proc.stderr  # no line per job
    single = run_train(*BASE, "dry_run=true", "method=logit", "teacher=resnet18", "teacher.width=4", env=env)
    assert single.returncode == 2 and "is missing" in _only_line(single.stderr)
    assert not list(tmp_path.rglob("result.json"))


# Until conf/train.yaml lists it (then this override changes nothing): the callback that checks the
# output dir before Hydra makes it.
OUTPUTS_CHECK = "++hydra.callbacks.outputs_writable._target_=kdexp.summary.OutputsWritable"


@pytest.mark.parametrize("multirun", [False, True])
def test_unwritable_output_dir_is_one_line(tmp_path, data_dir, multirun):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with read_only(outputs):
        proc = run_train(*(["-m"] if multirun else []), *BASE, "experiment=baseline", OUTPUTS_CHECK,
                         env=_env(data_dir, outputs / "mine"))
    assert proc.returncode == 2
    assert _only_line(proc.stderr).startswith(f"kdexp: cannot write the output dir {outputs}/mine/quickstart")
    assert not any(outputs.iterdir())


def test_early_stopping_ends_the_run_and_its_resume_trains_no_further(tmp_path, data_dir):
    """trainer.early_stopping=2: the run ends two evaluations after its best val accuracy, and a
    start after it stopped (killed before writing its result) writes the result without training.
    A learning rate too small to move the network keeps the val accuracy from improving."""
    env = _env(data_dir, tmp_path)
    args = (*BASE, "experiment=baseline", "trainer.epochs=8", "trainer.max_steps_per_epoch=2", "trainer.lr=1e-7",
            "scheduler.eta_min=0", "trainer.early_stopping=2")
    proc = run_train(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in tmp_path.rglob("result.json")]
    rows = read_metrics(run_dir)
    best = max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))["epoch"]  # ties keep the earliest
    stopped = checkpoint.load(run_dir / checkpoint.LAST)["state"]["stopped_early_epoch"]
    assert stopped == best + 2 < 8 and [r["epoch"] for r in rows] == list(range(1, stopped + 1))
    assert read_result(run_dir)["epochs_completed"] == stopped
    assert "stopping early after epoch" in (run_dir / "train.log").read_text()
    (run_dir / "result.json").unlink()  # as if killed after its last checkpoint
    again = run_train(*args, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_metrics(run_dir) == rows and read_result(run_dir)["epochs_completed"] == stopped
