"""`python -m launch.study` on bad input, without SLURM: every error is one line on stderr and a
non-zero exit, found by the dry run (every job of every stage composed and checked with kdexp's
own validation), before anything is written or submitted. A resubmission that would skip runs
that failed while training says so and exits non-zero."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from kdexp.records import write_result
from launch import check, study
from launch.plan import build_plan
from launch.sweep import hydra_session

QUICKSTART = ["--cluster", "slurm_local", "--protocol", "quickstart"]
pytestmark = pytest.mark.usefixtures("cluster_site")  # slurm_local: the test cluster's launcher


def run_study(capsys, *argv: str) -> tuple[int, str, str]:
    code = study.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.e2e  # plans a whole study
def test_dry_run_refuses_a_bad_value_before_the_gpu_nodes_do(tmp_path):
    """The issue's command, as a user types it: the value fails in the dry run, naming stage and job."""
    proc = subprocess.run([sys.executable, "-m", "launch.study", "--cluster", "slurm_a100", "--protocol", "v1",
                           "--dry-run", "--output-dir", str(tmp_path), "trainer.lr=-1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith("launch.study: stage teachers (resnet34 seed 0): trainer.lr=-1")
    assert not any(tmp_path.iterdir())


@pytest.mark.e2e  # plans a whole study
def test_dry_run_validates_the_later_stages_too(tmp_path, capsys):
    """teacher.stem is checked only where a teacher is loaded: the students' stage, not the teachers'."""
    code, out, err = run_study(capsys, *QUICKSTART, "--dry-run", "--output-dir", str(tmp_path), "teacher.stem=bogus")
    assert code == 2 and not out
    assert one_line(err).startswith("launch.study: stage students (resnet18->resnet18 logit_")
    assert "teacher.stem='bogus'" in err


def test_an_override_that_some_stage_lacks_names_that_stage(tmp_path, capsys):
    """method.alpha exists for KD students only: teachers train with method=ce."""
    code, _, err = run_study(capsys, *QUICKSTART, "--dry-run", "--output-dir", str(tmp_path), "method.alpha=0.5")
    assert code == 2
    assert one_line(err).startswith("launch.study: stage teachers (resnet18 seed 0): its config has no key "
                                    "method.alpha; launch.study passes every override to every training job")
    assert "+method.alpha" not in err  # Hydra's advice would send it to the teachers too


def test_a_syntax_error_names_the_override(tmp_path, capsys):
    code, _, err = run_study(capsys, *QUICKSTART, "--dry-run", "--output-dir", str(tmp_path), "seed=0,1=2")
    assert code == 2 and one_line(err).startswith("launch.study: seed=0,1=2: ")


def test_an_unknown_site_launcher_points_at_kdexp_site_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KDEXP_SITE_DIR", raising=False)
    code, _, err = run_study(capsys, "--cluster", "mysite", "--dry-run", "--output-dir", str(tmp_path))
    assert code == 2
    line = one_line(err)
    assert "no launcher config mysite: KDEXP_SITE_DIR is not set" in line
    assert "$KDEXP_SITE_DIR/hydra/launcher/" in line and "slurm_a100" in line  # where they go; what exists
    monkeypatch.setenv("KDEXP_SITE_DIR", str(tmp_path / "nowhere"))
    code, _, err = run_study(capsys, "--cluster", "mysite", "--dry-run", "--output-dir", str(tmp_path))
    assert code == 2 and f"KDEXP_SITE_DIR={tmp_path / 'nowhere'} does not exist" in one_line(err)


@pytest.mark.e2e  # plans a whole study
def test_the_plan_says_which_launcher_and_time_limit_teachers_get(tmp_path, capsys, monkeypatch):
    site = tmp_path / "site"
    (site / "hydra" / "launcher").mkdir(parents=True)
    (site / "hydra" / "launcher" / "mysite.yaml").write_text("defaults: [slurm_a100, _self_]\npartition: gpu\n")
    monkeypatch.setenv("KDEXP_SITE_DIR", str(site))
    code, out, _ = run_study(capsys, "--cluster", "mysite", "--protocol", "quickstart", "--dry-run",
                             "--output-dir", str(tmp_path / "out"))
    assert code == 0
    assert "teachers: hydra/launcher=mysite, time limit 3 h per run" in out
    assert "there is no mysite_teacher config, so teachers get mysite too" in out
    (site / "hydra" / "launcher" / "mysite_teacher.yaml").write_text("defaults: [mysite, _self_]\ntimeout_min: 360\n")
    code, out, _ = run_study(capsys, "--cluster", "mysite", "--protocol", "quickstart", "--dry-run",
                             "--output-dir", str(tmp_path / "out"))
    assert code == 0 and "teachers: hydra/launcher=mysite_teacher, time limit 6 h per run" in out
    assert "other training runs: hydra/launcher=mysite, time limit 3 h per run" in out
    assert "there is no" not in out


def test_an_unknown_grid_is_one_line_naming_the_presets(tmp_path, capsys):
    code, out, err = run_study(capsys, *QUICKSTART, "--grids", "smoke,dkdd", "--dry-run", "--output-dir", str(tmp_path))
    assert code == 2 and not out
    line = one_line(err)
    assert line.startswith("launch.study: --grids: dkdd is no kd_grid preset sweeping method.* (conf/kd_grid/dkdd.yaml")
    assert "dkd" in line.split("conf/kd_grid has: ")[1].split(", ")
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_:
        study.main([*QUICKSTART, "--grids", "smoke,", "--dry-run"])
    assert exit_.value.code == 2 and "--grids: 'smoke,' is not a comma-separated list" in one_line(capsys.readouterr().err)


def test_an_unknown_protocol_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        study.main(["--cluster", "slurm_local", "--protocol", "v3"])
    assert exit_.value.code == 2
    assert one_line(capsys.readouterr().err).startswith("python -m launch.study: argument --protocol: invalid choice")


@pytest.mark.e2e  # plans a whole study
def test_an_unwritable_output_dir_fails_the_dry_run(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_study(capsys, *QUICKSTART, "--dry-run", "--output-dir", str(blocker / "out"))
    assert code == 2 and f"cannot write {blocker}/out/quickstart: {blocker} is not a directory" in one_line(err)


@pytest.mark.e2e  # plans a whole study
def test_without_sbatch_nothing_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, out, err = run_study(capsys, *QUICKSTART, "--output-dir", str(tmp_path / "out"))
    assert code == 2 and "stage 1/3 teachers" in out
    assert one_line(err) == ("launch.study: sbatch not found: run this on a SLURM login node "
                             "(or see the plan with --dry-run)")
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e  # plans a whole study
def test_dry_run_true_is_refused_for_the_study(tmp_path, capsys):
    code, _, err = run_study(capsys, *QUICKSTART, "--output-dir", str(tmp_path), "dry_run=true")
    assert code == 2 and "use --dry-run" in one_line(err)


@pytest.mark.e2e  # plans a whole study
def test_dry_run_refuses_data_that_is_not_there_as_a_jobs_dry_run_does(tmp_path, capsys):
    """Every teacher would fail on its node: the dry run says so, as `kdexp.train ... dry_run=true` does."""
    code, _, err = run_study(capsys, *QUICKSTART, "--dry-run", "--output-dir", str(tmp_path / "out"),
                             "data.name=cifar10", f"data.root={tmp_path / 'data'}")
    assert code == 2
    assert one_line(err).startswith(f"launch.study: stage teachers (resnet18 seed 0): CIFAR-10 not found under "
                                    f"data.root={tmp_path / 'data'} ")
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e  # plans a whole study
def test_data_is_checked_once_per_data_config_of_the_runs_still_to_train(tmp_path, monkeypatch):
    """Two validation splits make two data configs: two checks for 14 runs; none for completed runs."""
    checked = []
    monkeypatch.setattr(study, "check_data_on_disk", lambda data: checked.append(data.val_size))
    with hydra_session():
        plan = build_plan("quickstart", "slurm_local", tmp_path, ["data.val_size=300,200"], sys.executable)
    assert sum(len(d.jobs) for d in plan.drivers) == 14
    study.check_data(plan)
    assert sorted(checked) == [200, 300]
    for job in (j for d in plan.drivers for j in d.jobs if j.cfg.data.val_size == 300):
        write_result(job.run_dir, {"status": "completed"})
    checked.clear()
    study.check_data(plan)
    assert checked == [200]


def fail_one_student(out: Path, failed_epoch: int | None) -> Path:
    with hydra_session():
        plan = build_plan("quickstart", "slurm_local", out, [], sys.executable)
    run_dir = next(d for d in plan.drivers if d.name == "smoke-quickstart").jobs[0].run_dir
    write_result(run_dir, {"status": "failed", "error": "NonFiniteLossError: loss is nan at epoch 1",
                           "failed_epoch": failed_epoch})
    return run_dir


@pytest.mark.e2e  # plans a whole study
def test_a_resubmission_that_would_skip_failed_runs_says_so_and_exits_1(tmp_path, capsys):
    run_dir = fail_one_student(tmp_path, failed_epoch=1)
    code, out, err = run_study(capsys, *QUICKSTART, "--dry-run", "--output-dir", str(tmp_path))
    assert code == 1
    assert "1 failed while training: skipped and counted failed unless retry_failed=true" in out
    line = one_line(err)
    assert line.startswith("launch.study: 1 run that failed while training would be skipped and counted as failed")
    assert f"{run_dir} (NonFiniteLossError: loss is nan at epoch 1)" in line and "retry_failed=true" in line
    code, out, err = run_study(capsys, *QUICKSTART, "--dry-run", "--output-dir", str(tmp_path), "retry_failed=true")
    assert code == 0 and not err and "failed while training" not in out


@pytest.mark.e2e  # plans a whole study
def test_a_run_that_failed_before_training_is_simply_redone(tmp_path, capsys):
    fail_one_student(tmp_path, failed_epoch=None)
    code, out, err = run_study(capsys, *QUICKSTART, "--dry-run", "--output-dir", str(tmp_path))
    assert code == 0 and not err and "failed while training" not in out


def test_launch_check_refuses_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    """`python -m launch.check`: the canary alone; bad input is one line, exit 2, nothing written."""
    assert check.main(["--cluster", "nosuch", "--output-dir", str(tmp_path)]) == 2
    assert one_line(capsys.readouterr().err).startswith("launch.check: --cluster nosuch: no launcher config nosuch: ")
    assert check.main(["--cluster", "slurm_local", "--output-dir", str(tmp_path), "seed=0,1=2"]) == 2
    assert one_line(capsys.readouterr().err).startswith("launch.check: seed=0,1=2: ")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert check.main(["--cluster", "slurm_local", "--output-dir", str(tmp_path), "experiment=paper_v1"]) == 2
    assert one_line(capsys.readouterr().err) == "launch.check: sbatch not found: run this on a SLURM login node"
    assert not any(tmp_path.iterdir())
