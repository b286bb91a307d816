"""The config tree: the 81-job grid expands exactly, runs never share a directory, and every bad
input gives one specific message and a non-zero exit."""
import dataclasses
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf, open_dict

from helpers import CONF, REPO, compose_cfg, run_process, run_train
from job_record import job_args, recorded
from kdexp import config as kdexp_config
from kdexp.config import ConfigError, register_configs, validate
from kdexp.dry_run import DryRunStaysLocal
from kdexp.execution import RESULT_NEUTRAL_KEYS
from kdexp.models import ARCHS, TORCHVISION_RESNETS
from kdexp.preflight import config_problem
from kdexp.train import CONFIG_DIR

PAIRS = {"r34_to_r18": ("resnet34", "resnet18"), "r50_to_r18": ("resnet50", "resnet18"),
         "r50_to_r34": ("resnet50", "resnet34")}


def _job_configs(out: Path) -> dict[Path, dict]:
    """{run dir: resolved config} of every job that dry_run(out, ...) ran."""
    return recorded(_records(out))


def _records(out: Path) -> Path:
    return out.with_name(f"{out.name}.jobs")  # beside `out`: a dry run leaves nothing in it


def dry_run(out: Path, fake_root: Path, *overrides: str) -> subprocess.CompletedProcess:
    """A dry-run multirun with data present (fake files in CIFAR-10's format), into `out`, where
    no teacher exists: a student grid's dry run reports them missing (exit 2), a teacher's is clean.
    Its jobs are recorded (_job_configs), as they write nothing into their run dirs."""
    record, env = job_args(_records(out))
    return run_train("-m", *overrides, "dry_run=true", f"paths.output_dir={out}", f"data.root={fake_root}",
                     "data.verify_md5=false", *record, env=env)


@pytest.fixture(scope="module")
def paper_v1_logit(tmp_path_factory, fake_root):
    out = tmp_path_factory.mktemp("dry")
    proc = dry_run(out, fake_root, "experiment=paper_v1")
    assert proc.returncode == 2 and "dry run: 81 jobs would fail" in proc.stdout, proc.stderr[-3000:]
    return out, proc


@pytest.mark.e2e
def test_the_single_multirun_command_expands_81_logit_jobs(paper_v1_logit):
    out, proc = paper_v1_logit
    configs = _job_configs(out)
    assert len(configs) == 81  # 81 distinct run dirs, one config each
    tuples = sorted((c["teacher"]["arch"], c["model"]["arch"], c["method"]["alpha"], c["method"]["T"], c["seed"])
                    for c in configs.values())
    expected = sorted((t, s, a, T, seed) for (t, s), a, T, seed in
                      itertools.product(PAIRS.values(), [0.3, 0.5, 0.7], [2, 3, 4], [0, 1, 2]))
    assert tuples == expected
    assert all(c["data"]["val_size"] == 0 and c["trainer"]["epochs"] == 100 for c in configs.values())
    assert "multirun summary: 81 dry_run" in proc.stdout + proc.stderr
    # no run dir, no .hydra/, no train.log, no multirun.yaml (kdexp/sweep_record.py): analysis finds nothing of it
    assert not list(out.rglob("*"))
    assert not any(d.exists() for d in configs)


@pytest.mark.e2e
def test_dry_run_reports_the_missing_teacher_with_its_path(paper_v1_logit):
    out, proc = paper_v1_logit
    assert "resnet50_cifar_w64_seed0.pt: MISSING" in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_feature_grid_does_not_multiply_by_temperature(tmp_path, fake_root):
    proc = dry_run(tmp_path, fake_root, "experiment=paper_v1", "kd_grid=feature")
    assert proc.returncode == 2 and "dry run: 27 jobs would fail" in proc.stdout, proc.stderr[-3000:]
    configs = _job_configs(tmp_path).values()
    assert len(configs) == 27
    assert {c["method"]["_target_"] for c in configs} == {"kdexp.methods.feature.FeatureKD"}
    assert all("T" not in c["method"] and c["method"]["beta"] == 0.5 for c in configs)


@pytest.mark.e2e
def test_baselines_and_teachers_get_their_own_dirs(tmp_path, fake_root):
    proc = dry_run(tmp_path, fake_root, "experiment=baseline", "protocol=v1", "model=resnet18,resnet34", "seeds=paper")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = dry_run(tmp_path, fake_root, "experiment=teacher", "protocol=v1", "model=resnet34,resnet50")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = {str(d.relative_to(tmp_path)) for d in _job_configs(tmp_path)}
    assert dirs == {f"paper_v1/baseline/resnet{a}/seed{s}" for a in (18, 34) for s in (0, 1, 2)} | \
        {"paper_v1/teacher/resnet34/seed0", "paper_v1/teacher/resnet50/seed0"}


@pytest.mark.e2e
def test_other_overrides_become_part_of_the_run_dir(tmp_path, fake_root):
    """execution=fast changes the numerics: its runs never share a dir with the reference's; an exact
    setting (execution.fused) does not name a dir."""
    proc = dry_run(tmp_path, fake_root, "pair=r34_to_r18", "method=logit", "trainer.epochs=3,5", "paths.data_dir=/x",
                   "execution=reference,fast", "execution.fused=true")
    assert proc.returncode == 2 and "dry run: 4 jobs would fail" in proc.stdout, proc.stderr[-3000:]
    dirs = sorted(str(d.relative_to(tmp_path)) for d in _job_configs(tmp_path))
    assert dirs == [f"paper_v2/resnet34-to-resnet18/logit_a0.5_T4/seed0/execution={e},trainer.epochs={n}"
                    for e in ("fast", "reference") for n in (3, 5)]


@pytest.mark.e2e
def test_every_method_argument_names_the_run_dir_through_the_methods_run_tag(tmp_path, fake_root):
    """No `method.*` override is spelt out after the seed: the run tag names each non-default argument,
    whichever the method (exclude_keys lists them from the run's method node), in a multirun and a run."""
    proc = dry_run(tmp_path, fake_root, "pair=r34_to_r18", "method=feature", "method.clip_projection=false",
                   "method.normalize_by_teacher_std=true,false", "trainer.epochs=3")
    assert proc.returncode == 2 and "dry run: 2 jobs would fail" in proc.stdout, proc.stderr[-3000:]
    record, env = job_args(_records(tmp_path))
    proc = run_train("pair=r34_to_r18", "method=logit", "method.T=2", "method.alpha=0.5", "dry_run=true",
                     f"paths.output_dir={tmp_path}", f"data.root={fake_root}", "data.verify_md5=false", *record,
                     env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    dirs = sorted(str(d.relative_to(tmp_path)) for d in _job_configs(tmp_path))
    assert dirs == ["paper_v2/resnet34-to-resnet18/feature_a0.5_b0.5_clip_projection-false/seed0/trainer.epochs=3",
                    "paper_v2/resnet34-to-resnet18/feature_a0.5_b0.5_clip_projection-false_normalize_by_teacher_std-true"
                    "/seed0/trainer.epochs=3",
                    "paper_v2/resnet34-to-resnet18/logit_a0.5_T2/seed0"]


def _run_dir(*overrides: str) -> Path:
    """Where Hydra would make this run's dir (hydra.run.dir), normalised as the kernel reads it."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/out", *overrides], return_hydra_config=True)
    return Path(os.path.normpath(cfg.hydra.run.dir))


def test_the_keys_that_change_no_result_name_no_dir_and_each_exists():
    """kdexp.execution.RESULT_NEUTRAL_KEYS is the one list: each key (and every key under it) stays out
    of the run dir's name, and names a key of the config (a renamed key would silently drop out)."""
    cfg = compose_cfg()
    for key in RESULT_NEUTRAL_KEYS:
        assert OmegaConf.select(cfg, key, default="absent") != "absent", key
    neutral = ["paths.data_dir=/d", "data.download=true", "trainer.progress=false", "execution.fused=true",
               "export_teacher=false", "logger=tensorboard", "logger.tensorboard.dir=tb"]
    assert _run_dir("experiment=baseline", *neutral) == _run_dir("experiment=baseline")
    assert _run_dir("experiment=baseline", "execution=fast").name == "execution=fast"  # numerics: named


@pytest.mark.parametrize("override", ["teacher.ckpt=../../../../../../../../x", "teacher.ckpt=/data/r34.pt",
                                      "model.arch=../../x", "teacher.ckpt='a b/$HOME/.hydra'"])
def test_no_value_puts_a_run_dir_outside_its_experiment_or_in_nested_dirs(override):
    """Hydra makes the run dir before kdexp validates a value: every part of the label is one folder."""
    run_dir = _run_dir("experiment=baseline", override)
    assert run_dir.parent.parent.parent.parent == Path("/out/paper_v2")  # role/arch/seed/overrides: 4 folders
    assert not any(part.startswith(".") for part in run_dir.parts)


def test_a_replaced_value_keeps_a_readable_dir_name_of_its_own():
    names = [_run_dir("experiment=baseline", f"teacher.ckpt={v}").name for v in ("/a/b.pt", "/a_b.pt", "_a_b.pt")]
    assert names[0].startswith("teacher.ckpt=_a_b.pt~") and names[2] == "teacher.ckpt=_a_b.pt"
    assert len(set(names)) == 3
    long = _run_dir("experiment=baseline", f"trainer.lr={'1' * 300}").name  # a folder name has 255 bytes at most
    assert len(long) < 255 and long.startswith("trainer.lr=111")


def test_a_method_run_tag_is_one_folder_too(monkeypatch):
    monkeypatch.setattr(kdexp_config, "method_tag", lambda method: "mine_note-../../x")  # a site method's str argument
    run_dir = _run_dir("pair=r34_to_r18", "method=logit")
    assert run_dir.parent.parent == Path("/out/paper_v2/resnet34-to-resnet18") and run_dir.name == "seed0"
    assert run_dir.parent.name.startswith("mine_note-_x~")


@pytest.mark.e2e
def test_a_dry_run_writes_nothing_and_no_dir_outside_the_outputs(tmp_path, fake_root):
    """A value that climbs out of the tree (`teacher.ckpt=../../...`) made its run dir, .hydra/ and
    train.log outside paths.output_dir; a dry run leaves no run dir, .hydra/ or train.log at all."""
    out = tmp_path / "out"
    proc = run_train("experiment=baseline", "dry_run=true", f"teacher.ckpt={'../' * 7}x", f"paths.output_dir={out}",
                     f"data.root={fake_root}", "data.verify_md5=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"into {out}/paper_v2/baseline/resnet18/seed0/teacher.ckpt=_x~" in proc.stdout  # the report still says
    assert list(tmp_path.rglob("*")) == [out]


def test_recipe_defaults_are_the_study():
    cfg = compose_cfg("pair=r50_to_r18", "method=feature")
    t, o = cfg.trainer, cfg.optimizer
    assert (t.epochs, t.batch_size, t.lr, o.name, o.momentum, o.nesterov, o.weight_decay, cfg.scheduler.eta_min, t.clip_norm) == \
        (100, 128, 0.1, "sgd", 0.9, True, 5e-4, 1e-4, 1.0)
    assert (t.label_smoothing, t.early_stopping, cfg.data.num_classes, cfg.data.image_size, cfg.model.init) == \
        (0.0, None, 10, 32, None)
    assert (cfg.model.arch, cfg.teacher.arch, cfg.model.stem, cfg.teacher.stem) == ("resnet18", "resnet50", "cifar", "cifar")
    assert cfg.method.clip_projection is True and cfg.method.beta == 0.5
    assert (cfg.data.val_size, cfg.data.split_seed) == (5000, 1234)
    assert compose_cfg("experiment=teacher", "model=resnet50").trainer.epochs == 200


@pytest.mark.parametrize("overrides, message", [
    (["pair=r34_to_r18", "method=logit", "method.alpha=1.5"], "method.alpha=1.5 is outside [0, 1]"),
    (["pair=r34_to_r18", "method=logit", "method.T=0"], "method.T=0 must be > 0"),
    (["pair=r34_to_r18", "method=feature", "method.beta=-1"], "method.beta=-1 must be >= 0"),
    (["trainer.epochs=0"], "trainer.epochs=0 must be > 0"),
    (["method=logit"], "teacher.arch is null"),
    (["teacher=resnet34"], "method=ce trains without a teacher"),
    (["pair=r34_to_r18", "method=feature", "teacher.stem=imagenet"],
     "resnet34 (imagenet stem) has stage strides [4, 8, 16, 32], resnet18 (cifar stem) [1, 2, 4, 8]"),
    (["model=shufflenetv2", "teacher=resnet32x4", "method=feature"], "the same stages at the same resolutions"),
    # a method's own refusal in `bind`, found at validation (the dry run) rather than at the job's start
    (["protocol=crd", "model=resnet8x4", "teacher=mobilenetv2", "method=reviewkd"],
     "method=reviewkd cannot distil from a mobilenetv2 teacher"),
    (["model=resnet8x4", "model.stem=imagenet"], "model: stem='imagenet' is not available for resnet8x4"),
    (["model=mobilenetv2", "model.width=1"], "model: width=1 is too small for mobilenetv2"),
    (["model.stem=fancy"], "model.stem='fancy'"),
    (["experiment_name=../x"], "experiment_name='../x' must be one folder name"),  # e.g. a study's plan
])
def test_bad_values_give_one_specific_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(*overrides))
    assert message in str(err.value)


@pytest.mark.e2e
def test_bad_input_exits_non_zero_without_a_result(tmp_path):
    proc = run_train("pair=r34_to_r18", "method=logit", "method.alpha=2", f"paths.output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "kdexp: invalid config: method.alpha=2 is outside [0, 1]" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("result.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device, message", [("cuda", "no CUDA device is visible"),
                                             ("auto", "execution.compile=true needs a CUDA device")])
@pytest.mark.e2e
def test_settings_this_machine_cannot_run_exit_without_a_result(tmp_path, device, message):
    proc = run_train("experiment=baseline", f"trainer.device={device}", "execution.compile=true",
                     f"paths.output_dir={tmp_path}")
    assert proc.returncode == 2 and "kdexp: invalid config:" in proc.stderr and message in proc.stderr
    assert not list(tmp_path.rglob("result.json"))


@pytest.mark.e2e
def test_an_unknown_group_option_is_one_line_with_the_nearest_option_and_writes_nothing(tmp_path):
    proc = run_train("-m", "method=logit,dkdd", f"paths.output_dir={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    options = ", ".join(sorted(p.stem for p in (Path(CONF) / "method").glob("*.yaml")))  # not method/data/
    assert proc.stderr.startswith("kdexp: invalid config: method=dkdd: method has no option 'dkdd' "
                                  f"(did you mean dkd?); its options: {options}\n")
    assert "crd, ctkd" in options
    assert not list(tmp_path.iterdir())


@pytest.mark.e2e
def test_the_installed_command_checks_its_config_too(tmp_path):
    """`kdexp-train` (pyproject's script) is the same entry point as `python -m kdexp.train`."""
    script = Path(sys.executable).with_name("kdexp-train")
    proc = run_process([str(script), "model=resnet19", f"paths.output_dir={tmp_path}"], cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("kdexp: invalid config: model=resnet19: "), proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["trainer.epochs=many"], "Error merging override trainer.epochs=many Value 'many' of type 'str' could not be "
                              "converted to Integer"),
    (["-m", "seed=0,1", "trainer.epochs=3,many"], "Error merging override trainer.epochs=many"),
    (["trainer.amp=bf16"], "Could not override 'trainer.amp'. Key 'amp' not in 'TrainerConfig' (trainer.amp is now "
                           "execution.amp"),  # the key's old home names its new one
    (["trainer.epochz=5"], "Could not override 'trainer.epochz'. Key 'epochz' not in 'TrainerConfig' "
                           "(did you mean trainer.epochs?)"),
    (["-m", "seed=range(2)", "kd_grid=logit,dkdd"], "kd_grid=dkdd: kd_grid has no option 'dkdd' (did you mean dkd?)"),
    (["trainer.lr=("], "Error parsing override 'trainer.lr=('"),
    (["method=dkd", "method.bta=2"], "Could not override 'method.bta'. Key 'bta' not in 'DKDConfig' "
                                     "(did you mean method.beta?)"),  # the chosen method's own keys
    (["seeed=1", "model.widht=2"], "Could not override 'seeed'. Key 'seeed' not in 'TrainConfig' "
                                   "(did you mean seed?)"),  # the first of two errors, with its nearest key
])
def test_a_config_that_cannot_compose_is_named_before_hydra_runs(argv, message):
    assert config_problem(argv, CONFIG_DIR, "train").startswith(message)


@pytest.mark.parametrize("argv, message", [
    (["experiment_name=../../elsewhere"], "experiment_name='../../elsewhere' must be one folder name (letters, digits, "
                                          "'.', '_', '-'; starting with a letter or digit; at most 100 characters)"),
    (["-m", "experiment_name=mine,a/b"], "experiment_name='a/b' must be one folder name"),  # every value
    (["-m", "dry_run=true,false"], "dry_run=true,false: dry_run cannot be swept: a multirun is a dry run or a real "
                                   "one, and the launcher is chosen for all of its jobs at once"),
    (["-m", "seed=0,1", "dry_run=choice(true,false)"], "dry_run=choice(true,false): dry_run cannot be swept"),
])
def test_what_hydra_acts_on_before_kdexp_runs_is_refused_before_it_runs(argv, message):
    """Hydra makes the run dir under experiment_name, and picks one launcher for the whole multirun
    (a swept dry_run submitted every job, the dry ones too), before any kdexp code runs."""
    assert config_problem(argv, CONFIG_DIR, "train").startswith(message)


def test_dry_run_set_by_the_sweeper_is_refused(tmp_path, monkeypatch):
    """A sweep in a config file (as kd_grid's) sets a job's dry_run, never the multirun's."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "dry_grid.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      dry_run: true,false\n")
    monkeypatch.setenv("KDEXP_SITE_DIR", str(tmp_path))
    assert config_problem(["-m", "experiment=dry_grid"], CONFIG_DIR, "train").startswith(
        "hydra.sweeper.params.dry_run=true,false: dry_run cannot be swept")


def test_a_multirun_that_sweeps_dry_run_is_refused_by_its_callback_too(capsys):
    """Without preflight (kdexp.task.main called directly): the multirun's own config has dry_run
    at its default, so the callback reads the sweep from the command line's overrides."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=local"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = ["seed=0,1", "dry_run=true,false"]
    with pytest.raises(SystemExit) as exit_:
        DryRunStaysLocal().on_multirun_start(cfg)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("kdexp: invalid config: dry_run=true,false: dry_run cannot be swept")


def test_every_sweep_value_and_site_option_composes_before_the_run(monkeypatch):
    assert config_problem(["-m", "experiment=paper_v1", "seed=0,1", "method.T=2,4"], CONFIG_DIR, "train") is None
    assert config_problem(["-m", "experiment_name=my_study.v2-1", "dry_run=true"], CONFIG_DIR, "train") is None
    monkeypatch.setenv("KDEXP_SITE_DIR", str(REPO / "tests" / "cluster"))
    assert config_problem(["hydra/launcher=slurm_local"], CONFIG_DIR, "train") is None
    assert "(did you mean slurm_local?)" in config_problem(["hydra/launcher=slurm_locl"], CONFIG_DIR, "train")
    assert config_problem(["--help"], CONFIG_DIR, "train") is None


def test_config_keys_users_rely_on_exist():
    cfg = compose_cfg("pair=r50_to_r34", "method=feature")
    for key in ["model.arch", "teacher.arch", "model.width", "model.stem", "method.alpha", "method.beta",
                "method.clip_projection", "teacher.ckpt", "trainer.epochs", "trainer.device",
                "trainer.deterministic", "data.root", "data.val_size", "seed"]:
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key
    assert compose_cfg("pair=r50_to_r34", "method=logit").method.T == 4.0


@pytest.mark.parametrize("override", ["experiment=paper_v11", "pair=r34_to_r81", "kd_grid=dkdd"])
def test_a_misspelt_preset_is_refused_not_skipped(override):
    """`optional` in the defaults list would compose a misspelt preset as no preset at all: the
    default config trained under a name the user never meant."""
    from hydra.errors import MissingConfigException
    with pytest.raises(MissingConfigException, match=override.split("=")[1]):
        compose_cfg(override)


def test_every_architecture_is_a_model_and_a_teacher_option_made_from_the_registry():
    """model=<arch> and teacher=<arch> come from kdexp.models.ARCHS (no YAML restates a width): the
    published network's width; a torchvision ResNet teacher takes the student's stem."""
    for arch, spec in ARCHS.items():
        stem = ["model.stem=imagenet"] if arch in TORCHVISION_RESNETS else []
        cfg = compose_cfg(f"model={arch}", f"teacher={arch}", *stem)
        assert (cfg.model.arch, cfg.model.width, cfg.teacher.arch, cfg.teacher.width) == \
            (arch, spec.reference_width, arch, spec.reference_width)
        assert cfg.model.num_classes == cfg.data.num_classes
        assert cfg.teacher.stem == ("imagenet" if arch in TORCHVISION_RESNETS else "cifar")


def test_a_new_registry_entry_is_an_option_with_no_yaml(monkeypatch):
    monkeypatch.setitem(ARCHS, "toy_net", dataclasses.replace(ARCHS["resnet20"], reference_width=8))
    store = ConfigStore.instance()
    try:
        register_configs()
        cfg = compose_cfg("model=toy_net", "teacher=toy_net")
        assert (cfg.model.arch, cfg.model.width, cfg.teacher.width) == ("toy_net", 8, 8)
    finally:
        for group in ("model", "teacher"):
            store.repo[group].pop("toy_net.yaml", None)


@pytest.mark.parametrize("overrides, cpus", [
    (["hydra/launcher=slurm_a100"], 4),                                   # CIFAR in memory, no loader workers
    (["hydra/launcher=slurm_a100", "experiment=imagenet_kd"], 12),        # 11 JPEG workers + the GPU's process
    (["hydra/launcher=slurm_a100", "data.num_workers=7"], 8),
    (["hydra/launcher=slurm_a100_x8", "experiment=imagenet_kd"], 12),     # per rank
    (["hydra/launcher=slurm_a100", "experiment=imagenet_kd", "hydra.launcher.cpus_per_task=16"], 16),
])
def test_a_slurm_job_asks_for_a_cpu_per_loader_worker_and_one_for_the_gpu(overrides, cpus):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher.cpus_per_task == cpus


@pytest.mark.parametrize("method", ["feature", "crd", "reviewkd"])
def test_validation_binds_a_probe_without_drawing_random_numbers(method):
    """Validation binds a second instance of the method to meta-device layouts (its refusals come at
    the dry run): no memory, and no draw from the global RNG, which seeds the student's weights."""
    cfg = compose_cfg("protocol=crd", "pair=r32x4_to_r8x4", f"method={method}")
    torch.manual_seed(0)
    before = torch.get_rng_state()
    validate(cfg)
    assert torch.equal(torch.get_rng_state(), before)
