"""One process per run dir: an exclusive `flock` on `<run dir>/.run.lock` for the life of a job.

Two starts of one run (a resubmission while the first still trains, a requeued job next to a manual
rerun) would otherwise both train, interleave train.log and race on result.json. The kernel drops
the lock when its process dies (SIGKILL, node reboot of a local disk, preemption), so a stale lock
never blocks a rerun. The file stays (deleting a lock file races with the next taker) and holds who
has it: host, pid, since when and the SLURM job, for the second start's message.
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

LOCK_FILE = ".run.lock"
log = logging.getLogger(__name__)


class RunLocked(RuntimeError):
    """Another live process holds the run dir; nothing was touched."""


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
