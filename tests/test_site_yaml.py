"""A site launcher ($KDEXP_SITE_DIR/hydra/launcher/*.yaml) that is not valid YAML, or not UTF-8
text: one line naming the file (and the line), exit 2, from `kdexp.train -m` and from `launch.study` (Hydra passes PyYAML's
error on as a 90-line traceback). In-process, through each command's own entry point."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kdexp import train
from launch import study

# An unclosed flow list: PyYAML finds it at the next line, line 4 of the file.
BROKEN = b"defaults:\n  - slurm_a100\n  - _self_\npartition: [gpu, a100\ntimeout_min: 60\n"
# Saved in Latin-1 by an editor: the decoder fails before YAML sees the file, and names no file.
LATIN1 = "defaults:\n  - slurm_a100\n  - _self_\npartition: café\n".encode("latin-1")
# What each command says after the file's name
PROBLEMS = {BROKEN: ", line 5: malformed YAML: ", LATIN1: ": not UTF-8 text (invalid continuation byte at byte 50)"}


@pytest.fixture(params=list(PROBLEMS), ids=["malformed", "latin-1"])
def broken_site(request, tmp_path, monkeypatch) -> tuple[Path, str]:
    launcher = tmp_path / "site" / "hydra" / "launcher" / "mysite.yaml"
    launcher.parent.mkdir(parents=True)
    launcher.write_bytes(request.param)
    monkeypatch.setenv("KDEXP_SITE_DIR", str(tmp_path / "site"))
    return launcher, PROBLEMS[request.param]


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
    launcher, problem = broken_site
    assert line.startswith(f"kdexp: invalid config: {launcher}{problem}")
    assert not (tmp_path / "out").exists()


def test_launch_study_names_the_file_and_line(broken_site, tmp_path, capsys):
    code = study.main(["--cluster", "mysite", "--protocol", "quickstart", "--dry-run",
                       "--output-dir", str(tmp_path / "out")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2
    launcher, problem = broken_site
    assert line.startswith(f"launch.study: {launcher}{problem}")
    assert not (tmp_path / "out").exists()
