"""The optimiser: the `optimizer` config group (sgd | adam | adamw). Each option is one schema
class here (its settings, their checks, the torch optimiser it builds) and one YAML in
conf/optimizer/, as a method is one class and one YAML; config validation and the loop ask the
class, never the name."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


@dataclass
class SGDConfig:
    """The study's optimiser: SGD with Nesterov momentum."""
    torch_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.SGD
    name: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4

    def check(self) -> None:
        _require(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        _require(0 <= self.momentum < 1, f"optimizer.momentum={self.momentum} must be in [0, 1)")
        _require(self.momentum > 0 or not self.nesterov,
                 "optimizer.nesterov=true needs optimizer.momentum > 0: use optimizer.nesterov=false for plain SGD")

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "name"}


@dataclass
class AdamConfig:
    """Adam (Kingma & Ba), PyTorch's defaults; weight decay is an L2 term in the gradient."""
    torch_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adam
    name: str = "adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0  # Adam's L2 penalty in the gradient

    def check(self) -> None:
        _require(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        betas = list(self.betas)
        _require(len(betas) == 2 and all(0 <= b < 1 for b in betas),
                 f"optimizer.betas={betas} must be two values in [0, 1) (Adam's moment decay rates)")
        _require(self.eps > 0, f"optimizer.eps={self.eps} must be > 0")

    def settings(self) -> dict:  # betas: a tuple, as torch keeps it
        return {k: tuple(v) if k == "betas" else v for k, v in asdict(self).items() if k != "name"}


@dataclass
class AdamWConfig(AdamConfig):
    """AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, PyTorch's defaults."""
    torch_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.AdamW
    name: str = "adamw"
    weight_decay: float = 0.01  # decoupled weight decay


OPTIMIZERS = {schema.name: schema for schema in (SGDConfig, AdamConfig, AdamWConfig)}  # optimizer=<name>


def register(cs: ConfigStore) -> None:
    """The schemas `conf/optimizer/<name>.yaml` start from (`defaults: [base_<name>, _self_]`)."""
    for name, schema in OPTIMIZERS.items():
        cs.store(group="optimizer", name=f"base_{name}", node=schema)


def check(optimizer_cfg: DictConfig) -> None:
    """Raise ValueError (one line: the key, what is wrong, what to do) for settings that cannot train."""
    _schema(optimizer_cfg).check()


def build_optimizer(groups: list[dict], optimizer_cfg: DictConfig, lr: float, fused: bool = False) -> torch.optim.Optimizer:
    """The configured optimiser over `groups`; `fused`: one kernel for the whole update instead of
    PyTorch's default implementation."""
    schema = _schema(optimizer_cfg)
    return schema.torch_class(groups, lr=lr, **schema.settings(), fused=True if fused else None)


def _schema(optimizer_cfg: DictConfig):
    """The settings as their schema's instance; its class is the one `name` names, and it must be
    the group's own (a `name` changed on the command line does not switch the settings' schema)."""
    schema = OPTIMIZERS.get(optimizer_cfg.name)
    typed = OmegaConf.get_type(optimizer_cfg)
    _require(schema is not None and typed is schema, f"optimizer.name={optimizer_cfg.name!r} does not name "
             f"this optimizer group's settings: choose the optimiser with optimizer=<one of {list(OPTIMIZERS)}>")
    return schema(**OmegaConf.to_container(optimizer_cfg, resolve=True))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
