"""The learning-rate schedule: the `scheduler` config group (cosine | multistep), its schemas, its
checks, and the torch scheduler the loop steps once per epoch (after the epoch, so epoch e, counted
from 1, trains at the lr after e - 1 steps).

cosine is the study's schedule, CosineAnnealingLR(T_max=trainer.epochs, eta_min); multistep is the
CIFAR-100 benchmark's (CRD, mdistiller): lr x gamma after each milestone epoch, i.e. with
milestones [150, 180, 210] epochs 1-150 train at lr, 151-180 at lr x 0.1, and so on, exactly as
RepDistiller's `adjust_learning_rate` (decay once `epoch > milestone`, epochs counted from 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class CosineSchedule:
    name: str = "cosine"
    eta_min: float = 1e-4  # the lr the last epoch decays towards

    def check(self, epochs: int, lr: float) -> None:
        if not 0 <= self.eta_min <= lr:
            raise ValueError(f"scheduler.eta_min={self.eta_min} must be in [0, trainer.lr={lr}]: "
                             "the cosine schedule decays the learning rate from trainer.lr down to it")

    def build(self, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=self.eta_min)


@dataclass
class MultiStepSchedule:
    name: str = "multistep"
    milestones: List[int] = MISSING  # epochs after which lr is multiplied by gamma
    gamma: float = 0.1

    def check(self, epochs: int, lr: float) -> None:
        milestones, gamma = list(self.milestones), self.gamma
        if not milestones or any(a >= b for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"scheduler.milestones={milestones} must be a non-empty, strictly increasing list of "
                             "epochs (lr x gamma after each), e.g. scheduler.milestones=[150,180,210]")
        if milestones[0] < 1 or milestones[-1] >= epochs:
            raise ValueError(f"scheduler.milestones={milestones} must lie in [1, trainer.epochs={epochs}) (a milestone "
                             f"at or after the last epoch never takes effect): e.g. scheduler.milestones=[{max(epochs // 2, 1)}] "
                             f"for {epochs} epochs, or scheduler=cosine")
        if not 0 < gamma <= 1:
            raise ValueError(f"scheduler.gamma={gamma} must be in (0, 1]: the factor lr is multiplied by at each milestone")

    def build(self, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(self.milestones), gamma=self.gamma)


SCHEMAS = {schema.name: schema for schema in (CosineSchedule, MultiStepSchedule)}  # scheduler=<name>


def register(cs: ConfigStore) -> None:
    """The schemas `conf/scheduler/<name>.yaml` start from (`defaults: [base_<name>, _self_]`)."""
    for name, schema in SCHEMAS.items():
        cs.store(group="scheduler", name=f"base_{name}", node=schema)


def check(scheduler_cfg: DictConfig, epochs: int, lr: float) -> None:
    """Raise ValueError (one line: the key, what is wrong, what to do) for a schedule that cannot run."""
    _schedule(scheduler_cfg).check(epochs, lr)


def build_scheduler(optimizer: torch.optim.Optimizer, scheduler_cfg: DictConfig,
                    epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The configured schedule over `epochs`, to be stepped once after every epoch."""
    schedule = _schedule(scheduler_cfg)
    schedule.check(epochs, optimizer.defaults["lr"])
    return schedule.build(optimizer, epochs)


def _schedule(scheduler_cfg: DictConfig) -> CosineSchedule | MultiStepSchedule:
    """The settings as their schema's instance (the class `name` names)."""
    name = scheduler_cfg.name
    if name not in SCHEMAS:
        raise ValueError(f"scheduler.name={name!r} must be one of {sorted(SCHEMAS)} (scheduler=cosine or "
                         "scheduler=multistep)")
    return SCHEMAS[name](**OmegaConf.to_container(scheduler_cfg, resolve=True))
