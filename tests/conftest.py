"""Shared helpers: compose configs like the entry point does, run it as a subprocess, and the
tiny generated dataset and teacher that end-to-end tests train on."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from kdexp.config import register_configs
from kdexp.data.fake import write_fake_cifar

REPO = Path(__file__).resolve().parent.parent
CONF = str(REPO / "conf")
register_configs()


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def run_train(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real entry point in a fresh process (as a user or a SLURM job runs it)."""
    return subprocess.run([sys.executable, "-m", "kdexp.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


# Tiny but real: the quickstart protocol (generated data, CPU) with small widths.
TINY = ("protocol=quickstart", "model.width=4", "trainer.progress=false")


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "fake"
    write_fake_cifar(root)
    return root


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory, fake_root) -> Path:
    """A real 4-epoch R18 width-8 teacher, exported where students with teacher=resnet18 look."""
    out = tmp_path_factory.mktemp("outputs")
    proc = run_train(*TINY, "experiment=teacher", "model.width=8", "trainer.epochs=4",
                     f"data.root={fake_root}", f"paths.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def student_args(out: Path, fake_root: Path, *extra: str) -> tuple[str, ...]:
    return (*TINY, "teacher=resnet18", "teacher.width=8", f"data.root={fake_root}",
            f"paths.output_dir={out}", *extra)
