"""The fast path where it runs: on a CUDA GPU (`python -m pytest tests/gpu` on a GPU machine; skipped
elsewhere, since nothing here can run without one). Real runs of the entry point on generated data:
the same seed gives identical metrics in deterministic mode (eager and CUDA-graph compiled), the
teacher-logit cache and the live teacher reach the same accuracy, the fast path reaches the reference
loop's accuracy, and the benchmark runs every case on the GPU."""
import json
import statistics

import pytest
import torch

from helpers import TINY, run_train, without_timing
from kdexp import bench
from kdexp.records import read_metrics, read_result

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here: these tests check the fast GPU path on a GPU")]

GPU = (*TINY, "trainer.device=cuda", "model.width=16")
REFERENCE = ("data.loader=torch", "execution.amp=none", "execution.channels_last=false", "execution.fused=false")
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def gpu_teacher(tmp_path_factory, fake_root) -> str:
    """A quickstart R18 teacher trained on the GPU; returns the teachers dir students look in."""
    out = tmp_path_factory.mktemp("gpu-teacher")
    proc = run_train(*GPU, "experiment=teacher", f"data.root={fake_root}", f"paths.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return f"paths.teachers_dir={out}/teachers"


def _train(out, fake_root, *extra) -> dict:
    proc = run_train(*GPU, f"data.root={fake_root}", f"paths.output_dir={out}", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in out.rglob("result.json")]
    return {"result": read_result(run_dir), "metrics": read_metrics(run_dir)}


def _test_accs(tmp_path, name, fake_root, *extra) -> list[float]:
    return [_train(tmp_path / f"{name}{s}", fake_root, f"seed={s}", *extra)["result"]["test_acc_final"]
            for s in SEEDS]


def assert_within_noise(a: list[float], b: list[float]) -> None:
    """Means differ by less than three standard errors of the difference (plus one point, for
    seed sets whose spread happens to be tiny)."""
    stderr = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    assert abs(statistics.mean(a) - statistics.mean(b)) < 3 * stderr + 0.01, (a, b)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.e2e
def test_same_seed_gives_identical_metrics_on_the_gpu(tmp_path, fake_root, gpu_teacher, compile):
    args = ("teacher=resnet18", "teacher.width=16", "method=logit", gpu_teacher, "trainer.deterministic=true",
            f"execution.compile={compile}")
    first, second = [_train(tmp_path / str(i), fake_root, *args) for i in range(2)]
    assert first["result"]["execution"]["compile"] == compile
    assert first["result"]["execution"]["teacher_cache"]
    assert without_timing(first["metrics"]) == without_timing(second["metrics"])


@pytest.mark.e2e
def test_cached_and_live_teacher_reach_the_same_accuracy(tmp_path, fake_root, gpu_teacher):
    args = ("teacher=resnet18", "teacher.width=16", "method=logit", gpu_teacher)
    cached = _test_accs(tmp_path, "cached", fake_root, *args, "execution.teacher_cache=true")
    live = _test_accs(tmp_path, "live", fake_root, *args, "execution.teacher_cache=false")
    assert_within_noise(cached, live)


@pytest.mark.e2e
def test_fast_path_reaches_the_reference_loops_accuracy(tmp_path, fake_root):
    fast = _test_accs(tmp_path, "fast", fake_root, "experiment=baseline")
    reference = _test_accs(tmp_path, "reference", fake_root, "experiment=baseline", *REFERENCE)
    assert_within_noise(fast, reference)


def test_bench_runs_every_case_on_the_gpu(tmp_path):
    """Eager: compiling 15 graphs would take minutes (the compiled bench runs in launch/gpu_check.py)."""
    out = tmp_path / "bench.json"
    bench.main(["--device", "cuda", "--width", "16", "--steps", "3", "--warmup", "2", "--workers", "2",
                "--no-compile", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["device"] != "cpu" and report["study_gpu_hours"]["missing"] == [] and report["complete"]
    assert {r["case"] for r in report["results"]} == set(bench.CASES)
    assert all(r["s_per_epoch"] > 0 and 0 < r["fraction_of_peak"] < 1 for r in report["results"])
