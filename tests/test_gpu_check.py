"""launch/gpu_check.py, the GPU machine's one call, proved on the CPU: from an environment holding
what such a machine has (this one's packages less hydra-core, omegaconf, antlr4, submitit, the
launcher and kdexp) and the wheelhouse, --cpu-dry installs what is missing and runs every step to
the end; a step over its budget is killed, recorded as failed, and the next step still runs;
Dynamo's recompiles and graph breaks are counted from torch's own log."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path

import pytest

from helpers import REPO, run_process
from launch import gpu_check

# Installed here, missing on the GPU machine's image (the device tool's package list): what the
# wheelhouse must make up for (tzdata too, which this environment's python-dateutil needs).
MACHINE_LACKS = {"hydra-core", "omegaconf", "antlr4-python3-runtime", "submitit", "hydra-submitit-launcher",
                 "kdexp", "tzdata"}
NEEDED = {"hydra-core", "omegaconf", "antlr4-python3-runtime", "submitit", "hydra-submitit-launcher"}


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("wheelhouse")
    run_process([sys.executable, "-m", "launch.gpu_check", "--build-wheelhouse", "--wheelhouse", str(directory)],
                cwd=REPO, check=True)
    return directory


def machine_like_python(root: Path) -> Path:
    """A fresh venv seeing this environment's packages less MACHINE_LACKS: each kept distribution's
    top-level files linked into its site-packages (torch is linked, not copied)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    (site,) = root.glob("lib/python*/site-packages")
    for dist in distributions(path=[sysconfig.get_paths()["purelib"]]):
        if _canonical(dist.metadata["Name"]) in MACHINE_LACKS:
            continue
        for top in {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if not (site / top).exists():
                (site / top).symlink_to(dist.locate_file(top))
    return root / "bin" / "python"


def _check(python: Path | str, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OUT")}
    return run_process([str(python), "-m", "launch.gpu_check", "--cpu-dry", "--out", str(out), *args], cwd=REPO,
                       env=env)


@pytest.mark.e2e
def test_dry_run_installs_what_the_machine_lacks_from_the_wheelhouse_and_runs_every_step(tmp_path, wheelhouse):
    python = machine_like_python(tmp_path / "venv")
    bare = subprocess.run([str(python), "-c", "import torch, pandas, pytest; import hydra"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert "No module named 'hydra'" in bare.stderr  # has the machine's packages, not hydra
    # generous budgets: this shared CPU is far slower than the GPU machine the defaults are set for
    proc = _check(python, tmp_path / "out", "--wheelhouse", str(wheelhouse),
                  "--budget", "install=300,check=600,tests=600,bench=900,packing=600")
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert proc.returncode == 0, (summary, proc.stdout[-3000:])
    steps = summary["steps"]
    assert list(steps) == ["install", "check", "tests", "bench", "packing"] and summary["ok"]
    assert {_canonical(p.split("==")[0]) for p in steps["install"]["installed"]} - {"tzdata"} == NEEDED
    assert steps["tests"]["gpu"]["skipped"] > 0 and steps["tests"]["cpu"]["passed"] == 1
    # kdexp.check's own verdicts, fast profile (bf16 on the CPU; compile and channels_last need CUDA)
    assert [v["name"] for v in steps["check"]["verdicts"]] == \
        ["reference", "fused", "bf16", "teacher_cache", "profile", "throughput"]
    assert json.loads((tmp_path / "out" / "check" / "check.json").read_text())["ok"]
    bench = steps["bench"]
    assert {(r["case"], r["variant"]) for r in bench["table"]} >= {("r18_ce", "reference"), ("r18_ce", "fast"),
                                                                  ("r34_r18_logit", "fast_cached")}
    assert min(bench["peak_bf16_tflops"]) > 0 and bench["r18_fast_tflops"] > 0
    assert set(steps["packing"]["rounds"]) == {"1", "2"}
    assert steps["packing"]["rounds"]["2"]["processes"] == 2 and "usable_without_changes" in steps["packing"]["mps"]
    assert (tmp_path / "out" / "gpu_check.log").stat().st_size > 0


@pytest.mark.e2e
def test_a_step_over_its_budget_is_killed_and_recorded_and_the_next_runs(tmp_path):
    proc = _check(sys.executable, tmp_path, "--only", "check,packing", "--wheelhouse", str(tmp_path / "none"),
                  "--budget", "install=300,check=1,packing=600")
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert not steps["check"]["ok"] and steps["check"]["commands"][0]["timed_out"]
    assert steps["install"]["installed"] == [] and steps["packing"]["ok"]  # everything was there already


def test_torch_logs_count_recompiles_and_graph_breaks(tmp_path):
    """Real Dynamo output (CPU, eager backend): one graph break, then a recompile for a new size."""
    script = tmp_path / "dynamo.py"
    script.write_text("import torch\n"
                      "def f(x):\n"
                      "    y = x * 2\n"
                      "    torch._dynamo.graph_break()\n"
                      "    return y + 1\n"
                      "g = torch.compile(f, backend='eager', dynamic=False)\n"
                      "g(torch.randn(4)); g(torch.randn(4)); g(torch.randn(5))\n")
    proc = run_process([sys.executable, str(script)], env={**os.environ, "TORCH_LOGS": "recompiles,graph_breaks"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = gpu_check.torch_log_counts(proc.stderr)
    assert counts["graph_breaks"] >= 1 and counts["graph_breaks_at"] == [f"{script}:4"]
    assert counts["recompiles"] >= 1 and any("size mismatch" in g for g in counts["guard_failures"])
    assert gpu_check.torch_log_counts("")["recompiles"] == 0


def test_bad_options_are_one_clear_line(tmp_path):
    proc = _check(sys.executable, tmp_path, "--budget", "bench=soon")
    assert proc.returncode == 2 and "--budget 'bench=soon': give STEP=SECONDS" in proc.stderr
    assert "Traceback" not in proc.stderr
