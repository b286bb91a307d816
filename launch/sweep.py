"""What a `python -m kdexp.train -m ...` multirun would launch, without launching it.

The jobs' overrides are expanded exactly as Hydra's basic sweeper does (config sweeps from
`hydra.sweeper.params` first, command-line overrides after and winning), and each job's config is
composed as the launcher composes it, so its run dir is the one the real job will write.
Call these inside `hydra_session()`.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, open_dict, read_write

from kdexp.config import register_configs

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@contextmanager
def hydra_session() -> Iterator[None]:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"), \
            warnings.catch_warnings():
        # a KDEXP_SITE_DIR that does not exist: said where it matters (a launcher not found), in one line
        warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main.* is not available")
        yield


def compose_job(overrides: Sequence[str]) -> DictConfig:
    """The config (hydra node included) of one job with these (sweep-free) overrides."""
    return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def task_config(cfg: DictConfig) -> DictConfig:
    """What the job's task function receives: the config without its hydra node (as Hydra's run_job)."""
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def expand(overrides: Sequence[str]) -> list[list[str]]:
    """The overrides of every job of the multirun `overrides`, in Hydra's job order; Hydra's own
    overrides (hydra/launcher=..., hydra.*) come first in each."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    own = [o.input_line for o in parsed if o.is_hydra_override()]
    task = [o.input_line for o in parsed if not o.is_hydra_override()]
    params = compose_job(fixed(overrides)).hydra.sweeper.params or {}
    merged = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + task)
    return [own + job for job in BasicSweeper.split_arguments(merged, None)[0]]


def fixed(overrides: Sequence[str]) -> list[str]:
    """The overrides without sweeps (what Hydra composes the multirun's own config from)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.input_line for o in parsed if not o.is_sweep_override()]


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.hydra.sweep.dir) / cfg.hydra.sweep.subdir


def group_overrides(overrides: Sequence[str], group: str) -> list[str]:
    """The sweep-free overrides of one config group or node, e.g. `paths.output_dir=...` for "paths"."""
    parsed = OverridesParser.create().parse_overrides(fixed(overrides))
    return [o.input_line for o in parsed if o.key_or_group.split(".")[0] == group]
