"""Helpers shared by test modules (imported by name; conftest files hold fixtures only, since
several conftest.py files cannot all be imported as `conftest`)."""
from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from kdexp.config import register_configs, validate
from kdexp.execution import Execution
from kdexp.job import build_loop, seed_everything

REPO = Path(__file__).resolve().parent.parent
CONF = str(REPO / "conf")
register_configs()

# Tiny but real: the quickstart protocol (generated data, CPU) with small widths.
TINY = ("protocol=quickstart", "model.width=4", "trainer.progress=false")
CPU = torch.device("cpu")
TIMING = {"epoch_seconds", "images_per_s"}  # the per-epoch fields that differ between identical runs


def without_timing(rows: list[dict]) -> list[dict]:
    """Per-epoch metrics minus wall-clock fields: what two identical runs must agree on exactly."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# How long a test waits for a process it started (or polls for what one writes) before calling it a
# hang. A guard against hangs, not a speed check: a tiny run takes seconds on an idle machine and far
# longer on a busy one (300 s was exceeded at load ~3 on 2 cores). KDEXP_TEST_HANG_S overrides it.
HANG_S = float(os.environ.get("KDEXP_TEST_HANG_S", "1800"))


def _tail(output: str | bytes | None, chars: int = 3000) -> str:
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    return (output or "")[-chars:]


def hang(what: str, timeout: float, stdout: str | bytes | None = None, stderr: str | bytes | None = None):
    """Fail the test as a hang (not a TimeoutExpired traceback), with the tail of the output."""
    pytest.fail(f"{what} did not end within {timeout:g} s: a hang? (KDEXP_TEST_HANG_S sets the limit) "
                f"its last output:\n--- stdout ---\n{_tail(stdout)}\n--- stderr ---\n{_tail(stderr)}",
                pytrace=False)


def run_process(argv: list, *, timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(argv, capture_output=True, text=True, **kwargs), failed as a hang after HANG_S."""
    timeout = HANG_S if timeout is None else timeout
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as err:
        timed_out = err
    hang(f"`{' '.join(map(str, argv))}`", timeout, timed_out.stdout, timed_out.stderr)  # no chained traceback


def communicate(proc: subprocess.Popen, timeout: float | None = None) -> tuple:
    """proc.communicate() for a process started by the test; a hang is killed and failed as one."""
    timeout = HANG_S if timeout is None else timeout
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
    stdout, stderr = proc.communicate()
    hang(f"`{' '.join(map(str, proc.args))}`", timeout, stdout, stderr)


def wait_until(condition, what: str, timeout: float | None = None, poll: float = 0.05):
    """Poll `condition` every `poll` s until it returns something truthy, and return it; waiting
    longer than HANG_S fails the test as a hang."""
    timeout = HANG_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s: a hang? (KDEXP_TEST_HANG_S sets the limit)",
                        pytrace=False)
        time.sleep(poll)
    return value


def run_train(*args: str, env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """The real entry point in a fresh process (as a user or a SLURM job runs it); HANG_S unless told."""
    return run_process([sys.executable, "-m", "kdexp.train", *args], cwd=REPO, timeout=timeout,
                       env={**os.environ, **(env or {})})


def student_args(out: Path, fake_root: Path, *extra: str) -> tuple[str, ...]:
    return (*TINY, "teacher=resnet18", "teacher.width=8", f"data.root={fake_root}",
            f"paths.output_dir={out}", *extra)


# A few optimiser steps per epoch: for tests of what happens around training, not of learning.
QUICK = ("trainer.epochs=1", "trainer.max_steps_per_epoch=2")


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make `folder` unwritable for this user, root included (root ignores mode bits, not the
    immutable flag); skips the test where neither works."""
    root = os.geteuid() == 0
    if root and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only for root here (chattr +i failed)")
    if not root:
        folder.chmod(0o555)
    try:
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def tiny_loop(run_dir: Path, splits, teacher, *overrides: str, method: str = "logit", cache=None):
    """An in-process CPU training loop of a width-4 R18 distilling from `teacher` (the conftest's tiny
    split, teacher and cache): 2 epochs of 3 steps."""
    temperature = ("method.T=3",) if method == "logit" else ()  # 3: not a power of two, so bf16 / T rounds
    cfg = compose_cfg("protocol=quickstart", "model.width=4", "teacher=resnet18", "teacher.width=4",
                      f"method={method}", *temperature, "trainer.epochs=2", "trainer.max_steps_per_epoch=3",
                      "trainer.batch_size=32", "data.eval_batch_size=64", *overrides)
    method = validate(cfg)
    execution = Execution.resolve(cfg.execution, CPU, method, cfg.data.loader)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    return build_loop(cfg, method, execution, splits, execution.prepare(copy.deepcopy(teacher)), CPU, run_dir,
                      cache if execution.teacher_cache else None)


# State dicts as older PyTorch saved them (BatchNorm's num_batches_tracked arrived in 0.4.1; a plain
# dict carries no module versions), for the tests of loading published and torchvision weights.

def saved_before_pytorch_0_4_1(state: dict) -> dict:
    """`state` as PyTorch 0.4.0 saved it: no `num_batches_tracked`, no module versions."""
    return {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}


def without_a_conv_weight(state: dict) -> dict:
    """A 0.4.0-era file that truly lacks a weight (layer1.0.conv1's)."""
    return {k: v for k, v in saved_before_pytorch_0_4_1(state).items() if k != "layer1.0.conv1.weight"}


def counters_deleted_after_saving(state: dict) -> dict:
    """Counters deleted from a file PyTorch >= 0.4.1 saved, whose module versions (2) say it had them."""
    for key in [k for k in state if k.endswith(".num_batches_tracked")]:
        del state[key]
    return state
