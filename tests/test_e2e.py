"""Real runs of the entry point on generated data: every method learns, writes its files, is
deterministic, resumes exactly after a kill, and is never retrained once completed."""
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from helpers import HANG_S, REPO, TINY, communicate, compose_cfg, run_process, run_train, student_args, without_timing
from analysis.collect import collect
from job_record import job_args, recorded
from kdexp.records import read_metrics, read_result
from kdexp.run_record import SCHEMA_VERSION, RunRecord

# Width 8: a width-4 Feature-KD student barely moves in 3 epochs (measured: 22% vs 45% at width 8).
METHODS = {
    "ce": ("experiment=baseline", "model.width=8"),
    "logit": ("method=logit", "method.alpha=0.5", "method.T=4", "model.width=8"),
    "feature": ("method=feature", "method.alpha=0.5", "model.width=8"),
}


def _run_dir(out, proc):
    dirs = [p.parent for p in out.rglob("result.json")]
    assert len(dirs) == 1, (dirs, proc.stderr[-2000:])
    return dirs[0]


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory, teacher_run, fake_root):
    runs = {}
    for name, args in METHODS.items():
        out = tmp_path_factory.mktemp(name)
        extra = args if name != "ce" else ()
        base = student_args(out, fake_root, *extra) if name != "ce" else \
            (*TINY, f"data.root={fake_root}", f"paths.output_dir={out}", *args)
        teacher_dir = f"paths.teachers_dir={teacher_run}/teachers"
        proc = run_train(*base, teacher_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = _run_dir(out, proc)
    return runs


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.e2e
def test_each_method_learns_above_chance(method_runs, name):
    result = read_result(method_runs[name])
    assert result["status"] == "completed" and result["method"] == name
    assert result["test_acc_final"] > 0.25 and result["best_val_acc"] > 0.25  # chance is 0.1


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.e2e
def test_result_and_metrics_carry_every_field(method_runs, name):
    run_dir = method_runs[name]
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    common = {"epoch", "lr", "loss", "loss_ce", "train_acc", "val_acc", "test_acc", "grad_norm_max",
              "grad_norm_mean", "proj_grad_norm_max", "clip_fraction", "epoch_seconds", "images_per_s"}
    extra = {"ce": set(), "logit": {"loss_kd", "agreement", "kl_t1", "kl_t4"},
             "feature": {"loss_kd", "loss_mse", "loss_cos", "agreement", "kl_t1", "kl_t4"}}[name]
    assert set(rows[0]) == common | extra
    lr = OmegaConf.load(run_dir / ".hydra" / "config.yaml").trainer.lr  # the protocol's, not a constant here
    assert rows[0]["lr"] == pytest.approx(lr) and rows[1]["lr"] < rows[0]["lr"]
    assert (rows[0]["proj_grad_norm_max"] is not None) == (name == "feature")
    result = read_result(run_dir)
    for key in ["best_val_acc", "best_val_epoch", "test_acc_at_best_val", "test_acc_final", "best_test_acc",
                "per_class_test_acc", "params", "wall_seconds", "torch", "device", "git_commit", "kind",
                "grad_norm_max", "clip_fraction", "images_per_s", "train_seconds"]:
        assert key in result, key
    assert len(result["per_class_test_acc"]) == 10
    assert result["execution"] == {"numerics": "reference", "precision": "fp32", "channels_last": False,
                                   "fused": False, "compile": False, "teacher_cache": False, "profile": "reference",
                                   "tf32_conv": torch.backends.cudnn.allow_tf32,
                                   "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}  # the reference loop
    best = max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))
    assert (result["best_val_epoch"], result["test_acc_at_best_val"]) == (best["epoch"], best["test_acc"])
    assert result["test_acc_final"] == rows[-1]["test_acc"]
    if name == "ce":
        assert result["fidelity"] is None and result["kind"] == "baseline"
    else:
        assert set(result["fidelity"]) == {"agreement", "kl_t1", "kl_t4", "teacher_test_acc"}
        assert result["params"]["teacher"] > 0
    assert (result["params"]["method"] > 0) == (name == "feature")
    assert (run_dir / ".hydra" / "config.yaml").is_file()


@pytest.mark.e2e
def test_same_seed_gives_identical_metrics(method_runs, tmp_path, teacher_run, fake_root):
    proc = run_train(*student_args(tmp_path, fake_root, *METHODS["feature"]), f"paths.teachers_dir={teacher_run}/teachers")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = read_metrics(_run_dir(tmp_path, proc))
    assert without_timing(again) == without_timing(read_metrics(method_runs["feature"]))


@pytest.mark.e2e
def test_a_completed_run_is_skipped_not_retrained(method_runs, teacher_run, fake_root):
    """Resubmitted with a setting that is not part of the run dir's name (here trainer.progress),
    the run is skipped and keeps the result and the .hydra/ config that made it."""
    run_dir = method_runs["logit"]
    out = next(p for p in run_dir.parents if p.name == "quickstart").parent
    kept = ["result.json", *(f".hydra/{name}" for name in ("config.yaml", "hydra.yaml", "overrides.yaml"))]
    before = {name: (run_dir / name).read_bytes() for name in kept}
    proc = run_train(*student_args(out, fake_root, *METHODS["logit"]), f"paths.teachers_dir={teacher_run}/teachers",
                     "trainer.progress=true")
    assert proc.returncode == 0
    assert "skipping" in proc.stdout + proc.stderr and "result.json says completed" in proc.stdout + proc.stderr
    assert {name: (run_dir / name).read_bytes() for name in kept} == before


@pytest.mark.e2e
def test_killed_run_resumes_to_identical_metrics(tmp_path, teacher_run, fake_root):
    args = student_args(tmp_path / "a", fake_root, *METHODS["logit"], "trainer.epochs=4",
                        f"paths.teachers_dir={teacher_run}/teachers")
    proc = subprocess.Popen([sys.executable, "-m", "kdexp.train", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = None
    deadline = time.time() + HANG_S
    while time.time() < deadline and proc.poll() is None:
        metrics = next((tmp_path / "a").rglob("metrics.jsonl"), None)
        if metrics and len(metrics.read_text().splitlines()) >= 2:
            proc.send_signal(signal.SIGTERM)  # what SLURM sends on preemption or at the time limit
            break
        time.sleep(0.05)
    communicate(proc)  # SIGTERM: it saves and exits
    assert metrics is not None and not (metrics.parent / "result.json").exists(), "run was not interrupted"
    resumed = run_train(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    interrupted_at = int(re.search(rf"resuming {re.escape(str(metrics.parent))} after epoch (\d+)",
                                   resumed.stdout + resumed.stderr).group(1))
    assert 2 <= interrupted_at < 4
    straight = run_train(*student_args(tmp_path / "b", fake_root, *METHODS["logit"], "trainer.epochs=4",
                                       f"paths.teachers_dir={teacher_run}/teachers"))
    assert straight.returncode == 0
    reference = read_metrics(next((tmp_path / "b").rglob("metrics.jsonl")).parent)
    assert without_timing(read_metrics(metrics.parent)) == without_timing(reference)
    assert read_result(metrics.parent)["test_acc_final"] == reference[-1]["test_acc"]


@pytest.mark.e2e
def test_nan_loss_fails_the_run_with_its_epoch_and_is_retried_only_when_asked(tmp_path, fake_root):
    args = (*TINY, f"data.root={fake_root}", f"paths.output_dir={tmp_path}", "experiment=baseline",
            "trainer.lr=1e30", "trainer.clip_norm=null")
    proc = run_train(*args)
    assert proc.returncode != 0
    result = read_result(next(tmp_path.rglob("result.json")).parent)
    assert result["status"] == "failed" and result["failed_epoch"] == 1
    assert "NonFiniteLossError" in result["error"]
    record = RunRecord.from_json(result)  # the typed record a completed run writes, with what failed
    assert result["schema_version"] == SCHEMA_VERSION and record.identity.network.arch == "resnet18"
    assert record.config["trainer"]["lr"] == 1e30 and record.provenance.torch and record.cost.wall_seconds > 0
    (status,) = collect(tmp_path)["status"]
    assert status == "failed"
    assert proc.stderr.strip().splitlines() == [  # one line, and no "check the teacher" for a baseline
        "kdexp: loss became NaN/inf in epoch 1; lower trainer.lr"], proc.stderr
    run_dir = next(tmp_path.rglob("result.json")).parent
    assert "Traceback" in (run_dir / "train.log").read_text()  # the traceback is in the log only
    before = (run_dir / "result.json").read_bytes()
    again = run_train(*args)  # skipped, and still a failure: exit 1, not 0
    assert again.returncode == 1 and "retry_failed=true" in again.stderr
    assert (run_dir / "result.json").read_bytes() == before
    retried = run_train(*args, "retry_failed=true")
    assert retried.returncode == 1 and "loss became NaN/inf in epoch 1" in retried.stderr


@pytest.mark.e2e
def test_missing_teacher_fails_without_training_and_trains_once_it_exists(tmp_path, fake_root, teacher_run):
    proc = run_train(*student_args(tmp_path, fake_root, "method=logit"))
    assert proc.returncode != 0
    assert "teacher checkpoint not found" in proc.stderr and "experiment=teacher" in proc.stderr
    run_dir = next(tmp_path.rglob("result.json")).parent
    result = read_result(run_dir)
    assert result["status"] == "failed" and "TeacherError" in result["error"] and result["failed_epoch"] is None
    assert not list(tmp_path.rglob("metrics.jsonl"))
    # the same command once the teacher exists: redone without retry_failed (it never trained)
    again = run_train(*student_args(tmp_path, fake_root, "method=logit"), f"paths.teachers_dir={teacher_run}/teachers")
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_result(run_dir)["status"] == "completed"


@pytest.mark.e2e
def test_analysis_turns_real_runs_into_the_key_results_table(method_runs, teacher_run, tmp_path):
    roots = sorted({str(next(q for q in p.parents if q.name == "quickstart")) for p in method_runs.values()})
    proc = run_process([sys.executable, "-m", "analysis", *roots, str(teacher_run), "--out", str(tmp_path)], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    key = (tmp_path / "key_results.md").read_text()
    for name in ("none", "logit", "feature"):
        assert f"| {name} " in key or f"| {name}  " in key, key
    results = {name: read_result(d) for name, d in method_runs.items()}
    assert f"{100 * results['logit']['test_acc_at_best_val']:.2f}" in key  # one seed: the value itself
    assert (tmp_path / "report.html").stat().st_size > 10_000


@pytest.mark.e2e
def test_corrupt_last_checkpoint_is_a_clear_failure(tmp_path, fake_root):
    args = (*TINY, f"data.root={fake_root}", f"paths.output_dir={tmp_path}", "experiment=baseline", "dry_run=true")
    jobs = tmp_path.with_name(f"{tmp_path.name}.jobs")
    record, env = job_args(jobs)
    assert run_train(*args, *record, env=env).returncode == 0  # says where the run would write
    [run_dir] = recorded(jobs)
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"not a checkpoint")
    proc = run_train(*args[:-1])
    assert proc.returncode != 0
    assert f"cannot read checkpoint {run_dir / 'last.pt'}" in proc.stderr and "delete it" in proc.stderr
    assert read_result(run_dir)["status"] == "failed"


def test_kd_student_starts_from_its_baselines_weights(tmp_path, fake_root):
    """Seed i of a distilled student and of its baseline share initial weights (and, by
    construction, data order: tests/test_data.py), which the seed-paired comparison relies on."""
    import torch

    from kdexp.config import validate
    from kdexp.data import load_splits
    from kdexp.execution import Execution
    from kdexp.job import build_loop
    from kdexp.models import build_model
    from kdexp.teachers import FrozenTeacher

    splits = load_splits(fake_root, 200, 1234, verify_md5=False)
    cpu = torch.device("cpu")
    initial = {}
    for name, overrides in {"baseline": ("experiment=baseline",),
                            "logit": ("method=logit", "teacher=resnet18", "teacher.width=8")}.items():
        cfg = compose_cfg(*TINY, f"data.root={fake_root}", *overrides)
        method = validate(cfg)
        torch.manual_seed(cfg.seed)
        teacher = FrozenTeacher(build_model("resnet18", width=8)) if method.needs_teacher else None
        loop = build_loop(cfg, method, Execution(), splits, teacher, cpu, tmp_path / name)
        initial[name] = loop.student.state_dict()
    assert all(torch.equal(initial["baseline"][k], initial["logit"][k]) for k in initial["baseline"])


def test_make_quickstart_distils_from_the_teacher_it_trains_on_the_baselines_seeds():
    """`make quickstart` runs its steps as make targets, two at a time (Makefile): the teacher's
    command must export where the distillation commands look, and the per-seed distillation commands
    must cover exactly the baselines' seeds (a seed missing on one side would leave its pair unmatched)."""
    from kdexp.teachers import resolve_teacher_export_path
    from kdexp.teachers import derived_teacher_path

    dry = subprocess.run(["make", "--no-print-directory", "-n", "quickstart-runs"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    commands = [line.split("kdexp.train", 1)[1].split() for line in dry.splitlines() if "kdexp.train" in line]
    overrides = [dict(a.split("=", 1) for a in c if a != "-m") for c in commands]
    (teacher,) = [o for o in overrides if o.get("experiment") == "teacher"]
    (baselines,) = [o for o in overrides if o.get("experiment") == "baseline"]
    students = [o for o in overrides if o.get("experiment") == "quickstart"]
    exported = resolve_teacher_export_path(compose_cfg(*(f"{k}={v}" for k, v in teacher.items())))
    for student in students:
        assert derived_teacher_path(compose_cfg(*(f"{k}={v}" for k, v in student.items()))) == exported
    assert sorted(s["seed"] for s in students) == baselines["seed"].split(",")
