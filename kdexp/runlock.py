"""One process per run dir: an exclusive `flock` on `<run dir>/.run.lock` for the life of a job.

Two starts of one run (a resubmission while the first still trains, a requeued job next to a manual
rerun) would otherwise both train, interleave train.log and race on result.json. The kernel drops
the lock when its process dies (SIGKILL, node reboot of a local disk, preemption), so a stale lock
never blocks a rerun. The file stays (deleting a lock file races with the next taker) and holds who
has it: host, pid, since when and the SLURM job, for the second start's message.

A claim (`claim`) makes a file that several runs may write (a teacher export: every teacher run of one
identity writes the same path) one run's: `<file>.claim` names the run dir that claimed it, and its
`flock` is held while the claim is checked or taken and while the file is written. A run claims before
training and checks again, under the lock, when it writes; the claim of a run that neither holds its
run dir's lock nor completed (killed, failed, deleted) may be taken over.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from kdexp.records import read_result

LOCK_FILE = ".run.lock"
CLAIM_SUFFIX = ".claim"
log = logging.getLogger(__name__)


class RunLocked(RuntimeError):
    """Another live process holds the run dir; nothing was touched."""


class Claimed(RuntimeError):
    """Another run keeps the claim on a file: it is running, or it completed."""

    def __init__(self, target: Path, owner: str, state: str):
        super().__init__(f"{target} is claimed by {owner}, which {state}")
        self.owner, self.state = owner, state


def _holder_text(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "another process"
    slurm = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}{slurm}"


def holder(run_dir: str | Path) -> str | None:
    """Who holds `run_dir`'s lock now ("pid 12 on node3 since ..."), or None when nobody does.
    Only looks: creates nothing."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: never run, or not readable (then a start will say so)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_text(path)
    except OSError:  # this file system cannot lock
        return None
    finally:
        os.close(fd)  # also drops the shared lock just taken
    return None


@contextlib.contextmanager
def hold(run_dir: str | Path) -> Iterator[None]:
    """Hold `run_dir` exclusively, or raise RunLocked naming the holder (before writing anything)."""
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{run_dir} is in use by {_holder_text(path)}; nothing was changed: wait for "
                            f"that run to end (or stop it), then run the same command again") from None
        except OSError as err:  # e.g. ENOLCK on a file system without locks: run unguarded, say so
            log.warning("cannot lock %s (%s): nothing stops a second start of this run", path, err)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "slurm_job": os.environ.get("SLURM_JOB_ID")}


def claim_file(target: Path) -> Path:
    return target.with_name(target.name + CLAIM_SUFFIX)


def claimant(target: Path, run_dir: Path) -> tuple[str, str] | None:
    """The other run dir that keeps `target`'s claim and what it does ("is running (pid 12 on node3
    since ...)" or "completed"), or None: unclaimed, claimed by `run_dir`, or claimed by a run that
    neither holds its run dir's lock nor completed, whose claim may be taken over. Only looks."""
    owner = _claimed_by(claim_file(target))
    if owner is None or _same(owner, run_dir):
        return None
    busy = holder(owner)
    if busy:
        return owner, f"is running ({busy})"
    return (owner, "completed") if _completed(owner) else None


@contextlib.contextmanager
def claim(target: Path, run_dir: Path) -> Iterator[None]:
    """Hold the claim's lock for the block, in which `target` may be checked and written, and claim
    `target` for `run_dir` when the block succeeds (taking over a dead run's claim); raises Claimed,
    before the block, while another run keeps it. Call it holding `run_dir`'s own lock (`hold`): that
    lock is what tells other runs that this one lives."""
    path = claim_file(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waited for: others hold it only to check or write the file
        except OSError as err:  # e.g. ENOLCK: the check below still refuses a live or completed owner
            log.warning("cannot lock %s (%s): nothing stops a concurrent claim", path, err)
        other = claimant(target, run_dir)
        if other:
            raise Claimed(target, *other)
        yield
        previous = _claimed_by(path)
        if previous is not None and not _same(previous, run_dir):
            log.warning("took over the claim on %s from %s: no process holds that run and it did not complete",
                        target, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"run_dir": str(Path(run_dir).resolve()), **_me()}).encode(), 0)
    finally:
        os.close(fd)  # releases the lock


def _claimed_by(path: Path) -> str | None:
    try:
        owner = json.loads(path.read_text() or "{}").get("run_dir")
    except (OSError, ValueError, AttributeError):  # none, unreadable, or half written by a killed claim
        return None
    return owner if isinstance(owner, str) else None


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _completed(run_dir: str) -> bool:
    try:
        result = read_result(Path(run_dir))
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and result.get("status") == "completed"
