"""kdexp.bench beyond its timings: each step's FLOPs are counted (a live teacher's forward is the
whole difference the logit cache makes), the report is rewritten after every row so a run cut
short keeps what it measured, and a --barrier makes several processes time their steps together."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import REPO, communicate, run_process, wait_until
from kdexp import bench
from kdexp.models import build_model

TINY = ["--device", "cpu", "--width", "4", "--steps", "2", "--warmup", "1", "--batch-size", "4", "--workers", "0"]


def _bench(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdexp.bench", *TINY, *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(condition, what: str) -> None:
    wait_until(condition, what, poll=0.02)  # often: the first row's report is caught before the second's


def test_the_logit_cache_saves_exactly_the_teachers_forward_flops(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main([*TINY, "--cases", "r34_r18_logit", "--variants", "fast,fast_cached", "--out", str(out)])
    live, cached = [r["step_gflop"] * 1e9 for r in report["results"]]
    teacher = build_model("resnet34", width=4).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        teacher(torch.randn(4, 3, 32, 32))
    assert live - cached == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert report["peak_bf16_tflops"] > 0
    assert all(r["tflops"] > 0 and r["fraction_of_peak"] == r["tflops"] / report["peak_bf16_tflops"]
               for r in report["results"])
    assert all(r["speedup"] is None for r in report["results"])  # no reference asked for: no ratio


@pytest.mark.e2e
def test_the_report_is_rewritten_after_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = _bench("--cases", "r18_ce,r34_ce", "--variants", "reference", "--out", str(out))
    _wait_for(out.exists, "the first row's report")
    first = json.loads(out.read_text())
    output, _ = communicate(proc)
    assert proc.returncode == 0, output[-2000:]
    assert not first["complete"] and [r["case"] for r in first["results"]] == ["r18_ce"]
    final = json.loads(out.read_text())
    assert final["complete"] and [r["case"] for r in final["results"]] == ["r18_ce", "r34_ce"]


@pytest.mark.e2e
def test_a_barrier_starts_the_timing_only_when_every_process_is_warm(tmp_path):
    barrier = tmp_path / "barrier"
    args = ["--cases", "r18_ce", "--variants", "fast", "--barrier", str(barrier), "--barrier-count", "2"]
    first = _bench(*args, "--out", str(tmp_path / "first.json"))
    _wait_for(lambda: any(barrier.glob("*.ready")), "the first process at the barrier")  # warm and waiting
    second_launched = time.time()
    second = _bench(*args, "--out", str(tmp_path / "second.json"))
    for proc in (first, second):
        output, _ = communicate(proc)
        assert proc.returncode == 0, output[-2000:]
    (row,) = json.loads((tmp_path / "first.json").read_text())["results"]
    assert row["timed_window"][0] >= second_launched  # it waited for a process that did not yet exist


def test_unknown_variants_are_one_clear_line():
    proc = run_process([sys.executable, "-m", "kdexp.bench", "--variants", "fast,turbo"], cwd=REPO)
    assert proc.returncode == 2 and "unknown --variants turbo; choose from reference, fast, fast_cached" in proc.stderr


def test_a_device_this_machine_lacks_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--device", "cuda", "--out", "unused.json"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("python -m kdexp.bench: error: --device=cuda but no CUDA device is visible; "
                                       "use --device=cpu\n")
