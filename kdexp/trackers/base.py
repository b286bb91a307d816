"""What an experiment tracker implements, and the wrapper that keeps any tracker from failing or
slowing a run: its calls run in order on a thread of its own, and its first exception disables it
with one warning line (training goes on; metrics.jsonl stays the record)."""
from __future__ import annotations

import logging
import math
import queue
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from kdexp.methods.base import arguments_schema

log = logging.getLogger(__name__)

# result.json's headline numbers, which every tracker logs when the run ends
HEADLINE = ("epochs_completed", "best_val_acc", "best_val_epoch", "test_acc_at_best_val", "test_acc_final",
            "best_test_acc", "best_test_epoch", "train_seconds", "failed_epoch")


@dataclass(frozen=True)
class RunInfo:
    """What a tracker's run is made of, as the job knows it at its start."""

    run_dir: Path
    name: str  # the run dir under its experiment's: resnet50-to-resnet18/logit_a0.5_T4/seed2
    tags: dict[str, str]  # experiment, pair, method, cell, seed, kind: how analysis groups runs
    config: dict  # the resolved config
    resume_id: str | None  # the id this tracker gave the run at an earlier start of this run dir
    logged_epoch: int  # the last epoch it logged then (0: none)


class Tracker(ABC):
    """One tracker client, one module of this package and one `conf/logger/<name>.yaml`. Its module
    imports the client inside these methods only, so a config without it never needs its package.
    Its settings are its __init__'s arguments: `Config`, the `logger/base_<name>` schema, is made
    from them as a method's is."""

    name: ClassVar[str]  # its logger=<name> option, its pip extra, and its key in the run dir's tracker file
    package: ClassVar[str]  # the client's import name
    Config: ClassVar[type]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.Config = arguments_schema(cls)

    @abstractmethod
    def start(self, run: RunInfo) -> str:
        """Open the tracker's run, or continue `run.resume_id`'s; returns its id."""

    def last_epoch(self) -> int | None:
        """The last epoch the started run holds, where the tracker can tell (a killed start may have
        logged an epoch the run dir had not recorded yet); None: trust the run dir's record."""
        return None

    @abstractmethod
    def log_epoch(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl line, at step `row["epoch"]`."""

    @abstractmethod
    def finish(self, result: dict[str, Any] | None) -> None:
        """End the tracker's run with result.json's contents (completed or failed), or with None
        when the run was interrupted (a later start continues it)."""


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics line or a result: what a tracker can plot (None is an epoch
    without evaluation; a NaN loss fails the run anyway)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def headline(result: dict[str, Any]) -> dict[str, float]:
    return numbers({k: result.get(k) for k in HEADLINE})


class FailSafe:
    """Runs one tracker's calls in order on a daemon thread. The first exception (no network, a bad
    key, a full disk, a missing or broken client) disables the tracker with one warning line; later
    calls are dropped."""

    def __init__(self, name: str):
        self.name = name
        self.failed = False
        # a call, an Event to set once the calls before it have run (flushed), or None: stop
        self._calls: queue.Queue[Callable[[], None] | threading.Event | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"kdexp-tracker-{name}", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], None]) -> None:
        if not self.failed:
            self._calls.put(call)

    def flushed(self, timeout: float) -> bool:
        """Wait until every call submitted so far has run (or failed); False if `timeout` ran out."""
        done = threading.Event()
        self._calls.put(done)
        return done.wait(timeout)

    def close(self, timeout: float) -> None:
        """Run what is queued, then stop; a tracker still busy after `timeout` is left behind (a
        daemon thread: it does not keep the process alive) with one warning line."""
        self._calls.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("logger=%s did not finish within %.0f s: its run may lack the last epochs "
                        "(metrics.jsonl has them all)", self.name, timeout)

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            if isinstance(call, threading.Event):
                call.set()
                continue
            if self.failed:
                continue
            try:
                call()
            except Exception as err:  # any failure of a tracker is the tracker's, never the run's
                self.failed = True
                log.warning("logger=%s failed and is off for the rest of this run: %s; training goes on "
                            "(metrics.jsonl has every epoch)", self.name, _one_line(err))


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
