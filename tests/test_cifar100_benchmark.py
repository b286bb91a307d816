"""experiment=cifar100_kd: the benchmark's pairs x {CE baseline, KD, DKD} x seeds, each method as
the literature ran it, every job valid and in its own directory."""
import itertools

import pytest

from kdexp.config import validate
from launch.sweep import compose_jobs, expand, hydra_session, run_dir, task_config

pytestmark = pytest.mark.e2e  # composes every job of the 72-job multirun (a dry run of it, in process)

PAIRS = {"r56_to_r20": ("resnet56", "resnet20"), "r110_to_r32": ("resnet110", "resnet32"),
         "r32x4_to_r8x4": ("resnet32x4", "resnet8x4"), "wrn40_2_to_wrn16_2": ("wrn_40_2", "wrn_16_2"),
         "wrn40_2_to_wrn40_1": ("wrn_40_2", "wrn_40_1"), "vgg13_to_vgg8": ("vgg13", "vgg8"),
         "vgg13_to_mobilenetv2": ("vgg13", "mobilenetv2"), "r32x4_to_shufflenetv2": ("resnet32x4", "shufflenetv2")}
DKD_BETA = {"r56_to_r20": 2.0, "r110_to_r32": 2.0, "r32x4_to_r8x4": 8.0, "wrn40_2_to_wrn16_2": 6.0,
            "wrn40_2_to_wrn40_1": 6.0, "vgg13_to_vgg8": 6.0, "vgg13_to_mobilenetv2": 6.0,
            "r32x4_to_shufflenetv2": 8.0}  # mdistiller configs/cifar100/dkd/*.yaml


@pytest.fixture(scope="module")
def jobs():
    with hydra_session():
        configs = compose_jobs(expand(["experiment=cifar100_kd"]))
    return [(task_config(cfg), run_dir(cfg)) for cfg in configs]


def test_the_multirun_is_pairs_x_methods_x_seeds_in_distinct_dirs(jobs):
    assert len({d for _, d in jobs}) == len(jobs) == 72
    got = sorted((j.model.arch, j.teacher.arch or "-", j.method._target_.rsplit(".", 1)[1], j.seed) for j, _ in jobs)
    expected = sorted((s, t if m != "CrossEntropy" else "-", m, seed) for (t, s), m, seed in
                      itertools.product(PAIRS.values(), ["CrossEntropy", "LogitKD", "DKD"], [0, 1, 2]))
    assert got == expected


def test_every_job_runs_the_benchmark_recipe_and_the_published_method_settings(jobs):
    beta = {PAIRS[p][1]: b for p, b in DKD_BETA.items()}
    for j, _ in jobs:
        if j.seed == 0:  # seeds change nothing validate checks; 24 validations instead of 72
            validate(j)
        assert (j.data.name, j.trainer.epochs, j.trainer.batch_size, j.trainer.clip_norm) == ("cifar100", 240, 64, None)
        assert (j.scheduler.name, list(j.scheduler.milestones), j.scheduler.gamma) == ("multistep", [150, 180, 210], 0.1)
        assert j.trainer.lr == (0.01 if j.model.arch in ("mobilenetv2", "shufflenetv2") else 0.05)
        if j.method._target_.endswith("LogitKD"):
            assert (j.method.alpha, j.method.T) == (0.9, 4.0)
        if j.method._target_.endswith("DKD"):
            assert (j.method.alpha, j.method.beta, j.method.T, j.method.warmup) == (1.0, beta[j.model.arch], 4.0, 20)
