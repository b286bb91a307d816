"""Helpers of the tests against the real one-node SLURM (tests/slurm): accounting, waiting, and
which run dir a SLURM job wrote."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, TypeVar

from omegaconf import OmegaConf

from helpers import wait_until

T = TypeVar("T")
# One thread per job: several jobs share 2 cores, and SLURM and local runs then compute alike.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def sacct(job_ids: str, fields: str) -> list[list[str]]:
    """One row of `fields` per job or array task (steps left out), requeued attempts included (-D);
    slurmdbd writes them a moment after a job ends, so callers poll with wait_for."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-D", "-o", fields, "-j", job_ids], check=True,
                         capture_output=True, text=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


def squeue_states(job_id: str) -> list[str]:
    """States of job_id's live records (ended jobs are left out)."""
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                          text=True).stdout.split()


def wait_for(predicate: Callable[[], T], what: str, timeout: float | None = None) -> T:
    """Poll until `predicate` returns something truthy, and return it; longer than `timeout`
    (helpers.HANG_S unless told: a guard against hangs, not a speed check) fails as a hang."""
    return wait_until(predicate, what, timeout, poll=0.2)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent.parent for p in root.rglob(".hydra/config.yaml"))


def slurm_job_id(run_dir: Path) -> str:
    """The SLURM job (array task) that ran this run: hydra-submitit-launcher records it."""
    return str(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.id)
