"""A site launcher ($KDEXP_SITE_DIR/hydra/launcher/*.yaml) that is not valid YAML: one line naming
the file and the line, exit 2, from `kdexp.train -m` and from `launch.study` (Hydra passes PyYAML's
error on as a 90-line traceback). In-process, through each command's own entry point."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kdexp import train
from launch import study

# An unclosed flow list: PyYAML finds it at the next line, line 4 of the file.
BROKEN = "defaults:\n  - slurm_a100\n  - _self_\npartition: [gpu, a100\ntimeout_min: 60\n"


@pytest.fixture
def broken_site(tmp_path, monkeypatch) -> Path:
    launcher = tmp_path / "site" / "hydra" / "launcher" / "mysite.yaml"
    launcher.parent.mkdir(parents=True)
    launcher.write_text(BROKEN)
    monkeypatch.setenv("KDEXP_SITE_DIR", str(tmp_path / "site"))
    return launcher


def _one_line(err: str) -> str:
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_kdexp_train_multirun_names_the_file_and_line(broken_site, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kdexp.train", "-m", "protocol=quickstart", "hydra/launcher=mysite",
                                      "dry_run=true", f"paths.output_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as exit_:
        train.cli()
    line = _one_line(capsys.readouterr().err)
    assert exit_.value.code == 2
    assert line.startswith(f"kdexp: invalid config: {broken_site}, line 5: malformed YAML: ")
    assert not (tmp_path / "out").exists()


def test_launch_study_names_the_file_and_line(broken_site, tmp_path, capsys):
    code = study.main(["--cluster", "mysite", "--protocol", "quickstart", "--dry-run",
                       "--output-dir", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"launch.study: {broken_site}, line 5: malformed YAML: ")
    assert not (tmp_path / "out").exists()
