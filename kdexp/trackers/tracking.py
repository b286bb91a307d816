"""The job's trackers (cfg.logger): one tracker run per job in each, whose id the run dir keeps
(records.TRACKER_FILE) so a resumed or requeued start continues it, never opens a second one."""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from kdexp.config import method_tag, run_role
from kdexp.records import TRACKER_FILE, atomic_write_json
from kdexp.trackers.base import FailSafe, RunInfo

log = logging.getLogger(__name__)

# Training waits this long for the trackers to open their runs, so that their ids are in the run
# dir before the first epoch (a kill from then on is continued); a tracker still opening after it
# (a network timing out) goes on opening on its thread while training starts.
START_WAIT_S = 30.0
# The job's end waits this long for the trackers to send what is queued and close their runs:
# within SLURM's default 30 s between the SIGTERM of a preemption and its SIGKILL.
CLOSE_WAIT_S = 20.0


def missing_client(logger: DictConfig) -> str | None:
    """Why a tracker that cfg.logger asks for cannot run here (its package is not installed), or None."""
    for name, node in logger.items():
        package = get_class(node._target_).package
        if importlib.util.find_spec(package) is None:
            return f"logger={name} needs the {package} package, which is not installed: pip install -e '.[{name}]'"
    return None


def start(cfg: DictConfig, run_dir: Path) -> Tracking:
    """Open (or continue) a run in each tracker of cfg.logger; returns at once, each opens on its
    own thread. Under DDP only rank 0 logs: with RANK set to another rank this tracks nothing."""
    if os.environ.get("RANK", "0") != "0":
        return Tracking(run_dir, {})
    tracking = Tracking(run_dir, {name: OmegaConf.to_container(node, resolve=True) for name, node in cfg.logger.items()})
    tracking.open(cfg)
    return tracking


def run_tags(cfg: DictConfig) -> dict[str, str]:
    """How analysis groups a run: experiment, pair, method, grid cell (the method's run tag), seed."""
    role = run_role(cfg)
    pair = f"{cfg.teacher.arch}-to-{cfg.model.arch}" if role == "student" else cfg.model.arch
    method = get_class(cfg.method._target_).name
    return {"experiment": cfg.experiment_name, "pair": pair, "method": method, "cell": method_tag(cfg.method),
            "seed": str(cfg.seed), "kind": role}


def read_kept(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Each tracker's {"id", "epoch"} from an earlier start of this run dir ({} for a first start)."""
    path = run_dir / TRACKER_FILE
    try:
        kept = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable %s (%s): the trackers open new runs", path, err)
        return {}
    return kept if isinstance(kept, dict) else {}


class Tracking:
    """The trackers of one job. Every call returns at once (each tracker's work runs on its
    FailSafe thread) and none raises."""

    def __init__(self, run_dir: Path, settings: dict[str, dict[str, Any]]):
        self.run_dir = run_dir
        self._settings = settings
        self._safe = {name: FailSafe(name) for name in settings}
        self._trackers: dict[str, Any] = {}
        self._held: dict[str, int] = {}  # the last epoch each continued run holds, as its tracker says
        self._kept = read_kept(run_dir) if settings else {}
        # the last epoch each tracker was given: an epoch is logged once, whoever offers it again
        self._given = {name: self._kept.get(name, {}).get("epoch", 0) for name in settings}
        self._lock = threading.Lock()  # the tracker file is written from the trackers' threads

    def open(self, cfg: DictConfig) -> None:
        if not self._safe:
            return
        config = OmegaConf.to_container(cfg, resolve=True)
        tags, name = run_tags(cfg), _run_name(cfg, self.run_dir)
        for tracker, safe in self._safe.items():
            kept = self._kept.get(tracker, {})
            info = RunInfo(self.run_dir, name, tags, config, kept.get("id"), kept.get("epoch", 0))
            safe.submit(functools.partial(self._open, tracker, info))

    def catch_up(self, history: list[dict]) -> None:
        """Wait (at most START_WAIT_S) for the trackers to open their runs, then give them the
        epochs of `history` they lack: those a killed start trained after its tracker's last line."""
        deadline = time.monotonic() + START_WAIT_S
        for name, safe in self._safe.items():
            if not safe.flushed(max(0.0, deadline - time.monotonic())):
                log.warning("logger=%s has not opened its run within %.0f s: training starts without it", name,
                            START_WAIT_S)
        for row in history:
            self.log_epoch(row)

    def log_epoch(self, row: dict) -> None:
        """One metrics.jsonl line, to each tracker that has not had this epoch."""
        for name, safe in self._safe.items():
            if row["epoch"] > self._given[name]:
                self._given[name] = row["epoch"]
                safe.submit(functools.partial(self._log, name, dict(row)))

    def finish(self, result: dict | None) -> None:
        """End each tracker's run with result.json's contents, or None when interrupted; waits at
        most CLOSE_WAIT_S in all."""
        deadline = time.monotonic() + CLOSE_WAIT_S
        for name, safe in self._safe.items():
            safe.submit(functools.partial(self._finish, name, result))
        for safe in self._safe.values():
            safe.close(max(0.0, deadline - time.monotonic()))

    def _open(self, name: str, info: RunInfo) -> None:
        tracker = instantiate(self._settings[name])
        run_id = tracker.start(info)
        self._trackers[name] = tracker
        self._held[name] = (tracker.last_epoch() or 0) if run_id == info.resume_id else 0
        self._keep(name, id=run_id, epoch=max(info.logged_epoch, self._held[name]))
        log.info("logger=%s: %s run %s", name, "continuing" if run_id == info.resume_id else "opened", run_id)

    def _log(self, name: str, row: dict) -> None:
        if row["epoch"] <= self._held[name]:  # logged by a start killed before the run dir recorded it
            return
        self._trackers[name].log_epoch(row)
        self._keep(name, epoch=row["epoch"])

    def _finish(self, name: str, result: dict | None) -> None:
        self._trackers[name].finish(result)

    def _keep(self, name: str, **fields: Any) -> None:
        with self._lock:
            self._kept[name] = {**self._kept.get(name, {}), **fields}
            atomic_write_json(self.run_dir / TRACKER_FILE, self._kept)


def _run_name(cfg: DictConfig, run_dir: Path) -> str:
    """The run dir under its experiment's (`resnet50-to-resnet18/logit_a0.5_T4/seed2`), as analysis names runs."""
    try:
        return str(run_dir.resolve().relative_to(Path(cfg.paths.output_dir, cfg.experiment_name).resolve()))
    except ValueError:  # hydra.run.dir put it elsewhere
        return run_dir.name
