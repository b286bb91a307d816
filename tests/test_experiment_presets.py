"""Every experiment preset (conf/experiment/*.yaml, one added later included: the list is read from
the folder) expands its own sweep, and its jobs compose, validate and dry-run as kdexp.train's task
runs them: none rejected, each one listed with its run dir inside the outputs.

In process, the first and the last job of each preset's sweep (the sweep's two ends), not a
subprocess over `experiment=glob(*)`: a glob over the group composes each preset without its own
sweep (Hydra expands a sweeper's params from the multirun's config, which no preset is part of), so
the grid presets would be rejected for want of their `pair`; and every preset's full sweep is about
300 jobs, minutes of dry run (tests/test_config.py dry-runs paper_v1's 81 through the entry point)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from helpers import REPO, compose_cfg
from kdexp import job
from kdexp.methods.logit import LogitKD
from launch.sweep import compose_job, expand, hydra_session, run_dir, task_config

PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def test_the_presets_are_found():
    assert {"baseline", "teacher", "quickstart", "paper_v1", "paper_v2"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_expands_and_its_jobs_dry_run(preset, tmp_path, fake_root):
    common = ["dry_run=true", "data=fake", f"data.root={fake_root}", f"paths.output_dir={tmp_path}"]
    with hydra_session():
        jobs = expand([f"experiment={preset}", *common])
        assert jobs, preset
        for overrides in {tuple(jobs[0]): None, tuple(jobs[-1]): None}:
            cfg = compose_job(overrides)
            where = run_dir(cfg)
            outcome = job.run(task_config(cfg), where)
            # a missing teacher (none is trained here) is a dry run's finding, not a rejection
            assert outcome.status == "dry_run", (preset, overrides, outcome.reason)
            assert where.is_relative_to(tmp_path) and not where.exists()  # listed, nothing written


def test_logit_standardization_runs_method_logit_std_at_the_config_its_runs_were_made_with():
    """experiment=logit_standardization now picks method=logit_std (the LS authors' defaults in one
    home); its method config, and so its run tag and label, are those of its earlier runs."""
    cfg = compose_cfg("experiment=logit_standardization", "pair=r34_to_r18")
    assert OmegaConf.to_container(cfg.method) == {"_target_": "kdexp.methods.logit.LogitKD", "alpha": None, "T": 2.0,
                                                  "standardize": True, "kd_weight": 9.0, "ce_weight": 0.1}
    assert LogitKD.run_tag(cfg.method) == "logit_anull_T2_standardize-true_kd_weight-9_ce_weight-0.1"
    assert LogitKD.label(cfg.method) == "logit(std)"
