"""The SLURM side of the study's drivers: their batch script, submission, and which are queued."""
from __future__ import annotations

import getpass
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

from omegaconf import DictConfig

# A driver only waits for its GPU jobs, but it waits for all of them: few resources, a long limit.
DRIVER_RESOURCES = ("--cpus-per-task=1", "--mem=2G", "--time=3-00:00:00")
# Site settings that also apply to a CPU job, taken from the cluster's launcher config.
LAUNCHER_KEYS = ("partition", "account", "qos")


class SlurmError(RuntimeError):
    pass


def script(job_name: str, log: Path, lines: Sequence[str], cwd: Path, launcher: DictConfig,
           extra_sbatch: Sequence[str] = ()) -> str:
    """A driver's batch script: it runs `lines` in `cwd` after the launcher's setup lines."""
    options = [f"--job-name={job_name}", f"--output={log}", *DRIVER_RESOURCES,
               *(f"--{key}={launcher[key]}" for key in LAUNCHER_KEYS if launcher.get(key)),
               # a driver whose dependency failed is cancelled instead of pending forever
               "--kill-on-invalid-dep=yes", *extra_sbatch]
    # no `set -u`: site setup lines (module load, conda activate) often read unset variables
    body = ["set -eo pipefail", f"cd {shlex.quote(str(cwd))}", *(launcher.get("setup") or []), *lines]
    return "\n".join(["#!/bin/bash", *(f"#SBATCH {o}" for o in options),
                      "# written by `python -m launch.study`: one stage driver of the study", *body]) + "\n"


def submit(path: Path, dependency: str | None) -> str:
    """sbatch the script; returns the job id."""
    argv = ["sbatch", "--parsable", *([f"--dependency={dependency}"] if dependency else []), str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"{shlex.join(argv)} failed: {one_line(proc.stderr)}")
    return proc.stdout.strip().split(";")[0]


def one_line(text: str) -> str:
    """SLURM's messages (often two `sbatch: error:` lines) as one line for the user."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def queued(job_ids: Iterable[str]) -> set[str]:
    """Those of job_ids still in the queue (pending or running)."""
    ids = set(job_ids)
    if not ids:
        return set()
    proc = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"squeue failed: {one_line(proc.stderr)}")
    return ids & set(proc.stdout.split())


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True)  # one that ended meanwhile needs nothing


def available() -> bool:
    return shutil.which("sbatch") is not None
