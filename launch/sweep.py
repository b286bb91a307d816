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
from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, open_dict, read_write

from kdexp.config import register_configs
from kdexp.train import CONFIG_DIR


@contextmanager
def hydra_session() -> Iterator[None]:
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name="train"), \
            warnings.catch_warnings():
        # a KDEXP_SITE_DIR that does not exist: said where it matters (a launcher not found), in one line
        warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main.* is not available")
        yield


def compose_job(overrides: Sequence[str]) -> DictConfig:
    """The config (hydra node included) of one job with these (sweep-free) overrides."""
    return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def compose_jobs(jobs: Sequence[Sequence[str]]) -> list[DictConfig]:
    """`compose_job` of each job, in a fraction of the time: jobs that choose the same config groups
    (`pair=`, `model=`, ...) and differ only in values (`method.alpha=0.5`, `seed=1`) share one full
    composition, and each is that config with its own values applied, as Hydra applies value
    overrides after composing the defaults list (its own ConfigLoaderImpl step).
    tests/test_sweep.py checks every job of every experiment preset against a full composition."""
    parser = OverridesParser.create()
    templates: dict[tuple, tuple[DictConfig, list[Override]]] = {}
    configs: list[DictConfig] = []
    groups: set[str] = set()  # the config groups, as the first composition names them
    for job in jobs:
        overrides = parser.parse_overrides(list(job))
        key = tuple(o.input_line if _chooses_config(o, groups) else o.key_or_group for o in overrides)
        if not groups or key not in templates:
            cfg = compose_job(job)
            if not groups:
                groups = set(cfg.hydra.runtime.choices)
                key = tuple(o.input_line if _chooses_config(o, groups) else o.key_or_group for o in overrides)
            templates[key] = cfg, overrides
            configs.append(cfg)
        else:
            configs.append(_derived(*templates[key], overrides))
    return configs


def _derived(template: DictConfig, template_overrides: list[Override], overrides: list[Override]) -> DictConfig:
    """The config of `overrides` from a template that differs from it only in values."""
    cfg = copy.deepcopy(template)
    ConfigLoaderImpl._apply_overrides_to_config(
        [o for o, t in zip(overrides, template_overrides) if o.input_line != t.input_line], cfg)
    task = [o for o in overrides if not o.is_hydra_override()]
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.overrides.task = [o.input_line for o in task]
        names = cfg.hydra.job.config.override_dirname
        cfg.hydra.job.override_dirname = get_overrides_dirname(overrides=task, kv_sep=names.kv_sep,
                                                               item_sep=names.item_sep, exclude_keys=names.exclude_keys)
    return cfg


def _chooses_config(override: Override, groups: set[str]) -> bool:
    """Not a plain value: a config group or package (`model=...`, `hydra/launcher=...`, `+x@y=`), an
    addition or a deletion, or Hydra's own node: these change the defaults list or the keys."""
    return (override.key_or_group in groups or override.is_hydra_override() or override.package is not None
            or override.is_add() or override.is_delete() or override.is_force_add())


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
