"""Files kdexp reads but may not have written: a checkpoint never runs code when loaded (a published
teacher, a file copied to a teacher's export path, a run dir's last.pt, the teacher-logit cache), and
a result.json of the wrong shape is corrupt, not a traceback that stops a multirun."""
from __future__ import annotations

import io
import logging
import os
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import QUICK, TINY, compose_cfg, run_train, student_args
from kdexp import checkpoint, teacher_cache
from kdexp.teachers import resolve_teacher_export_path
from kdexp.records import RESULT_FILE, kept_result, read_result


class _Payload:
    """Unpickling this runs a shell command: what a hostile "published checkpoint" can hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _hostile(path: Path, marker: Path, **save_args) -> Path:
    """A file shaped like a RepDistiller checkpoint whose unpickling touches `marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"fc.weight": torch.zeros(10, 4)}, "epoch": 240, "accuracy": _Payload(marker)},
               path, **save_args)
    return path


@pytest.mark.parametrize("name", ["published.pth", checkpoint.LAST])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_format"])
def test_a_hostile_checkpoint_is_refused_in_one_line_without_running(tmp_path, name, legacy):
    marker = tmp_path / "payload-ran"
    path = _hostile(tmp_path / name, marker, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(checkpoint.UnsafeCheckpointError) as err:
        checkpoint.load(path)
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "posix.system" in message


@pytest.mark.e2e
def test_a_student_run_refuses_a_hostile_teacher_ckpt(tmp_path, fake_root):
    marker = tmp_path / "payload-ran"
    hostile = _hostile(tmp_path / "downloaded" / "ckpt_epoch_240.pth", marker)
    proc = run_train(*student_args(tmp_path / "out", fake_root, "method=logit", f"teacher.ckpt={hostile}", *QUICK))
    assert not marker.exists(), "unpickling the teacher ran its payload"
    assert proc.returncode == 1, proc.stderr[-2000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"kdexp: refusing to load {hostile}: it holds posix.system") and "teacher.ckpt" in line


@pytest.mark.e2e
def test_a_dry_run_never_unpickles_a_hostile_file_at_the_teacher_export_path(tmp_path):
    marker = tmp_path / "payload-ran"
    args = (*TINY, "experiment=teacher", f"data.root={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'out'}")
    _hostile(resolve_teacher_export_path(compose_cfg(*args)), marker)
    proc = run_train(*args, "dry_run=true")
    assert not marker.exists(), "the dry run's export-ownership check ran the payload"
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_hostile_teacher_logit_cache_is_rebuilt_without_running(tmp_path, caplog):
    marker = tmp_path / "payload-ran"
    spec = {"format": teacher_cache.FORMAT}
    path = _hostile(tmp_path / "teacher.logits-0123456789abcdef.pt", marker)
    with caplog.at_level(logging.WARNING):
        assert teacher_cache._read(path, spec, torch.device("cpu")) is None
    assert not marker.exists() and "refusing to load" in caplog.text


@pytest.mark.e2e
def test_kdexps_own_files_need_no_allowlist(teacher_run):
    """What kdexp writes (weights, optimizer and scheduler state, history, every RNG state; a
    teacher export's records) is tensors and plain values: torch's weights_only reads it with
    nothing allowed. (The session's teacher run: no cost of its own in the suite.)"""
    written = list(teacher_run.rglob("*.pt"))  # and the logit caches that students left there, if any
    assert {checkpoint.LAST, "resnet18_cifar_w8_seed0.pt"} <= {path.name for path in written}
    for path in written:
        torch.load(path, weights_only=True)


def test_an_older_last_pt_with_numpys_rng_array_still_resumes_exactly(tmp_path):
    """A last.pt written before the numpy state was stored as plain values (a run interrupted or
    requeued across the upgrade) resumes with the same draws; the numpy names it needs are allowed
    for last.pt alone."""
    np.random.seed(7)
    old = {"rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    expected = np.random.rand(3)
    checkpoint.save(tmp_path / checkpoint.LAST, old)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / checkpoint.LAST)["rng"])
    assert np.array_equal(np.random.rand(3), expected)
    checkpoint.save(tmp_path / "teacher.pt", old)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="numpy"):
        checkpoint.load(tmp_path / "teacher.pt")


def test_the_rng_state_round_trips_through_weights_only(tmp_path):
    np.random.seed(3)
    buffer = io.BytesIO()
    torch.save(checkpoint.rng_state(), buffer)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    buffer.seek(0)
    checkpoint.set_rng_state(torch.load(buffer, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("content", ["[1, 2]", '"completed"', "null", '{"test_acc_final": 0.9}',
                                     '{"status": "running"}', b"\xff\xfe binary"])
def test_a_result_json_of_the_wrong_shape_is_corrupt_like_truncated_json(tmp_path, content, caplog):
    path = tmp_path / RESULT_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level(logging.WARNING):
        assert kept_result(tmp_path, retry_failed=False) is None  # redone, as a truncated file is
    assert f"ignoring corrupt {path}" in caplog.text
    with pytest.raises(ValueError, match=str(path)):  # analysis and launch.select: corrupt, as truncated JSON is
        read_result(tmp_path)
