"""One run on several ranks (kdexp/distributed.py), on this CPU with gloo: real processes, real
process groups. Two ranks train as one process does, evaluate exactly, and only rank 0 writes into
the run dir; a rank that raises fails the run in bounded time, named in result.json."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import CPU, REPO, TINY, communicate, compose_cfg, wait_until, without_timing
from kdexp import checkpoint, distributed, runlock, teacher_cache
from kdexp.config import ConfigError, validate
from kdexp.data import load_data
from kdexp.data.fake import write_fake_cifar
from kdexp.data.loaders import shard_slice
from kdexp.distributed import World
from kdexp.execution import Execution
from kdexp.job import build_loop, seed_everything
from kdexp.models import build_model
from kdexp.outcome import EXIT_CODES
from kdexp.records import METRICS_FILE, RESULT_FILE
from kdexp.teachers import FrozenTeacher

# 101 test images: two ranks' parts differ in size (50, 51); 101 training images with batch 32:
# the epoch's last global batch (5 images) splits unevenly (2, 3), so its loss scales are not 1.
TRAIN_IMAGES, TEST_IMAGES = 101 + 40, 101
SMALL = ("trainer.batch_size=32", "data.val_size=40", "data.eval_batch_size=16")
# Tiny-net training is chaotic: in one process a 1e-6 relative change of the lr moves the weights by
# 6e-4 after 10 steps of SGD with momentum at lr 0.05. Plain SGD at lr 0.01 keeps the rounding that
# another batch split brings (~3e-8 a step) at ~3e-8 after 8 steps, so a tolerance can tell it from a
# wrong shard (1e-3 and more).
STEADY = ("trainer.lr=0.01", "optimizer.momentum=0", "optimizer.nesterov=false")


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odd") / "fake"
    write_fake_cifar(root, TRAIN_IMAGES, TEST_IMAGES)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, size: int, port: int) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(size),
            "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}


# --- in-process loops on two spawned ranks -------------------------------------------------------

def _freeze_batchnorm(model: nn.Module) -> None:
    """Every BatchNorm in eval mode for good (running statistics, as kdexp.teachers.FrozenTeacher
    keeps its network): the forward of each image then does not depend on the batch it is in."""
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.eval()
            bn.train = lambda mode=True, bn=bn: bn


class Preempted(Exception):
    """Every rank stops here, right after an epoch's checkpoint, as a requeued job does."""


def _stop(row: dict) -> None:
    raise Preempted()


# logit KD from the teacher-logit cache, looked up by each rank's image indices and views
CACHED_KD = ("method=logit", "method.T=3", "teacher=resnet18", "teacher.width=4", "execution.teacher_cache=true")


def _loop_on_rank(rank: int, size: int, port: int, run_dir: str, root: str, mode: str,
                  overrides: tuple[str, ...] = ()) -> None:
    """One rank of a run (size 1: a plain process): builds the real loop and trains it, resuming
    from last.pt when there is one (`train`; rank 0 writes last.pt and metrics.jsonl), or trains its
    first epoch only (`stop`), or evaluates it once (`evaluate`; rank 0 writes eval.json)."""
    if size > 1:
        os.environ.update(_rank_env(rank, size, port))
    torch.set_num_threads(1)
    cfg = compose_cfg(*TINY, f"data.root={root}", f"data.fake_train_size={TRAIN_IMAGES}",
                      f"data.fake_test_size={TEST_IMAGES}", *SMALL, *STEADY, "trainer.epochs=2",
                      *overrides)
    method = validate(cfg)
    with distributed.process_group(distributed.from_env(), 60) as world:
        if world.distributed:  # NCCL's watchdog would end the process before rank 0 records a failure
            assert os.environ[distributed.NCCL_ERROR_HANDLING] == "2"
        execution = Execution.resolve(cfg.execution, CPU, method, cfg.data.loader)
        seed_everything(cfg.seed, cfg.trainer.deterministic)
        splits, teacher, cache = load_data(cfg.data), None, None
        if method.needs_teacher:
            torch.manual_seed(1)
            teacher = execution.prepare(FrozenTeacher(build_model("resnet18", width=4)))
            cache = teacher_cache.build(teacher, splits.train_x, execution)
        loop = build_loop(cfg, method, execution, splits, teacher, CPU, Path(run_dir), cache, world=world)
        _freeze_batchnorm(loop.student)
        if mode != "evaluate":
            loop.resume()
            loop.log_epoch = _stop if mode == "stop" else None
            try:
                loop.fit()
            except Preempted:
                pass
            return
        row = loop.evaluate(1)
        if world.is_main:
            Path(run_dir, "eval.json").write_text(json.dumps({**row, "state": loop.state.last_eval}))


def _two_rank_loops(run_dir: Path, root: Path, mode: str, overrides: tuple[str, ...] = ()) -> None:
    run_dir.mkdir(exist_ok=True)
    torch.multiprocessing.start_processes(_loop_on_rank, (2, _free_port(), str(run_dir), str(root), mode, overrides),
                                         nprocs=2, start_method="spawn")


def _run_loops(tmp_path: Path, root: Path, mode: str, overrides: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """The same loop as one process and as two spawned ranks; their run dirs."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    _loop_on_rank(0, 1, 0, str(one), str(root), mode, overrides)
    _two_rank_loops(two, root, mode, overrides)
    return one, two


def _metrics(run_dir: Path) -> list[dict]:
    return without_timing([json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()])


@pytest.mark.e2e
@pytest.mark.parametrize("overrides", [(), CACHED_KD], ids=["ce", "logit-kd-cached-teacher"])
def test_two_ranks_train_as_one_process_does(tmp_path, odd_root, overrides):
    """Two ranks on gloo end with the weights one process reaches with the same global batch (2
    epochs of 4 steps, each last one an uneven 2 + 3 split; plain SGD: STEADY), and the same metrics.
    BatchNorm setting: every BatchNorm frozen in eval mode. With per-rank statistics (DDP's default)
    each rank normalises by its half batch, which one process never does, so nothing is equal to
    compare; trainer.sync_bn=true would be, but SyncBatchNorm refuses CPU tensors in this torch
    (kdexp.distributed.check refuses it).
    Frozen, the forward of each image is the same in any batch, and what is left to compare is
    exactly what DDP and the shard rule do: each rank's images, its loss scale, the averaged gradients.
    A wrong shard (e.g. both ranks taking the first half) makes the weights differ; so does a
    teacher-logit cache looked up by other images than the rank's own."""
    one, two = _run_loops(tmp_path, odd_root, "train", overrides)
    a, b = (checkpoint.load(d / checkpoint.LAST) for d in (one, two))
    assert a["state"]["epoch"] == b["state"]["epoch"] == 2
    for name, tensor in a["student"].items():
        torch.testing.assert_close(b["student"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    rows = [_metrics(d) for d in (one, two)]
    assert [r["test_acc"] for r in rows[0]] == [r["test_acc"] for r in rows[1]]
    for row_a, row_b in zip(*rows):
        assert row_b.keys() == row_a.keys()
        for key, value in row_a.items():
            assert row_b[key] == (value if value is None else pytest.approx(value, rel=1e-4, abs=1e-5)), key


@pytest.mark.e2e
def test_reduced_evaluation_counts_each_test_image_once(tmp_path, odd_root):
    """101 test images on two ranks (50 + 51): accuracy, per-class accuracy and fidelity are those of
    one process exactly, with no padding image counted."""
    one, two = _run_loops(tmp_path, odd_root, "evaluate")
    a, b = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    assert a["test_acc"] == b["test_acc"] and a["val_acc"] == b["val_acc"]
    assert a["state"]["per_class_test_acc"] == b["state"]["per_class_test_acc"]
    assert round(a["test_acc"] * TEST_IMAGES) == a["test_acc"] * TEST_IMAGES  # a count over 101 images


@pytest.mark.e2e
def test_every_rank_resumes_from_rank_0s_checkpoint_exactly(tmp_path, odd_root):
    """Two ranks stopped after epoch 1 (as a preempted job, right after its checkpoint) and started
    again end exactly where two uninterrupted ranks do: the same weights and metrics, bit for bit."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _two_rank_loops(whole, odd_root, "train")
    _two_rank_loops(resumed, odd_root, "stop")
    assert checkpoint.load(resumed / checkpoint.LAST)["state"]["epoch"] == 1
    _two_rank_loops(resumed, odd_root, "train")
    a, b = (checkpoint.load(d / checkpoint.LAST) for d in (whole, resumed))
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert _metrics(whole) == _metrics(resumed)


def test_shards_cover_every_item_once():
    for n in (0, 1, 5, 32, 101):
        for size in (1, 2, 3, 8):
            parts = [list(range(n))[shard_slice(n, r, size)] for r in range(size)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_batch_the_ranks_cannot_split_is_one_line():
    with pytest.raises(ConfigError, match=r"^trainer.batch_size=30 must be divisible by the 4 ranks"):
        cfg = compose_cfg(*TINY, "trainer.batch_size=30")
        distributed.check(World(0, 4), cfg.trainer, cfg.data, CPU)


def test_several_ranks_take_image_folders_through_their_loader_but_not_cifar_through_pil():
    cifar = compose_cfg(*TINY, "data.loader=torch")
    with pytest.raises(ConfigError, match=r"^data.loader=torch runs on one process"):
        distributed.check(World(0, 2), cifar.trainer, cifar.data, CPU)
    folders = compose_cfg(*TINY, "data=fake_imagenet")
    distributed.check(World(0, 2), folders.trainer, folders.data, CPU)


def test_bad_rank_variables_are_one_line():
    with pytest.raises(ConfigError, match=r"^RANK=2 must be in \[0, WORLD_SIZE=2\)"):
        distributed.from_env({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(ConfigError, match=r"^WORLD_SIZE='two' must be an integer"):
        distributed.from_env({"WORLD_SIZE": "two"})
    assert distributed.from_env({}) == World()


# --- the real entry point on two ranks ------------------------------------------------------------

# Rank r runs kdexp.train with an audit hook that lists every file it opens for writing, creates,
# renames, removes or re-moves (Python's audit events: tempfile, os.replace, logging, Hydra's
# .hydra/ and torch.save through kdexp.records all pass through them).
AUDITED = """
import os, runpy, sys
log = open(sys.argv.pop(1), "w", buffering=1)
WRITES = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.link", "os.symlink")
def hook(event, args):
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        mode, flags = args[1] or "", args[2] or 0
        if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            log.write(f"{os.path.abspath(os.fsdecode(args[0]))}\\n")
    elif event in WRITES:
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)):
                log.write(f"{os.path.abspath(os.fsdecode(path))}\\n")
sys.addaudithook(hook)
sys.argv[0] = "kdexp.train"
runpy.run_module("kdexp.train", run_name="__main__")
"""


def _two_ranks(tmp_path: Path, out: Path, args: tuple[str, ...],
               rank_args: dict[int, tuple[str, ...]] | None = None) -> list[tuple[int, str, list[str], int]]:
    """`python -m kdexp.train *args` as ranks 0 and 1 of one run (as torchrun starts them); each
    rank's exit code, stderr, the paths it wrote and its pid."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        writes = tmp_path / f"writes.rank{rank}"
        argv = [sys.executable, "-c", AUDITED, str(writes), *args, f"paths.output_dir={out}",
                *(rank_args or {}).get(rank, ())]
        procs.append((writes, subprocess.Popen(argv, cwd=REPO, env={**os.environ, **_rank_env(rank, 2, port)},
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    ended = []
    for writes, proc in procs:
        _, stderr = communicate(proc)
        ended.append((proc.returncode, stderr, writes.read_text().splitlines(), proc.pid))
    return ended


def _run_dir(out: Path) -> Path:
    (result,) = out.rglob(RESULT_FILE)  # one run dir, whatever the number of ranks
    return result.parent


def _inside(paths: list[str], folder: Path) -> list[str]:
    return sorted({p for p in paths if Path(p).is_relative_to(folder.resolve()) and Path(p) != folder.resolve()})


@pytest.mark.e2e
def test_rank_0_alone_writes_the_run_dir_and_holds_its_lock(tmp_path, odd_root):
    """Every file of the run dir is rank 0's (rank 1's writes are audited: none there); while another
    process holds the run dir, both ranks are refused and neither writes."""
    out = tmp_path / "out"
    args = (*TINY, f"data.root={odd_root}", *SMALL, "trainer.epochs=1", "trainer.max_steps_per_epoch=2")
    ended = _two_ranks(tmp_path, out, args)
    assert [code for code, *_ in ended] == [0, 0], [err[-2000:] for _, err, *_ in ended]
    run_dir = _run_dir(out)
    names = {Path(p).relative_to(run_dir.resolve()).parts[0] for p in _inside(ended[0][2], run_dir)}
    assert {".hydra", "train.log", ".run.lock", "result.json", "last.pt", METRICS_FILE} <= names
    assert _inside(ended[1][2], run_dir) == []  # no .hydra, train.log, lock, checkpoint or result
    assert json.loads((run_dir / RESULT_FILE).read_text())["status"] == "completed"
    assert json.loads((run_dir / ".run.lock").read_text())["pid"] == ended[0][3]  # rank 0 held it
    with runlock.hold(run_dir):  # another live process holds the run dir: every rank is refused
        again = _two_ranks(tmp_path, out, args)
    assert [code for code, *_ in again] == [EXIT_CODES["locked"]] * 2
    assert all("is in use by" in err for _, err, *_ in again)
    (_, _, tried, _), (_, _, wrote, _) = again
    assert _inside(tried, run_dir) == [str((run_dir / runlock.LOCK_FILE).resolve())]  # rank 0 tried the lock
    assert _inside(wrote, run_dir) == []


@pytest.mark.e2e
def test_a_rank_that_raises_fails_the_run_in_bounded_time(tmp_path, odd_root):
    """Rank 1 cannot write its generated data (its data.root lies under a file); rank 0, waiting for
    it in the first collective, fails within trainer.dist_timeout_s and records which rank failed and
    why (data.root is not in the run dir's name: both ranks share one run dir)."""
    out = tmp_path / "out"
    (tmp_path / "a-file").write_text("")
    start = time.monotonic()
    ended = _two_ranks(tmp_path, out, (*TINY, f"data.root={odd_root}", *SMALL, "trainer.epochs=1",
                                         "trainer.dist_timeout_s=60"),
                       {1: (f"data.root={tmp_path / 'a-file' / 'fake'}",)})
    seconds = time.monotonic() - start
    assert [code for code, *_ in ended] == [1, 1], [err[-2000:] for _, err, *_ in ended]
    result = json.loads((_run_dir(out) / RESULT_FILE).read_text())
    assert result["status"] == "failed"
    assert result["error"].startswith("rank 1: NotADirectoryError: "), result["error"]
    assert "kdexp (rank 1): " in ended[1][1]
    assert seconds < 60 + 120  # the timeout, plus two starts on a busy machine: never a hang


@pytest.mark.e2e
def test_a_killed_rank_is_named_in_the_failure(tmp_path, odd_root):
    """Rank 1 killed outright (SIGKILL: no Python error, no report) while training: rank 0's
    collective breaks at once, and its result names rank 1 (its heartbeat stopped), not rank 0's
    broken collective, as the cause."""
    out = tmp_path / "out"
    port = _free_port()
    args = (*TINY, f"data.root={odd_root}", *SMALL, "trainer.epochs=300", "trainer.max_steps_per_epoch=2",
            "trainer.dist_timeout_s=300", f"paths.output_dir={out}")
    ranks = [subprocess.Popen([sys.executable, "-m", "kdexp.train", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **_rank_env(rank, 2, port)})
             for rank in (0, 1)]
    wait_until(lambda: list(out.rglob("last.pt")), "the first epoch's checkpoint")
    ranks[1].kill()
    killed = time.monotonic()
    _, stderr = communicate(ranks[0])
    communicate(ranks[1])
    assert ranks[0].returncode == 1, stderr[-2000:]
    assert time.monotonic() - killed < 120  # STOPPED_AFTER_S and a record, never dist_timeout_s
    error = json.loads((_run_dir(out) / RESULT_FILE).read_text())["error"]
    assert error.startswith("rank 1 stopped without raising an error (killed: "), error
    assert "; rank 0 then: " in error


@pytest.fixture
def quick_heartbeat(monkeypatch):
    monkeypatch.setattr(distributed, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(distributed, "STOPPED_AFTER_S", 0.5)


def _store(size: int) -> torch.distributed.Store:
    return torch.distributed.TCPStore("127.0.0.1", _free_port(), size, True, wait_for_workers=False)


def test_rank_0s_own_error_is_its_own_while_the_others_wait_alive(quick_heartbeat):
    """Rank 1 alive (beating, e.g. waiting for rank 0 in a collective), rank 2 reported a failure
    later: rank 0's error is named only when no other rank reported one; a live rank is never blamed."""
    store = _store(3)
    main = World(0, 3, store=store)
    with distributed._heartbeat(store, 1), distributed._heartbeat(store, 2):
        assert distributed.failure_reason(main, ValueError("disk full")) == "rank 0: ValueError: disk full"
        distributed.report_failure(World(2, 3, store=store), KeyError("x"))
        assert distributed.failure_reason(main, RuntimeError("peer closed")) == "rank 2: KeyError: 'x'"


def test_a_rank_whose_heartbeat_stopped_is_named_before_the_reports(quick_heartbeat):
    """Rank 1 beat, then stopped without a report (killed); rank 2 reported the broken collective
    that followed: rank 1 is the cause."""
    store = _store(3)
    with distributed._heartbeat(store, 1):
        time.sleep(0.2)
    with distributed._heartbeat(store, 2):
        distributed.report_failure(World(2, 3, store=store), RuntimeError("Connection closed by peer"))
        reason = distributed.failure_reason(World(0, 3, store=store), RuntimeError("Connection reset by peer"))
    assert reason.startswith("rank 1 stopped without raising an error"), reason
    assert reason.endswith("rank 0 then: RuntimeError: Connection reset by peer")


@pytest.mark.e2e
def test_ctrl_c_under_torchrun_stops_every_rank(tmp_path, odd_root):
    """Ctrl-C in the terminal of `torchrun --nproc-per-node 2 -m kdexp.train ...` (SIGINT to its
    process group: torchrun and both ranks): every rank stops at once, each says it was interrupted
    and how to resume, nothing is recorded as a result and last.pt is there to resume from."""
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen([str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()),
                             "-m", "kdexp.train", *TINY, f"data.root={odd_root}", *SMALL, "trainer.epochs=300",
                             "trainer.max_steps_per_epoch=2", f"paths.output_dir={out}"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    checkpoint_file = wait_until(lambda: next(out.rglob("last.pt"), None), "the first epoch's checkpoint")
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = communicate(proc)
    assert proc.returncode != 0
    assert "kdexp: interrupted after epoch" in output and "kdexp (rank 1): interrupted after epoch" in output, output
    assert not (checkpoint_file.parent / RESULT_FILE).exists()
    assert checkpoint_file.exists()
    with pytest.raises(ProcessLookupError):  # no rank left behind in the session
        os.killpg(proc.pid, 0)
