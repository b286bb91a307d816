"""The study's plan without SLURM (launch.study / launch.plan / launch.select): stages, run counts,
dependencies and GPU-hours of protocols v1 and v2; what a re-run skips, keeps or resubmits; the
v2 selection step; and that a driver's multirun writes exactly the run dirs the plan composed.
The pairs are read from the experiment presets, as the plan reads them: the YAML is the one list."""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import REPO, run_process
from kdexp import bench
from kdexp.config import validate
from kdexp.records import write_result
from launch import check, select, study
from launch.plan import PROTOCOLS, Pair, Plan, PlanError, build_plan, read_experiment
from launch.sweep import hydra_session, task_config

PAPER_GRIDS = PROTOCOLS["v2"].grids
# v2 cells chosen before the plan is built, so the finals compose with them
CELLS = {"logit": {"overrides": ["method.alpha=0.7", "method.T=2"]}, "feature": {"overrides": ["method.alpha=0.3"]},
         "tsweep": {"overrides": ["method.T=8"]}}


@functools.cache
def pairs(experiment: str) -> list[Pair]:
    with hydra_session():
        return read_experiment(experiment).pairs


def pair_archs(experiment: str) -> dict[str, tuple[str, str]]:
    """pair name -> (teacher arch, student arch), as composed: conf/pair/ names networks by their arch."""
    return {p.name: (p.teacher, p.student) for p in pairs(experiment)}


def selected(grids) -> str:
    return json.dumps({"selected": {p.name: {g: CELLS[g] for g in grids} for p in pairs("paper_v2")}})


def make_plan(protocol: str, cluster: str, out: Path, *extra: str, grids=None) -> Plan:
    with hydra_session():
        return build_plan(protocol, cluster, out, extra, sys.executable, grids)


def driver(plan: Plan, name: str):
    return next(d for d in plan.drivers if d.name == name)


def runs(plan: Plan, prefix: str) -> list:
    return [j for d in plan.drivers if d.name.startswith(prefix) for j in d.jobs]


def pair_of(job) -> tuple[str, str]:
    return job.cfg.teacher.arch, job.cfg.model.arch


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> Plan:
    return make_plan("v1", "slurm_a100", tmp_path_factory.mktemp("v1"))


@pytest.fixture(scope="module")
def v2(tmp_path_factory) -> Plan:
    """v2 on the local launcher with dry_run=true, so a driver's command can run here."""
    out = tmp_path_factory.mktemp("v2")
    (out / "paper_v2").mkdir()
    (out / "paper_v2" / "selected.json").write_text(selected(PAPER_GRIDS))
    return make_plan("v2", "local", out, "dry_run=true")


@pytest.mark.e2e
def test_v1_plan_has_three_stages_with_the_papers_run_counts(v1):
    assert v1.stages == ["teachers", "students", "analysis"]
    teachers = v1.stage_drivers("teachers")
    assert sorted(j.cfg.model.arch for d in teachers for j in d.jobs) == ["resnet34", "resnet50"]
    assert all(j.cfg.export_teacher and j.cfg.trainer.epochs == 200 for d in teachers for j in d.jobs)
    assert len(runs(v1, "logit-")) == 81 and len(runs(v1, "feature-")) == 27
    assert Counter(pair_of(j) for j in runs(v1, "logit-")) == {archs: 27 for archs in pair_archs("paper_v1").values()}
    assert sorted((j.cfg.model.arch, j.cfg.seed) for j in runs(v1, "baselines")) == \
        [(arch, seed) for arch in ("resnet18", "resnet34") for seed in (0, 1, 2)]
    assert {j.cfg.data.val_size for d in v1.drivers for j in d.jobs} == {0}
    [analysis] = v1.stage_drivers("analysis")
    assert not analysis.jobs and analysis.dependency == "afterany"
    assert analysis.after == [d.name for d in v1.drivers if d is not analysis]
    assert analysis.lines == [f"{sys.executable} -m analysis {v1.experiment_dir} --out {v1.experiment_dir}/report"]


@pytest.mark.e2e
def test_v1_plan_has_no_duplicated_runs(v1):
    dirs = [j.run_dir for d in v1.drivers for j in d.jobs]
    assert len(dirs) == len(set(dirs)) == 2 + 81 + 27 + 6


@pytest.mark.e2e
def test_temperature_never_multiplies_feature_runs(v1):
    feature = runs(v1, "feature-")
    assert not [o for j in feature for o in j.overrides if o.startswith("method.T")]
    assert {j.cfg.method._target_ for j in feature} == {"kdexp.methods.feature.FeatureKD"}
    assert len({(*pair_of(j), j.cfg.method.alpha, j.cfg.seed) for j in feature}) == 27


@pytest.mark.e2e
def test_v1_students_wait_for_their_teacher_and_teachers_get_the_teacher_launcher(v1):
    for pair, (teacher_arch, _) in pair_archs("paper_v1").items():
        teacher = f"teacher-{teacher_arch}"
        assert driver(v1, f"logit-{pair}").after == driver(v1, f"feature-{pair}").after == [teacher]
        assert driver(v1, f"logit-{pair}").dependency == "afterok"
    assert driver(v1, "baselines").after == [] and driver(v1, "teacher-resnet34").after == []
    commands = {d.name: d.lines[-1] for d in v1.drivers}
    assert commands["teacher-resnet50"] == (f"{sys.executable} -m kdexp.train -m experiment=teacher protocol=v1 "
                                            f"model=resnet50 paths.output_dir={v1.experiment_dir.parent} "
                                            "hydra/launcher=slurm_a100_teacher")
    assert commands["logit-r50_to_r34"].endswith("kd_grid=logit pair=r50_to_r34 "
                                                 f"paths.output_dir={v1.experiment_dir.parent} hydra/launcher=slurm_a100")


@pytest.mark.e2e
def test_v1_dry_run_prints_stages_commands_and_gpu_hours(v1):
    text = study.describe(v1, study.decide(v1, {}, set()))
    # launch.epoch_time's model (R18 5.7, R34 11.0, R50 19.0 s per epoch, the measured 6.4, 10, 18.6):
    # teachers 200 epochs of R34 and R50; 3 baselines each of R18 and R34; 36 distillations per pair
    assert "stage 1/3 teachers: 2 drivers, 2 training runs, 1.7 GPU-h" in text
    assert "teacher-resnet34: 1 run, 0.6 GPU-h" in text and "teacher-resnet50: 1 run, 1.1 GPU-h" in text
    assert "stage 2/3 students: 7 drivers, 114 training runs, 39.6 GPU-h" in text
    assert "stage 3/3 analysis: 1 driver, CPU only" in text
    assert "total: 116 distinct training runs, 41.3 GPU-h" in text and "R50 18.6 s (modelled 19.0)" in text
    assert all(f"    {d.lines[-1]}" in text for d in v1.drivers)
    assert "--time=3-00:00:00" in text and ".study" in text


@pytest.mark.e2e
def test_v2_plan_selects_on_48_seed0_runs(v2):
    assert v2.stages == ["teachers", "selection", "select", "finals", "analysis"]
    teachers = [j for d in v2.stage_drivers("teachers") for j in d.jobs]
    assert sorted((j.cfg.model.arch, j.cfg.seed) for j in teachers) == \
        [(arch, seed) for arch in ("resnet101", "resnet34", "resnet50") for seed in (0, 1, 2)]
    selection = v2.stage_drivers("selection")
    chosen = [j for d in selection for j in d.jobs]
    assert len(selection) == 8 and len(chosen) == 4 * (9 + 3) == 48
    assert {j.cfg.seed for j in chosen} == {0} and {j.cfg.data.val_size for j in chosen} == {5000}
    for pair, (teacher_arch, _) in pair_archs("paper_v2").items():
        assert len(driver(v2, f"selection-logit-{pair}").jobs) == 9
        assert len(driver(v2, f"selection-feature-{pair}").jobs) == 3
        assert driver(v2, f"selection-logit-{pair}").after == [f"teacher-{teacher_arch}"]
    select_step = driver(v2, "select")
    assert select_step.after == [d.name for d in selection] and select_step.dependency == "afterok"
    [manifest] = select_step.files.values()
    assert json.loads(manifest) == {p: {g: [str(j.run_dir) for j in driver(v2, f"selection-{g}-{p}").jobs]
                                        for g in PAPER_GRIDS} for p in pair_archs("paper_v2")}


@pytest.mark.e2e
def test_v2_finals_run_the_selected_cells_over_five_seeds(v2):
    finals = v2.stage_drivers("finals")
    assert len(finals) == 9 and sum(len(d.jobs) for d in finals) == 8 * 5 + 2 * 5
    assert sorted((j.cfg.model.arch, j.cfg.seed) for j in driver(v2, "baselines").jobs) == \
        [(arch, seed) for arch in ("resnet18", "resnet34") for seed in range(5)]
    for pair in pair_archs("paper_v2"):
        final = driver(v2, f"final-logit-{pair}")
        assert "select" in final.after and final.lines[0].startswith("cell=$(") and final.lines[-1].endswith(" $cell")
        assert {(j.cfg.method.alpha, j.cfg.method.T) for j in final.jobs} == {(0.7, 2)}
        assert sorted(j.cfg.seed for j in final.jobs) == [0, 1, 2, 3, 4]
        # seed 0 of the selected cell is its selection run: the same dir, not a second run
        seed0 = next(j.run_dir for j in final.jobs if j.cfg.seed == 0)
        assert seed0 in {j.run_dir for j in driver(v2, f"selection-logit-{pair}").jobs}
    text = study.describe(v2, study.decide(v2, {}, set()))
    assert "stage 2/5 selection: 8 drivers, 48 training runs" in text and "stage 4/5 finals: 9 drivers" in text
    assert "total: 99 distinct training runs" in text  # 9 teachers + 48 + 40 + 10 - 8 reused seed-0 finals


@pytest.mark.e2e
def test_v2_finals_driver_multirun_writes_exactly_the_planned_run_dirs(v2):
    final = driver(v2, "final-feature-r50_to_r34")
    proc = run_process(["bash", "-c", "\n".join(["set -eo pipefail", *final.lines])], cwd=REPO)
    # its teachers are not trained here: the dry run says so (exit 2); what matters is where its jobs write
    assert "multirun summary: 5 dry_run" in proc.stdout, proc.stderr[-3000:]
    would = re.findall(r"dry run: would train .* with (\{.*\}) for .*, into (\S+)", proc.stdout)
    assert {Path(d) for _, d in would} == {j.run_dir for j in final.jobs}
    assert all("'alpha': 0.3" in m for m, _ in would)
    assert not list(v2.experiment_dir.rglob(".hydra"))  # a dry run writes nothing into the tree


@pytest.mark.e2e
def test_v2_finals_are_redone_after_a_new_selection(v2):
    final = driver(v2, "final-logit-r34_to_r18")
    for job in final.jobs:
        complete(job)
    decisions = study.decide(v2, {}, set())
    assert decisions["select"].action == "submit"  # its selection runs are not all complete
    assert final.done() and decisions[final.name].action == "submit"


@pytest.mark.e2e
def test_v2_runs_any_kd_grid_and_selects_again_when_a_grid_is_new(tmp_path):
    """kd_grid=tsweep (method=logit, T swept at α 0.5): stages named by the grid, finals that compose
    the grid's preset (not a method of its name), and a selected.json from before the grid was added
    is not taken as its selection: the select step runs again and the finals await it."""
    (tmp_path / "paper_v2").mkdir()
    (tmp_path / "paper_v2" / "selected.json").write_text(selected(["logit"]))
    plan = make_plan("v2", "slurm_a100", tmp_path, grids=["tsweep"])
    assert {d.name for d in plan.stage_drivers("selection")} == {f"selection-tsweep-{p}" for p in pair_archs("paper_v2")}
    for pair in pair_archs("paper_v2"):
        chosen = driver(plan, f"selection-tsweep-{pair}").jobs
        assert sorted(j.cfg.method.T for j in chosen) == [1, 2, 4, 8, 16] and {j.cfg.method.alpha for j in chosen} == {0.5}
        final = driver(plan, f"final-tsweep-{pair}")
        assert f"pair={pair} kd_grid=tsweep " in final.lines[-1] and final.awaits_selection and not final.done()
        # its size before the selection: one cell (the grid's first stands in) x five seeds, seed 0 reused
        assert sorted(j.cfg.seed for j in final.jobs) == [0, 1, 2, 3, 4]
        assert next(j.run_dir for j in final.jobs if j.cfg.seed == 0) in {j.run_dir for j in chosen}
    select_step = driver(plan, "select")
    assert select_step.output.is_file() and not select_step.done()
    assert study.decide(plan, {}, set())["select"].action == "submit"
    [manifest] = select_step.files.values()
    assert set(json.loads(manifest)["r34_to_r18"]) == {"tsweep"}


@pytest.mark.e2e
def test_a_dkd_grid_is_a_stage_of_the_study(tmp_path, cluster_site):
    """--grids names kd_grid presets: a DKD grid is one more students' driver, after its teacher."""
    plan = make_plan("quickstart", "slurm_local", tmp_path, grids=["smoke", "dkd"])
    dkd = driver(plan, "dkd-quickstart")
    assert dkd.stage == "students" and dkd.after == ["teacher-resnet18"]
    assert dkd.lines[-1].split(" -m kdexp.train -m ")[1].startswith("protocol=quickstart experiment=quickstart kd_grid=dkd ")
    assert {j.cfg.method._target_ for j in dkd.jobs} == {"kdexp.methods.dkd.DKD"}
    assert Counter((j.cfg.method.beta, j.cfg.method.T) for j in dkd.jobs) == \
        {(beta, T): 2 for beta in (1, 2, 4, 8) for T in (2, 4)}  # the grid's cells x the experiment's seeds 0, 1
    assert len(driver(plan, "smoke-quickstart").jobs) == 4
    text = study.describe(plan, study.decide(plan, {}, set()))
    assert "stage 2/3 students: 3 drivers, 22 training runs" in text and "dkd-quickstart: 16 runs" in text


@pytest.mark.e2e
def test_the_cifar100_benchmark_is_a_study_of_its_teachers_and_its_one_multirun(tmp_path, cluster_site):
    """--protocol cifar100: the benchmark's five teachers under its recipe, then experiment=cifar100_kd
    (8 pairs x its 10 methods x 3 seeds), each student after the teachers it loads; --grids is refused."""
    plan = make_plan("cifar100", "slurm_local", tmp_path)
    teachers = {d.name for d in plan.drivers if d.stage == "teachers"}
    assert teachers == {f"teacher-{a}" for a in ("resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13")}
    assert all(j.cfg.hydra.runtime.choices.protocol == "crd" for d in plan.drivers for j in d.jobs)
    benchmark = driver(plan, "benchmark")
    assert sorted(benchmark.after) == sorted(teachers) and len(benchmark.jobs) == 240
    assert Counter(j.cfg.method._target_.rsplit(".", 1)[1] for j in benchmark.jobs) == \
        {"CrossEntropy": 24, "LogitKD": 48, "DKD": 48, "CRD": 24, "ReviewKD": 24, "MLKD": 24, "CTKD": 48}
    assert len({j.run_dir for j in benchmark.jobs}) == 240
    with pytest.raises(PlanError, match="--protocol cifar100 runs its experiment's own methods"):
        make_plan("cifar100", "slurm_local", tmp_path, grids=["dkd"])


@pytest.mark.e2e
def test_the_cifar100_benchmark_is_estimated_per_network_and_the_limits_get_its_longest_run(tmp_path, cluster_site):
    plan = make_plan("cifar100", "slurm_local", tmp_path)
    text = study.describe(plan, study.decide(plan, {}, set()))
    # 240 epochs at batch 64 (782 steps) of the modelled networks; resnet32x4 is the largest teacher
    assert "teacher-resnet32x4: 1 run, 0.8 GPU-h" in text and "teacher-vgg13: 1 run, 0.2 GPU-h" in text
    assert "stage 1/3 teachers: 5 drivers, 5 training runs, 2.1 GPU-h" in text
    assert "benchmark: 240 runs, 78.1 GPU-h" in text and "total: 245 distinct training runs, 80.2 GPU-h" in text
    assert "time limit 1 h per run (longest ~0.8 GPU-h)" in text


@pytest.fixture
def quickstart(tmp_path, cluster_site) -> Plan:
    return make_plan("quickstart", "slurm_local", tmp_path)


def complete(job, status: str = "completed", failed_epoch: int | None = 1) -> None:
    write_result(job.run_dir, {"status": status, **({"failed_epoch": failed_epoch} if status == "failed" else {})})


def actions(plan: Plan, previous: dict | None = None, queued: set | None = None) -> dict[str, str]:
    return {n: d.action for n, d in study.decide(plan, previous or {}, queued or set()).items()}


def test_rerun_skips_complete_drivers_and_notes_failed_runs(quickstart):
    assert set(actions(quickstart).values()) == {"submit"}
    for name in ("teacher-resnet18", "baselines"):
        for job in driver(quickstart, name).jobs:
            complete(job)
    first, second, *rest = driver(quickstart, "smoke-quickstart").jobs
    complete(first, "failed")
    complete(second, "failed", failed_epoch=None)  # failed before training: simply run again
    decisions = study.decide(quickstart, {}, set())
    assert {n: d.action for n, d in decisions.items()} == {
        "teacher-resnet18": "skip", "baselines": "skip", "smoke-quickstart": "submit", "analysis": "submit"}
    assert decisions["teacher-resnet18"].why == "all 1 run completed"
    assert decisions["smoke-quickstart"].why == \
        "1 failed while training: skipped and counted failed unless retry_failed=true"
    for job in [first, second, *rest]:
        complete(job)
    assert actions(quickstart)["analysis"] == "submit"  # no report yet
    (quickstart.experiment_dir / "report").mkdir()
    (quickstart.experiment_dir / "report" / "report.html").write_text("")
    assert set(actions(quickstart).values()) == {"skip"}


def test_rerun_keeps_queued_drivers_unless_what_they_wait_for_is_resubmitted(quickstart):
    previous = {"teacher-resnet18": "11", "smoke-quickstart": "12", "baselines": "13", "analysis": "14"}
    assert set(actions(quickstart, previous, {"11", "12", "13", "14"}).values()) == {"keep"}
    decisions = study.decide(quickstart, previous, {"12", "14"})  # the teacher's driver ended (and failed)
    assert decisions["teacher-resnet18"].action == "submit" and decisions["baselines"].action == "submit"
    assert (decisions["smoke-quickstart"].action, decisions["smoke-quickstart"].stale) == ("submit", "12")
    assert (decisions["analysis"].action, decisions["analysis"].stale) == ("submit", "14")


SITE = """defaults: [slurm_a100, _self_]
partition: gpu
account: proj
qos: normal
constraint: a100
gpus_per_node: null
gres: gpu:a100:1
setup: ["source ~/venvs/kdexp/bin/activate"]
additional_parameters: {reservation: kd}
"""


def test_the_canary_is_one_gpu_job_on_the_students_launcher(tmp_path, monkeypatch):
    """Stage 0 gets what the students' GPU jobs get (site, GPU, memory, setup lines; under srun) with its
    own 20-minute limit, checks their execution profile, and writes under <experiment>/canary/<job id>/;
    the drivers keep their CPU-only resources."""
    (tmp_path / "site" / "hydra" / "launcher").mkdir(parents=True)
    (tmp_path / "site" / "hydra" / "launcher" / "mysite.yaml").write_text(SITE)
    monkeypatch.setenv("KDEXP_SITE_DIR", str(tmp_path / "site"))
    plan = make_plan("quickstart", "mysite", tmp_path / "out", "execution=fast")
    text = check.script(plan.canary)
    options = [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH")]
    assert options == ["--job-name=kdexp-quickstart-canary", f"--output={plan.experiment_dir}/canary/%j.out",
                       "--partition=gpu", "--account=proj", "--qos=normal", "--constraint=a100", "--gres=gpu:a100:1",
                       "--cpus-per-task=4", "--mem=32GB", "--reservation=kd", "--time=20"]
    body = text.splitlines()[len(options) + 2:]
    assert body == ["set -eo pipefail", f"cd {Path.cwd()}", "source ~/venvs/kdexp/bin/activate",
                    f'srun --unbuffered {sys.executable} -m kdexp.check --execution fast '
                    f'--out {plan.experiment_dir}/canary/"$SLURM_JOB_ID"']
    assert plan.canary.out_dir("42") == plan.experiment_dir / "canary" / "42"
    plan_text = study.describe(plan, study.decide(plan, {}, set()))
    assert ("stage 0 check: kdexp.check, 1 GPU job on hydra/launcher=mysite, time limit 20 min (--partition=gpu "
            in plan_text) and "-> SUBMIT" in plan_text.split("stage 0")[1].split("\n")[0]
    assert plan.canary.root == plan.experiment_dir / "canary"
    skipped = dataclasses.replace(plan, canary=None)  # as build_plan(..., check=False) for --skip-check
    assert "stage 0 check: none (--skip-check" in study.describe(skipped, study.decide(skipped, {}, set()))


def test_the_canary_runs_when_a_training_driver_is_submitted_and_each_driver_waits_for_it(quickstart):
    decisions = study.decide(quickstart, {}, set())
    assert study.canary_decision(quickstart, decisions).action == "submit"
    teacher, students = driver(quickstart, "teacher-resnet18"), driver(quickstart, "smoke-quickstart")
    assert study._dependency(teacher, [], "7") == "afterok:7"
    assert study._dependency(students, ["8"], "7") == "afterok:8,afterok:7"
    assert study._dependency(driver(quickstart, "analysis"), ["8", "9"], None) == "afterany:8:9"
    for d in quickstart.drivers:
        for job in d.jobs:
            complete(job)
    decisions = study.decide(quickstart, {}, set())
    assert decisions["analysis"].action == "submit"  # a CPU step alone needs no canary
    assert study.canary_decision(quickstart, decisions).why == "no training driver to submit"


def canary_record(canary, job_id: str, **fields) -> None:
    record = {"schema_version": 1, "ok": True, "failed": [], "device": "cuda", "execution": "reference",
              "size": "full", "finished": "2026-01-01T00:00:00Z",
              "environment": {"hostname": "gpu017", "gpu": "NVIDIA A100-SXM4-80GB"},
              "verdicts": [{"name": "reference determinism", "ok": True}] * 5, **fields}
    canary.out_dir(job_id).mkdir(parents=True)
    (canary.out_dir(job_id) / "check.json").write_text(json.dumps(record))


def test_the_canarys_verdict_is_one_line_from_its_record_or_its_log(quickstart):
    # job ids no test cluster reaches: sacct (asked how an unfinished one ended) knows none of them
    canary = quickstart.canary
    canary_record(canary, "990011")
    assert check.verdict(canary, "990011") == check.Verdict(True, "canary job 990011 on gpu017 (NVIDIA A100-SXM4-80GB, "
                                                        "execution reference, size full): passed 5 checks "
                                                        f"({canary.root}/990011/check.json)")
    canary_record(canary, "990012", ok=False, failed=["reference determinism", "fast: bf16"])
    failed = check.verdict(canary, "990012")
    assert not failed.ok and failed.line.endswith("FAILED: reference determinism, fast: bf16 "
                                                  f"(details: {canary.root}/990012/check.log)")
    # died before the check could say anything, e.g. a setup line: the log's last line says why
    canary.log("990013").write_text("bash: line 5: /home/u/venvs/kdexp/bin/activate: No such file or directory\n\n")
    died = check.verdict(canary, "990013")
    assert not died.ok and died.line == ("canary job 990013 ended before kdexp.check finished: bash: line 5: "
                                         "/home/u/venvs/kdexp/bin/activate: No such file or directory "
                                         f"(log: {canary.root}/990013.out)")
    # stopped halfway (a time limit): its record so far is not taken for a verdict
    canary_record(canary, "990014", ok=False, finished=None)
    canary.log("990014").write_text("check: reference: PASS ...\n"
                                "slurmstepd: error: *** JOB 990014 ON gpu017 CANCELLED DUE TO TIME LIMIT ***\n")
    cut = check.verdict(canary, "990014")
    assert not cut.ok and cut.line.startswith("canary job 990014 ended before kdexp.check finished (passed so far: "
                                              "reference determinism, ")
    assert "CANCELLED DUE TO TIME LIMIT" in cut.line


def test_dry_run_cli_prints_the_plan_and_writes_nothing(tmp_path, capsys, cluster_site):
    assert study.main(["--cluster", "slurm_local", "--protocol", "quickstart", "--dry-run", "--skip-check",
                       "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "stage 1/3 teachers" in out and "GPU-h" in out and "-> SUBMIT" in out
    assert "stage 0 check: none (--skip-check: the drivers start without a canary)" in out
    assert not any(tmp_path.iterdir())


def selection_run(root: Path, name: str, method: dict, val: float, status: str = "completed",
                  target: str = "kdexp.methods.logit.LogitKD") -> str:
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    overrides = ["seed=0", *(f"method.{k}={v}" for k, v in method.items()), "pair=r34_to_r18"]
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"seed": 0, "method": {"_target_": target, **method}}),
                   run_dir / ".hydra" / "config.yaml")
    write_result(run_dir, {"status": status, "best_val_acc": val if status == "completed" else None})
    return str(run_dir)


def test_select_keeps_the_best_cell_and_the_first_of_ties(tmp_path, capsys):
    logit = [selection_run(tmp_path, "a", {"alpha": 0.7, "T": 2}, 0.90),
             selection_run(tmp_path, "b", {"alpha": 0.5, "T": 2}, 0.92),
             selection_run(tmp_path, "c", {"alpha": 0.3, "T": 4}, 0.92)]  # ties b; first in (alpha, T) order
    feature = [selection_run(tmp_path, name, {"alpha": alpha}, val, target="kdexp.methods.feature.FeatureKD")
               for name, alpha, val in (("d", 0.3, 0.5), ("e", 0.7, 0.6))]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"r34_to_r18": {"logit": logit, "feature": feature}}))
    out = tmp_path / "selected.json"
    assert select.main(["pick", str(manifest), "--out", str(out)]) == 0
    chosen = json.loads(out.read_text())["selected"]["r34_to_r18"]
    assert chosen["logit"]["overrides"] == ["method.alpha=0.3", "method.T=4"] and chosen["logit"]["candidates"] == 3
    assert chosen["feature"]["overrides"] == ["method.alpha=0.7"]
    capsys.readouterr()
    assert select.main(["cell", str(out), "r34_to_r18", "logit"]) == 0
    assert capsys.readouterr().out == "method.alpha=0.3 method.T=4\n"


def test_select_breaks_ties_in_the_order_of_the_methods_grid(tmp_path):
    """DKD's grid is (β, T), so of two equal cells the one with the smaller β is kept, not the smaller T."""
    dkd = [selection_run(tmp_path, name, {"beta": beta, "T": T}, 0.9, target="kdexp.methods.dkd.DKD")
           for name, beta, T in (("a", 2, 2), ("b", 1, 4))]
    assert select.pick_cell(dkd)["overrides"] == ["method.beta=1", "method.T=4"]


def test_select_refuses_an_incomplete_grid(tmp_path, capsys):
    runs_ = [selection_run(tmp_path, "a", {"alpha": 0.3}, 0.5), selection_run(tmp_path, "b", {"alpha": 0.7}, 0, "failed")]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"r34_to_r18": {"feature": runs_}}))
    assert select.main(["pick", str(manifest), "--out", str(tmp_path / "selected.json")]) == 1
    assert f"{runs_[1]}: failed" in capsys.readouterr().err
    assert not (tmp_path / "selected.json").exists()


@pytest.mark.e2e
def test_the_bench_estimates_the_study_the_planner_submits(v1):
    """kdexp.bench's study-hours estimate counts the runs and epochs of the v1 plan, no more, no less."""
    planned = Counter((j.cfg.model.arch, j.cfg.teacher.arch, validate(task_config(j.cfg)).name, j.cfg.trainer.epochs)
                      for d in v1.drivers for j in d.jobs)
    estimated = Counter()
    for _, case, runs, epochs in bench.STUDY:
        c = bench.CASES[case]
        estimated[(c.student, c.teacher, c.method, epochs)] += runs
    assert estimated == planned
