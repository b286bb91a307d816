"""The lr schedules (kdexp/schedules.py): the benchmark's multistep decays where its reference code
does, cosine is exactly the study's CosineAnnealingLR, the YAMLs compose against the schemas, and a
schedule that cannot run is one line naming the key."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from helpers import CONF
from kdexp import schedules

CRD = OmegaConf.create({"name": "multistep", "milestones": [150, 180, 210], "gamma": 0.1})


def _optimizer(lr: float) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)


def lr_per_epoch(scheduler_cfg, lr: float, epochs: int) -> dict[int, float]:
    """The lr each epoch (counted from 1) trains at, stepping as kdexp's loop does: once after every epoch."""
    optimizer = _optimizer(lr)
    scheduler = schedules.build_scheduler(optimizer, scheduler_cfg, epochs)
    seen = {}
    for epoch in range(1, epochs + 1):
        seen[epoch] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return seen


def repdistiller_lr(epoch: int, lr: float, milestones: list[int], rate: float) -> float:
    """HobbitLong/RepDistiller helper/util.py adjust_learning_rate, called before each epoch (from 1)."""
    steps = sum(epoch > m for m in milestones)
    return lr * rate ** steps


def test_multistep_is_the_crd_recipe_at_its_boundaries():
    seen = lr_per_epoch(CRD, 0.05, 240)
    # Epoch 150 is the last at 0.05; the decays take effect from epochs 151, 181 and 211.
    expected = {1: 0.05, 149: 0.05, 150: 0.05, 151: 0.005, 180: 0.005, 181: 5e-4, 210: 5e-4, 211: 5e-5, 240: 5e-5}
    assert {e: seen[e] for e in expected} == pytest.approx(expected, rel=1e-12)


def test_multistep_matches_repdistillers_schedule_at_every_epoch():
    seen = lr_per_epoch(CRD, 0.05, 240)
    assert [seen[e] for e in range(1, 241)] == pytest.approx(
        [repdistiller_lr(e, 0.05, [150, 180, 210], 0.1) for e in range(1, 241)], rel=1e-12)


def test_multistep_resumes_exactly_from_its_state_dict():
    optimizer = _optimizer(0.05)
    scheduler = schedules.build_scheduler(optimizer, CRD, 240)
    for _ in range(160):
        optimizer.step()
        scheduler.step()
    resumed_opt = _optimizer(0.05)
    resumed = schedules.build_scheduler(resumed_opt, CRD, 240)
    resumed_opt.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    for _ in range(60):
        for opt, sched in ((optimizer, scheduler), (resumed_opt, resumed)):
            opt.step()
            sched.step()
        assert resumed_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_cosine_is_todays_cosine_annealing_exactly():
    """The study's runs are unchanged: the same floats as CosineAnnealingLR(T_max=epochs, eta_min=1e-4)."""
    optimizer = _optimizer(0.1)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100, eta_min=1e-4)
    expected = {}
    for epoch in range(1, 101):
        expected[epoch] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        reference.step()
    assert lr_per_epoch(OmegaConf.create({"name": "cosine", "eta_min": 1e-4}), 0.1, 100) == expected


@pytest.fixture(scope="module")
def scheduler_group():
    """compose() of the scheduler group alone: conf/scheduler/*.yaml against the registered schemas."""
    schedules.register(ConfigStore.instance())
    root = OmegaConf.create({"defaults": [{"scheduler": "cosine"}, "_self_"]})

    def compose_scheduler(*overrides: str):
        ConfigStore.instance().store(name="scheduler_only", node=root)
        with initialize_config_dir(config_dir=CONF, version_base=None):
            return compose("scheduler_only", overrides=list(overrides)).scheduler
    return compose_scheduler


def test_the_yamls_compose_to_their_schedules(scheduler_group):
    cosine = scheduler_group()
    assert (cosine.name, cosine.eta_min) == ("cosine", 1e-4)
    multistep = scheduler_group("scheduler=multistep")
    assert (multistep.name, list(multistep.milestones), multistep.gamma) == ("multistep", [150, 180, 210], 0.1)


@pytest.mark.parametrize("override", ["scheduler.gamma=abc", "scheduler.milestones=[a]", "scheduler.eta_min=x"])
def test_wrong_types_fail_at_compose_naming_the_key(scheduler_group, override):
    with pytest.raises(Exception) as err:
        scheduler_group("scheduler=multistep" if "eta_min" not in override else "scheduler=cosine", override)
    chain = [err.value, err.value.__cause__]
    assert any(isinstance(e, ValidationError) for e in chain), chain
    assert override.split("=")[0].removeprefix("scheduler.") in str(err.value)


@pytest.mark.parametrize("cfg, epochs, message", [
    ({"name": "multistep", "milestones": [180, 150], "gamma": 0.1}, 240,
     "scheduler.milestones=[180, 150] must be a non-empty, strictly increasing list of epochs"),
    ({"name": "multistep", "milestones": [150, 150], "gamma": 0.1}, 240, "strictly increasing"),
    ({"name": "multistep", "milestones": [], "gamma": 0.1}, 10, "scheduler.milestones=[] must be a non-empty"),
    ({"name": "multistep", "milestones": [150, 180, 210], "gamma": 0.1}, 3,
     "scheduler.milestones=[150, 180, 210] must lie in [1, trainer.epochs=3) (a milestone at or after the last "
     "epoch never takes effect): e.g. scheduler.milestones=[1] for 3 epochs, or scheduler=cosine"),
    ({"name": "multistep", "milestones": [0, 5], "gamma": 0.1}, 10, "must lie in [1, trainer.epochs=10)"),
    ({"name": "multistep", "milestones": [150, 180, 240], "gamma": 0.1}, 240, "must lie in [1, trainer.epochs=240)"),
    ({"name": "multistep", "milestones": [5], "gamma": 0.0}, 10, "scheduler.gamma=0.0 must be in (0, 1]"),
    ({"name": "multistep", "milestones": [5], "gamma": 1.5}, 10, "scheduler.gamma=1.5 must be in (0, 1]"),
    ({"name": "cosine", "eta_min": 0.2}, 10, "scheduler.eta_min=0.2 must be in [0, trainer.lr=0.1]"),
    ({"name": "cosine", "eta_min": -1e-4}, 10, "scheduler.eta_min=-0.0001 must be in [0, trainer.lr=0.1]"),
    ({"name": "step", "eta_min": 0.0}, 10, "scheduler.name='step' must be one of ['cosine', 'multistep']"),
])
def test_a_schedule_that_cannot_run_is_one_line_naming_the_key(cfg, epochs, message):
    with pytest.raises(ValueError) as err:
        schedules.build_scheduler(_optimizer(0.1), OmegaConf.create(cfg), epochs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_gamma_one_and_a_single_milestone_are_valid():
    seen = lr_per_epoch(OmegaConf.create({"name": "multistep", "milestones": [2], "gamma": 1.0}), 0.1, 3)
    assert seen == {1: 0.1, 2: 0.1, 3: 0.1}
