"""launch.sweep.compose_jobs (the study planner's way to compose a multirun's jobs: one full Hydra
composition per set of config-group choices, each job's values applied on top) gives exactly what a
full composition of each job gives, for every experiment preset's own sweep: the same keys and
values, the same Hydra node (overrides, override_dirname), so the same run dir."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import CONF
from launch.sweep import compose_job, compose_jobs, expand, hydra_session, run_dir

PRESETS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


@pytest.mark.e2e  # composes every preset's whole multirun
@pytest.mark.parametrize("preset", PRESETS)
def test_each_job_equals_its_full_composition(preset, tmp_path):
    with hydra_session():
        jobs = expand([f"experiment={preset}", "data=fake", f"paths.output_dir={tmp_path}"])
        fast = compose_jobs(jobs)
        for i in range(0, len(jobs), max(1, len(jobs) // 12)):  # a dozen jobs of a big grid, every job of a small one
            full = compose_job(jobs[i])
            assert OmegaConf.to_container(fast[i], resolve=False) == OmegaConf.to_container(full, resolve=False), jobs[i]
            assert run_dir(fast[i]) == run_dir(full)


def test_jobs_that_choose_another_config_group_are_composed_on_their_own(tmp_path):
    """`model=` is a config group: resnet34's jobs are not resnet18's config with a value changed."""
    with hydra_session():
        jobs = expand(["experiment=baseline", "model=resnet18,resnet34", "seed=0,1", f"paths.output_dir={tmp_path}"])
        configs = compose_jobs(jobs)
    expected = [(o["model"], int(o["seed"])) for o in (dict(x.split("=", 1) for x in job) for job in jobs)]
    assert [(c.model.arch, c.seed) for c in configs] == expected
    assert len({run_dir(c) for c in configs}) == 4
