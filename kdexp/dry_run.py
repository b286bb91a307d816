"""A dry run never submits anything: its jobs run here, whatever launcher the command names.

A dry-run job only composes, validates and says what it would train, so running it on a cluster
would spend a queue slot (and, for a grid, an sbatch array) on seconds of work; worse, a user
checking `experiment=paper_v1 dry_run=true hydra/launcher=slurm_a100` before submitting would have
submitted it. Hydra instantiates the launcher from the composed config after the callbacks'
on_multirun_start, so swapping in its basic (in-process) launcher there keeps everything else
(run dirs, job numbers, the summary) exactly as the real launch would have it.
"""
from __future__ import annotations

import logging
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

BASIC_LAUNCHER = "hydra/launcher/basic.yaml"


class DryRunStaysLocal(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("dry_run"):
            return
        basic = ConfigStore.instance().load(BASIC_LAUNCHER).node
        if config.hydra.launcher._target_ == basic._target_:
            return
        chosen = config.hydra.runtime.choices.get("hydra/launcher")
        log.info("dry run: running its jobs here instead of submitting them through hydra/launcher=%s", chosen)
        config.hydra.launcher = basic
