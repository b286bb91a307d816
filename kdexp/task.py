"""The Hydra task of `python -m kdexp.train` (kdexp/train.py, the command line, starts it): one
job trains a teacher, a baseline or a distilled student, depending only on the composed config.

Whatever goes wrong ends as one line on stderr (`kdexp: ...`) and an exit code (kdexp/outcome.py);
the traceback goes to the run's train.log (Hydra's job log; a dry run writes none), and to the
terminal too with HYDRA_FULL_ERROR=1. In a multirun the other jobs go on and the summary lists
every job's outcome.

On several ranks (torchrun, or a SLURM launcher with tasks_per_node > 1; kdexp/distributed.py) each
rank runs this, and only rank 0 writes into the run dir: the others make no .hydra/ nor train.log,
record no outcome and log only warnings, to the terminal."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kdexp import distributed, job, runlock
from kdexp.checkpoint import CheckpointError
from kdexp.config import ConfigError, register_configs
from kdexp.data import DataError
from kdexp.loop import NonFiniteLossError
from kdexp.outcome import Outcome
from kdexp.preflight import config_problem
from kdexp.summary import record_outcome
from kdexp.teachers import TeacherError
from kdexp.train import CONFIG_DIR

register_configs()
log = logging.getLogger("kdexp")
EXPECTED = (DataError, TeacherError, NonFiniteLossError, CheckpointError)  # their message says it all
JOB_FILES = {".hydra", "train.log", runlock.LOCK_FILE}  # what a start leaves before it writes anything
NO_METADATA = "hydra.output_subdir=null"  # the override that keeps a rank other than 0 out of the run dir


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> str:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    rank = distributed.from_env().rank
    if rank:
        _log_to_terminal_only()
    outcome = _outcome(cfg, run_dir, rank)
    multirun = hc.mode == RunMode.MULTIRUN
    if outcome.reason and not (multirun and outcome.status == "dry_run"):  # the summary counts those
        print(f"kdexp{f' (rank {rank})' if rank else ''}: {outcome.reason}", file=sys.stderr, flush=True)
    if not rank:  # rank 0's outcome is the run's
        record_outcome(run_dir, outcome)
    if outcome.exit_code and (not multirun or outcome.status == "interrupted"):  # Ctrl-C stops the sweep too
        sys.exit(outcome.exit_code)
    return outcome.status


def _log_to_terminal_only() -> None:
    """A rank other than 0: no train.log (the run's log is rank 0's; the file handler opens on the
    first line, so none is made), and warnings only, not every rank's copy of each epoch line."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def _outcome(cfg: DictConfig, run_dir: Path, rank: int = 0) -> Outcome:
    try:
        outcome = job.run(cfg, run_dir)
        if outcome.status == "failed":  # a skipped failed run: its log says so too
            _log_to_file(outcome.reason)
        return outcome
    except (ConfigError, job.CannotStart) as err:  # bad input, nothing written: one clear line
        if not rank:
            _forget(run_dir, cfg.paths.output_dir)
        prefix = "invalid config: " if isinstance(err, ConfigError) else ""
        return Outcome("rejected", f"{prefix}{err}")
    except runlock.RunLocked as err:  # says nothing to train.log: it is the other process's log
        return Outcome("locked", str(err))
    except job.Interrupted as err:
        _log_to_file(str(err), err)
        return Outcome("interrupted", str(err))
    except Exception as err:
        reason = _one_line(err)
        _log_to_file(reason, err)
        return Outcome("failed", reason if isinstance(err, EXPECTED) else f"{reason} ({_traceback_hint(cfg, run_dir)})")


def _traceback_hint(cfg: DictConfig, run_dir: Path) -> str:
    """Where an unexpected error's traceback is: a dry run writes no train.log (kdexp.config.job_log_handlers)."""
    if cfg.dry_run:
        return "rerun with HYDRA_FULL_ERROR=1 for its traceback"
    return f"traceback in {run_dir}/train.log"


def _one_line(err: Exception) -> str:
    if isinstance(err, EXPECTED):
        return str(err)
    if isinstance(err, OSError) and err.filename:
        return f"cannot write {err.filename}: {err.strerror}"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _log_to_file(message: str, err: BaseException | None = None) -> None:
    """`message` (and the traceback) go to the run's train.log only, as the terminal has the one
    line; HYDRA_FULL_ERROR=1 asks for the traceback everywhere."""
    if err is not None and os.environ.get("HYDRA_FULL_ERROR") == "1":
        log.error(message, exc_info=err)
        return
    exc_info = (type(err), err, err.__traceback__) if err is not None else None
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _forget(run_dir: Path, output_dir: str) -> None:
    """A rejected job leaves no run dir for analysis to list: remove what Hydra made for it (.hydra,
    train.log) when that is all the dir holds, and the folders left empty above it."""
    if runlock.holder(run_dir) or not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - JOB_FILES:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    top = Path(output_dir).resolve()
    for folder in run_dir.parents:
        if folder == top or top not in folder.parents:
            break
        try:
            folder.rmdir()
        except OSError:  # not empty
            break


def start() -> None:
    """Run the task on the command line's arguments: a config that cannot be composed is rejected
    (one line, exit 2) before Hydra starts, as every other bad input is."""
    problem = config_problem(sys.argv[1:], CONFIG_DIR, "train")
    try:
        rank = distributed.from_env().rank
    except ConfigError as err:
        problem = problem or str(err)
    if problem:
        print(f"kdexp: invalid config: {problem}", file=sys.stderr, flush=True)
        sys.exit(Outcome("rejected", problem).exit_code)
    if rank:  # Hydra then writes no .hydra/ into the run dir: rank 0 writes it
        sys.argv.append(NO_METADATA)
    main()
