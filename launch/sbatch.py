"""The SLURM side of the study's jobs (its CPU drivers, its GPU canary): their batch scripts, submission,
and their state in the queue."""
from __future__ import annotations

import getpass
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable, Sequence

from omegaconf import DictConfig

# A driver only waits for its GPU jobs, but it waits for all of them: few resources, a long limit.
DRIVER_RESOURCES = ("--cpus-per-task=1", "--mem=2G", "--time=3-00:00:00")
# Site settings that also apply to a CPU job, taken from the cluster's launcher config.
LAUNCHER_KEYS = ("partition", "account", "qos")
# What one GPU job of the launcher asks for besides those, as submitit writes it for the training
# jobs (`--key-with-dashes=value`; mem_gb as --mem): the canary gets the students' node, GPU and
# memory. Left out: array, time limit and signal settings, which are the training jobs' own.
GPU_KEYS = ("constraint", "exclude", "gres", "gpus_per_node", "gpus_per_task", "cpus_per_task", "cpus_per_gpu",
            "mem_per_gpu", "mem_per_cpu", "comment")
# squeue's states of a job that has not ended
LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
        "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


# How sbatch reads the `#SBATCH` lines above a script's first command (seen on slurm 22.05): word by
# word, honouring the shell's quotes (what shlex.quote writes), except that a line break ends the
# directive (and the lines after it run as shell: every later directive is dropped), a backslash is
# dropped even inside quotes, and an unquoted `#` silently ends the line. So a value is written
# quoted, and refused where no quoting carries it.
KEY = re.compile(r"[a-z][a-z0-9-]*")
# The names a directive gives SLURM (the job's, the site's): plain words (partition lists: commas).
NAME_KEYS = ("job-name", "partition", "account", "qos")
NAME = re.compile(r"[A-Za-z0-9._,+-]+")
# where a script's log path comes from, for a refusal
LOG_ORIGIN = "the output dir (--output-dir)"


class SlurmError(RuntimeError):
    pass


class DirectiveError(ValueError):
    """A value that an `#SBATCH` line cannot carry as it is (bad input: one line for the user)."""


def flag(key: str, value: object) -> str:
    """An sbatch option as submitit writes it: underscores become dashes, True a bare flag."""
    key = key.replace("_", "-")
    return f"--{key}" if value is True else f"--{key}={value}"


def site_options(launcher: DictConfig) -> list[str]:
    return [flag(key, launcher[key]) for key in LAUNCHER_KEYS if launcher.get(key)]


def driver_options(launcher: DictConfig, extra_sbatch: Sequence[str] = ()) -> list[str]:
    # a driver whose dependency failed is cancelled instead of pending forever
    return [*DRIVER_RESOURCES, *site_options(launcher), "--kill-on-invalid-dep=yes", *extra_sbatch]


def gpu_options(launcher: DictConfig, minutes: int) -> list[str]:
    """One job on the launcher's GPU nodes with its resources, for `minutes`."""
    options = [*site_options(launcher), *(flag(key, launcher[key]) for key in GPU_KEYS if launcher.get(key))]
    if launcher.get("mem_gb"):
        options.append(flag("mem", _mem(launcher.mem_gb)))
    extra = launcher.get("additional_parameters") or {}
    return [*options, *(flag(key, value) for key, value in extra.items()), f"--time={minutes}"]


def _mem(gb: float) -> str:
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"  # as submitit converts mem_gb


def script(job_name: str, log: Path, lines: Sequence[str], cwd: Path, launcher: DictConfig,
           options: Sequence[str], what: str) -> str:
    """A batch script with these sbatch options: it runs `lines` in `cwd` after the launcher's setup
    lines (shell by design, as in the launcher's own jobs); `what` says in a comment which job of the
    study it is. DirectiveError for a value that sbatch would read as something else."""
    if "%" in str(log.parent) or "%" in log.name.replace("%j", ""):  # SLURM would expand it (%x, %u, ...)
        raise DirectiveError(f"#SBATCH --output={str(log)!r}: a % in the path is a pattern SLURM expands: "
                             f"change {LOG_ORIGIN}")
    directives = [directive(f"--job-name={job_name}", "experiment_name"), directive(f"--output={log}", LOG_ORIGIN),
                  *(directive(o, "the launcher config") for o in options)]
    # no `set -u`: site setup lines (module load, conda activate) often read unset variables
    body = ["set -eo pipefail", f"cd {shlex.quote(str(cwd))}", *(launcher.get("setup") or []), *lines]
    return "\n".join(["#!/bin/bash", *directives, f"# written by {what}", *body]) + "\n"


def directive(option: str, origin: str) -> str:
    """`--key=value` (or `--key`) as an `#SBATCH` line that sbatch reads back as exactly that; the
    refusal of one it cannot carry says to change `origin`, where the value comes from."""
    key, has_value, value = option.removeprefix("--").partition("=")
    if not option.startswith("--") or not KEY.fullmatch(key):
        raise DirectiveError(f"sbatch option {option!r}: an #SBATCH line takes --name=value or --name "
                             f"(e.g. --partition=cpu): change {origin}")
    if not has_value:
        return f"#SBATCH --{key}"
    problem = _problem(key, value)
    if problem:
        raise DirectiveError(f"#SBATCH --{key}={value!r}: {problem}: change {origin}")
    return f"#SBATCH --{key}={shlex.quote(value)}"


def _problem(key: str, value: str) -> str | None:
    """Why `value` cannot be the value of an `--key` directive; None when it can."""
    if key in NAME_KEYS and not NAME.fullmatch(value):
        return "a SLURM name here takes letters, digits and . _ , + - only"
    if not value.isprintable():
        return "a line break or control character ends or corrupts an #SBATCH line"
    if "\\" in value:
        return "sbatch drops a backslash from an #SBATCH line, even quoted"
    return None


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


def live_state(job_id: str) -> str | None:
    """`PENDING (Resources)`, `RUNNING on node01`: the job while it is queued or running; None once it ended."""
    proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%R"], capture_output=True, text=True)
    if proc.returncode != 0:
        if "invalid job id" in proc.stderr.lower():  # ended long enough ago to be forgotten
            return None
        raise SlurmError(f"squeue failed: {one_line(proc.stderr)}")
    state, _, where = proc.stdout.strip().partition("|")
    if state not in LIVE:
        return None
    return f"{state} {where}" if where.startswith("(") else f"{state} on {where}"  # (a reason) or the nodes


# Accounting states of a job that has not ended: what sacct can still show for a moment after the job
# left the queue, before slurmdbd has its end.
LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING")


def final_state(job_id: str, wait_s: float = 30.0) -> str | None:
    """How an ended job ended (`FAILED`, `TIMEOUT`, ...) by SLURM's accounting; None where it has none.
    Accounting lags the queue: a job gone from squeue may still read PENDING in sacct, so a live state
    is asked again, once a second for up to `wait_s`, and never reported as the end."""
    deadline = time.monotonic() + wait_s
    while True:
        state = _accounted_state(job_id)
        if state not in LIVE_STATES:
            return state
        if time.monotonic() >= deadline:
            return None
        time.sleep(1)


def _accounted_state(job_id: str) -> str | None:
    try:
        proc = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    except OSError:  # no sacct here
        return None
    words = proc.stdout.split() if proc.returncode == 0 else []
    return words[0] if words else None


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True)  # one that ended meanwhile needs nothing


def available() -> bool:
    return shutil.which("sbatch") is not None
