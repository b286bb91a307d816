"""Hydra's own cost over kdexp's config tree: kdexp.train's config and callbacks, a task that does
nothing. What a multirun of it takes is the floor under any kdexp multirun of the same jobs."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from kdexp.config import register_configs
from kdexp.train import CONFIG_DIR

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def noop(cfg: DictConfig) -> None:
    return None


if __name__ == "__main__":
    noop()
