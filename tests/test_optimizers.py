"""kdexp/optimizers.py: each optimiser's settings are checked by its own schema class, with one line
naming the key; the class builds its torch optimiser."""
from __future__ import annotations

import re

import pytest
import torch

from helpers import compose_cfg
from kdexp import optimizers
from kdexp.config import ConfigError, validate


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.momentum=1.0"], "optimizer.momentum=1.0 must be in [0, 1)"),
    (["optimizer.momentum=0", "optimizer.nesterov=true"], "optimizer.nesterov=true needs optimizer.momentum > 0"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1.0 must be >= 0"),
    (["optimizer=adam", "optimizer.betas=[0.9,1.2]"], "optimizer.betas=[0.9, 1.2] must be two values in [0, 1)"),
    (["optimizer=adamw", "optimizer.eps=0"], "optimizer.eps=0.0 must be > 0"),
    (["optimizer=sgd", "optimizer.name=adam"], "optimizer.name='adam' does not name this optimizer group's settings"),
])
def test_each_schema_checks_its_own_settings(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_cfg("protocol=quickstart", *overrides))


@pytest.mark.parametrize("name, torch_class", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                               ("adamw", torch.optim.AdamW)])
def test_each_schema_builds_its_torch_optimiser_with_its_settings(name, torch_class):
    cfg = compose_cfg(f"optimizer={name}")
    optimizer = optimizers.build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], cfg.optimizer, lr=0.1)
    expected = {k: tuple(v) if k == "betas" else v for k, v in cfg.optimizer.items() if k != "name"}
    assert type(optimizer) is torch_class
    assert {k: optimizer.defaults[k] for k in expected} == expected and optimizer.defaults["lr"] == 0.1
