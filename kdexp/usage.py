"""`python -m kdexp.train --help`: the command's usage and every option of its config groups, read
from the config tree's files (and $KDEXP_SITE_DIR's) without composing a config. Composing needs the
schemas, which need torch: a second or more before anything prints, for a page users read often.
`--cfg job [overrides]` prints the composed config; `--hydra-help` is Hydra's own page."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

from omegaconf import OmegaConf

# groups whose options kdexp.config.register_configs also makes from the architecture registry
ARCHITECTURE_GROUPS = ("model", "teacher")
LAUNCHER_GROUP = "hydra/launcher"  # the one Hydra group a user picks: where the jobs run

USAGE = """\
usage: python -m kdexp.train [-m] [group=option ...] [key=value ...]

Trains a teacher, a baseline or a distilled student, as the composed config says; -m (--multirun)
sweeps comma-separated values (seed=0,1,2) and launches one job per combination.

  python -m kdexp.train protocol=quickstart experiment=teacher      one run, on this machine
  python -m kdexp.train -m experiment=paper_v1 dry_run=true         a multirun's jobs checked, none trained
  python -m kdexp.train -m experiment=paper_v1 hydra/launcher=slurm_a100    the study's grid on SLURM
  python -m kdexp.train --cfg job experiment=cifar100_kd            the composed config, printed
  python -m analysis outputs/                                       the runs' tables

Config groups (group=option; [the default]):
{groups}

Any key can be set (trainer.lr=0.05, method.T=4). Site options (a cluster's launcher, your own
method) go in $KDEXP_SITE_DIR/<group>/<option>.yaml. Hydra's flags: --hydra-help. README.md has the rest."""


def text(config_dir: Path, site_dir: str | None = None) -> str:
    """The help page for the config tree at `config_dir` (its `train.yaml`) and the site dir."""
    roots = [config_dir] + ([Path(site_dir)] if site_dir else [])
    lines = [_group_line(group, default, roots) for group, default in _selectable_groups(config_dir / "train.yaml")]
    return USAGE.format(groups="\n".join(lines))


def print_help(config_dir: Path) -> None:
    print(text(config_dir, os.environ.get("KDEXP_SITE_DIR")))


def _selectable_groups(primary: Path) -> list[tuple[str, str | None]]:
    """(group, its default) for each group the primary config's defaults list picks by name: not the
    ones it fills in from other choices (`${pair}_${method}`), not Hydra's own but the launcher."""
    groups = []
    for entry in OmegaConf.to_container(OmegaConf.load(primary).defaults):
        if not isinstance(entry, dict):  # base_train, _self_
            continue
        [(key, default)] = entry.items()
        if key.split()[0] in ("optional", "override") or "${" in str(default):
            continue
        groups.append((key, default))
    return groups + [(LAUNCHER_GROUP, "local")]


def _group_line(group: str, default: str | None, roots: list[Path]) -> str:
    options = sorted({path.stem for root in roots for path in (root / group).glob("*.yaml")})
    if group in ARCHITECTURE_GROUPS:
        options = sorted({*options, default}) + ["any architecture (python -m kdexp.models lists them)"]
    if group == "logger":
        options.append("or several: logger=[tensorboard,wandb]")
    shown = ", ".join(f"[{name}]" if name == default else name for name in options)
    return textwrap.fill(shown, width=100, initial_indent=f"  {group}: ", subsequent_indent="      ")
