"""A dry run never submits anything and leaves nothing behind: its jobs run here, whatever launcher
the command names, and write nothing into their run dirs.

A dry-run job only composes, validates and says what it would train, so running it on a cluster
would spend a queue slot (and, for a grid, an sbatch array) on seconds of work; worse, a user
checking `experiment=paper_v1 dry_run=true hydra/launcher=slurm_a100` before submitting would have
submitted it. Hydra instantiates the launcher from the composed config after the callbacks'
on_multirun_start, so swapping in its basic (in-process) launcher there keeps everything else
(run dirs, job numbers, the summary) exactly as the real launch would have it.

That choice is made once for the whole multirun, from the multirun's own config, where a swept key
has its default: `dry_run=true,false` would submit every job, the dry ones included. So dry_run is
never swept (preflight refuses it before Hydra runs, and DryRunStaysLocal again here).

Hydra makes each job's run dir before the job runs; a dry job writes no `.hydra/` and no train.log
into it (kdexp.config.hydra_metadata_dir, job_log_handlers), and DryRunLeavesNoRunDir removes it
when it is left empty, so analysis finds nothing of a dry run.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

BASIC_LAUNCHER = "hydra/launcher/basic.yaml"
KEY = "dry_run"


def sweep_problem(overrides: Sequence[Override], sweeper_params: Mapping[str, Any]) -> str | None:
    """Why this multirun's dry_run is not one value for the whole multirun; None when it is."""
    why = ("dry_run cannot be swept: a multirun is a dry run or a real one, and the launcher is chosen for all of "
           "its jobs at once; run the dry run (dry_run=true) and the real one as two commands")
    swept = next((o for o in overrides if o.key_or_group == KEY and o.is_sweep_override()), None)
    if swept is not None:
        return f"{swept.input_line}: {why}"
    if KEY in sweeper_params:  # a job's value only, never the multirun's: a sweep even with one value
        return f"hydra.sweeper.params.{KEY}={sweeper_params[KEY]}: {why}"
    return None


class DryRunStaysLocal(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        problem = sweep_problem(overrides, config.hydra.sweeper.get("params") or {})
        if problem:  # SystemExit: Hydra turns a callback's exception into a warning
            print(f"kdexp: invalid config: {problem}", file=sys.stderr, flush=True)
            sys.exit(2)
        if not config.get(KEY):
            return
        basic = ConfigStore.instance().load(BASIC_LAUNCHER).node
        if config.hydra.launcher._target_ == basic._target_:
            return
        chosen = config.hydra.runtime.choices.get("hydra/launcher")
        log.info("dry run: running its jobs here instead of submitting them through hydra/launcher=%s", chosen)
        config.hydra.launcher = basic


class DryRunLeavesNoRunDir(Callback):
    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.get(KEY):
            remove_empty_dirs(Path(config.hydra.runtime.output_dir), Path(config.paths.output_dir))


def remove_empty_dirs(folder: Path, top: Path) -> None:
    """Remove `folder` and the folders above it, up to `top` (kept), while they are empty."""
    top = top.resolve()
    for each in [folder.resolve(), *folder.resolve().parents]:
        if each == top or top not in each.parents:
            return
        try:
            each.rmdir()
        except OSError:  # not empty (or not ours to remove): what is above it is not empty either
            return
