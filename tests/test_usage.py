"""`python -m kdexp.train --help` (kdexp/usage.py): answered without torch, from the config tree's
files, listing every option Hydra would compose; and `python -m kdexp.models`, where it sends users
for the architectures (issue 19 §3: `--help` in at most 2 s; torch alone takes about 2 s here)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from helpers import CONF, REPO
from kdexp import models, usage

NO_TORCH = ("import runpy, sys; sys.argv = ['kdexp.train', '--help']; "
            "runpy.run_module('kdexp.train', run_name='__main__'); "
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported')")
HYDRAS_OWN = {"basic", "submitit_local", "submitit_slurm"}  # launchers Hydra's plugins bring; kdexp's local = basic


def _group_lines(text: str) -> dict[str, str]:
    """group -> its options as the help page shows them (wrapped lines joined)."""
    body = text.split("[the default]):\n", 1)[1].split("\n\n", 1)[0]
    unwrapped = body.replace("\n      ", " ")  # continuation lines are indented deeper than groups
    return dict(line.strip().split(": ", 1) for line in unwrapped.splitlines())


def test_help_exits_0_without_importing_torch():
    proc = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m kdexp.train")
    assert proc.stdout.rstrip().endswith("torch not imported")


def test_help_lists_every_option_hydra_composes_and_marks_the_defaults():
    """The page is read from files, so it is checked against Hydra's own view of the same tree:
    every group a user picks by name and every option of it (schemas `base_*` aside)."""
    groups = _group_lines(usage.text(Path(CONF)))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group, shown in groups.items():
            options = [o for o in loader.get_group_options(group) if not o.startswith("base_") and o not in HYDRAS_OWN]
            assert options, group
            for option in options:
                assert option in shown.replace("[", "").replace("]", "").split(", ") or \
                    (group in usage.ARCHITECTURE_GROUPS and option in models.ARCHS), (group, option)
        picked = {g for g in loader.list_groups("") if g != "hydra"}
    assert picked - set(groups) == set()  # every top-level group is on the page
    assert groups["method"].startswith("[ce], crd,") and "[cifar10]" in groups["data"]
    assert groups["model"].startswith("[resnet18], any architecture (python -m kdexp.models")
    assert groups["teacher"].startswith("[none], any architecture")
    assert "[local]" in groups["hydra/launcher"] and "slurm_a100_x8" in groups["hydra/launcher"]
    assert "pair/tuned" not in groups and "method/data" not in groups  # filled in from other choices


def test_help_lists_the_site_dirs_options_too(tmp_path):
    for path in ("hydra/launcher/mycluster.yaml", "method/mymethod.yaml"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("{}\n")
    groups = _group_lines(usage.text(Path(CONF), str(tmp_path)))
    assert "mycluster" in groups["hydra/launcher"] and "mymethod" in groups["method"]


def test_kdexp_models_lists_every_architecture_with_its_size(capsys):
    models.main()
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == set(models.ARCHS)
    assert "1.23M" in rows["resnet8x4"] and "7.43M" in rows["resnet32x4"]  # CRD's table: 1.23M, 7.43M
    assert "cifar, imagenet" in rows["resnet34"]
