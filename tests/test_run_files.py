"""What a run's own files protect, in process: the claim on a teacher export (kdexp.runlock.claim)
and its re-check at export time, the teacher a resume distils from, a damaged last.pt, and a write
that fails (a full disk) named in one line with the epoch it hit. The two-process race for one
export is in test_lifecycle.py."""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import TINY, compose_cfg, tiny_loop
from kdexp import checkpoint, job, runlock, task, teachers
from kdexp.data import data_identity, load_data
from kdexp.data.fake import write_fake_cifar
from kdexp.loop import Loop
from kdexp.models import build_model
from kdexp.records import read_metrics, read_result, write_result
from kdexp.teachers import TeacherError, export_teacher, resolve_teacher_path

# Runs here test what happens around training: small data, one step an epoch.
SIZES = ("data.fake_train_size=400", "data.fake_test_size=100", "data.val_size=100")
STEPS = ("trainer.max_steps_per_epoch=1", "trainer.batch_size=16")


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "fake"
    write_fake_cifar(root, train_size=400, test_size=100)
    return root


def _cfg(small_root: Path, out: Path, *overrides: str):
    return compose_cfg(*TINY, *SIZES, f"data.root={small_root}", f"paths.output_dir={out}", *STEPS, *overrides)


def _run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run_dir


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != runlock.LOCK_FILE}


# --- the claim on a teacher export ---

def test_a_claim_is_kept_by_a_running_or_completed_run_and_taken_over_from_a_dead_one(tmp_path):
    target = tmp_path / "teachers" / "t.pt"
    a, b, c = (tmp_path / name for name in "abc")
    for run_dir in (a, b, c):
        run_dir.mkdir()
    with runlock.hold(a):
        with runlock.claim(target, a):
            pass
        with pytest.raises(runlock.Claimed, match=rf"claimed by {a}, which is running \(pid {os.getpid()} on "):
            with runlock.claim(target, b):
                pass
        with runlock.claim(target, a):  # its own resume or requeue
            pass
    with runlock.hold(b), runlock.claim(target, b):  # a ended without completing: its claim is free
        pass
    assert runlock.claimant(target, c) is None and runlock.claimant(target, b) is None
    write_result(b, {"status": "completed"})
    assert runlock.claimant(target, c) == (str(b), "completed")
    with pytest.raises(runlock.Claimed, match="which completed"):
        with runlock.claim(target, c):
            pass
    (b / "result.json").unlink()
    with pytest.raises(ValueError), runlock.claim(target, c):  # a block that fails claims nothing
        raise ValueError
    assert json.loads(runlock.claim_file(target).read_text())["run_dir"] == str(b)


def _claim(export: Path, run_dir: Path) -> None:
    """`run_dir`'s claim on `export`, as kdexp.runlock.claim writes it."""
    export.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{export}.claim").write_text(json.dumps({"run_dir": str(run_dir)}))


def test_a_claimed_export_refuses_a_start_and_fails_a_dry_run_before_anything_is_written(tmp_path, small_root):
    """Another teacher run of this identity, running now, claimed the export: this one is refused in
    one line before it trains (and its dry run says so), and its run dir gets no file."""
    run_dir, other = _run_dir(tmp_path), tmp_path / "other"
    other.mkdir()
    cfg = _cfg(small_root, tmp_path, "experiment=teacher", "trainer.epochs=1")
    export = teachers.resolve_teacher_export_path(cfg)
    _claim(export, other)
    with runlock.hold(other):
        with pytest.raises(job.CannotStart) as refused:
            job.run(cfg, run_dir)
        dry = job.run(_cfg(small_root, tmp_path, "experiment=teacher", "trainer.epochs=1", "dry_run=true"), run_dir)
    assert str(refused.value).startswith(f"teacher export {export} is claimed by the teacher run in {other}, which is "
                                         f"running (pid {os.getpid()} on ")
    assert str(refused.value).endswith(f"; export this one elsewhere (paths.teachers_dir=...), or delete "
                                       f"{export}.claim to let this run replace its teacher")
    assert dry.status == "dry_run" and str(refused.value) in dry.reason
    assert not _files(run_dir) and not export.exists()


@pytest.mark.parametrize("rival", ["exported", "took the claim"])
def test_an_export_checked_again_at_export_time_fails_the_loser_and_keeps_its_weights(tmp_path, small_root, monkeypatch,
                                                                                     rival):
    """Another run of this teacher exported while this one trained (a run whose claim was taken over,
    or one that claimed nothing), or holds the claim now: this run fails in one line instead of
    replacing that export, with its own weights in its last.pt."""
    run_dir, other = _run_dir(tmp_path), tmp_path / "other"
    other.mkdir()
    cfg = _cfg(small_root, tmp_path, "experiment=teacher", "trainer.epochs=1")
    export = teachers.resolve_teacher_export_path(cfg)
    fit = Loop.fit

    def fit_then_rival(self: Loop):
        state = fit(self)
        if rival == "exported":
            checkpoint.save(export, {"run_dir": str(other), "state_dict": {}})
        else:
            _claim(export, other)
        return state

    monkeypatch.setattr(Loop, "fit", fit_then_rival)
    with runlock.hold(other), pytest.raises(TeacherError) as raised:
        job.run(cfg, run_dir)
    message = str(raised.value)
    what = f"already holds the teacher trained in {other}" if rival == "exported" else \
        f"is claimed by the teacher run in {other}, which is running"
    assert message.startswith(f"teacher export {export} {what}") and "\n" not in message
    assert message.endswith(f"(this run's teacher stays in {run_dir}/last.pt, not exported: rerun with "
                            "retry_failed=true to export it without retraining)")
    assert checkpoint.load(export)["run_dir"] == str(other) if rival == "exported" else not export.exists()
    result = read_result(run_dir)
    assert result["status"] == "failed" and result["failed_epoch"] == 1 and "TeacherError" in result["error"]
    assert checkpoint.load(run_dir / checkpoint.LAST)["state"]["epoch"] == 1


# --- the teacher a resume distils from ---

def _export_a_teacher(cfg, seed: int) -> Path:
    """An untrained teacher exported where `cfg`'s student looks (weights from `seed`): a valid file
    in no time, as the tests of what happens around training need."""
    path, t, d = resolve_teacher_path(cfg), cfg.teacher, cfg.data
    splits = load_data(d)
    identity = data_identity(d.name, len(splits.train_x) + len(splits.val_x), d.val_size, d.split_seed)
    torch.manual_seed(seed)
    export_teacher(build_model(t.arch, cfg.model.num_classes, t.stem, t.width), path, teachers.teacher_id(cfg),
                   identity, 0.1, "elsewhere")
    return path.resolve()


@pytest.mark.e2e
def test_a_resume_with_another_teacher_file_is_refused_and_an_unrecorded_one_resumes(tmp_path, small_root, monkeypatch,
                                                                                     caplog):
    """Interrupted after epoch 1, the student is started again with another paths.teachers_dir (not in
    its dir name), then with its teacher file replaced in place (a requeued job): both are refused in
    one line, nothing written. With its own teacher it resumes; a last.pt from before kdexp recorded
    the teacher resumes with a warning."""
    def cfg(teachers: str):
        return _cfg(small_root, tmp_path, "method=logit", "teacher=resnet18", "teacher.width=4",
                    f"paths.teachers_dir={tmp_path / teachers}", "trainer.epochs=3")

    ours, theirs = _export_a_teacher(cfg("ours"), 0), _export_a_teacher(cfg("theirs"), 1)
    run_dir = _run_dir(tmp_path)

    def interrupt_at(stop: int | None) -> None:
        def train_epoch(self: Loop, epoch: int) -> dict:
            if epoch == stop:
                raise KeyboardInterrupt
            return real(self, epoch)
        monkeypatch.undo()
        real = Loop.train_epoch
        monkeypatch.setattr(Loop, "train_epoch", train_epoch)

    interrupt_at(2)
    with pytest.raises(job.Interrupted):
        job.run(cfg("ours"), run_dir)
    kept = _files(run_dir)
    sha = {p: checkpoint.file_sha256(p) for p in (ours, theirs)}
    refusal = (f"{run_dir}/last.pt was trained from teacher {ours} (sha256 {sha[ours][:16]}), but this start loads "
               "{} (sha256 {}): resume with the teacher it started with (paths.teachers_dir, teacher.ckpt), or "
               "delete it to start this run over with this one")
    with pytest.raises(job.CannotStart) as raised:
        job.run(cfg("theirs"), run_dir)
    assert str(raised.value) == refusal.format(theirs, sha[theirs][:16])
    original = ours.read_bytes()
    shutil.copy(theirs, ours)  # replaced where it was: a requeued job finds another file at its path
    with pytest.raises(job.CannotStart) as raised:
        job.run(cfg("ours"), run_dir)
    assert str(raised.value) == refusal.format(ours, sha[theirs][:16])
    assert _files(run_dir) == kept  # nothing written, result.json included
    ours.write_bytes(original)

    interrupt_at(3)
    with pytest.raises(job.Interrupted):  # its own teacher: resumed, and stopped again after epoch 2
        job.run(cfg("ours"), run_dir)
    last = checkpoint.load(run_dir / checkpoint.LAST)
    assert last["state"]["epoch"] == 2 and last["teacher"] == {"path": str(ours), "sha256": sha[ours]}
    del last["teacher"]  # as kdexp wrote it before it recorded the teacher
    checkpoint.save(run_dir / checkpoint.LAST, last)
    interrupt_at(None)
    assert job.run(cfg("ours"), run_dir).status == "completed"
    assert "records no teacher (written before kdexp recorded it): resuming without checking" in caplog.text
    assert read_result(run_dir)["teacher"] == {"path": str(ours), "sha256": sha[ours]}


# --- a damaged last.pt ---

def _damage_the_weights(path: Path) -> None:
    """Flip one byte inside the largest tensor of a torch zip: the file still loads."""
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26:entry.header_offset + 30])
    at = entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_or_foreign_last_pt_says_to_delete_it(tmp_path, splits, teacher):
    """A byte damaged in the weights loads without error (torch.load checks no CRC) and trains into
    NaN, which retry_failed=true repeats, blaming the learning rate; a last.pt of another network
    fails with a KeyError or a state_dict error: each says, in one line, to delete the file."""
    quick = ("trainer.epochs=1", "trainer.max_steps_per_epoch=1")
    tiny_loop(tmp_path, splits, teacher, *quick).fit()
    last = tmp_path / checkpoint.LAST
    intact = last.read_bytes()
    again = tiny_loop(tmp_path, splits, teacher, *quick)
    _damage_the_weights(last)
    with pytest.raises(checkpoint.CheckpointError, match=r"is damaged \(.+ fails its CRC check\); delete it to start "
                                                         r"this run over$"):
        again.resume()
    for foreign in ({"student": {}}, {"state": {}}):
        checkpoint.save(last, foreign)
        with pytest.raises(checkpoint.CheckpointError) as raised:
            again.resume()
        assert str(raised.value).startswith(f"{last} does not fit this run (")
        assert str(raised.value).endswith("); delete it to start this run over") and "\n" not in str(raised.value)
    last.write_bytes(intact)
    assert again.resume() and again.state.epoch == 1


# --- a write that fails ---

def _full_disk(monkeypatch, name: str, after: int) -> None:
    """Writes of `name` fail with ENOSPC after `after` of them succeeded, as on a full disk: the
    error comes from a write (here its fsync) on the temporary file and names no file."""
    fsync, done = os.fsync, []

    def full(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}."):
            done.append(fd)
            if len(done) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full)


@pytest.mark.parametrize("name, after, failed_epoch", [("last.pt", 1, 2), ("result.json", 0, None)])
def test_a_full_disk_fails_in_one_line_naming_the_file_in_the_epoch_it_hit(tmp_path, small_root, monkeypatch, name,
                                                                           after, failed_epoch):
    """A 3-epoch run whose disk fills while checkpointing epoch 2 is recorded as failed in epoch 2 (not
    3, the epoch its counter had advanced to); one whose result.json cannot be written says so."""
    run_dir = _run_dir(tmp_path)
    cfg = _cfg(small_root, tmp_path, "experiment=baseline", "trainer.epochs=3")
    _full_disk(monkeypatch, name, after)
    outcome = task._outcome(cfg, run_dir)
    assert outcome.status == "failed"
    assert outcome.reason == (f"cannot write {run_dir / name}: No space left on device "
                              f"(traceback in {run_dir}/train.log)")
    if failed_epoch is None:  # the failure's own record hit the full disk too
        assert not (run_dir / "result.json").exists()
        return
    result = read_result(run_dir)
    assert result["failed_epoch"] == failed_epoch and f"No space left on device: '{run_dir / name}'" in result["error"]
    assert [row["epoch"] for row in read_metrics(run_dir)] == [1]
    assert checkpoint.load(run_dir / checkpoint.LAST)["state"]["epoch"] == 1  # epoch 1's, intact


def test_a_start_removes_the_half_written_files_a_killed_process_of_its_own_left(tmp_path, small_root):
    """Issue 18: SIGKILL skips atomic_write_bytes' cleanup; the next start of that run (holding its lock)
    removes its own run dir's temp files, and its export's (holding the claim), never another export's."""
    run_dir = _run_dir(tmp_path)
    cfg = _cfg(small_root, tmp_path, "experiment=teacher", "trainer.epochs=1")
    export = teachers.resolve_teacher_export_path(cfg)
    export.parent.mkdir(parents=True)
    ours = [run_dir / ".result.json.k1ll3d.tmp", run_dir / ".last.pt.k1ll3d.tmp", export.parent / f".{export.name}.k1ll3d.tmp"]
    theirs = export.parent / ".another_teacher.pt.l1v3.tmp"
    for path in (*ours, theirs):
        path.write_bytes(b"half a file")
    assert job.run(cfg, run_dir).status == "completed"
    assert [p for p in ours if p.exists()] == [] and theirs.exists()
