"""The one entry point: `python -m kdexp.train` (or `kdexp-train`) trains a teacher, a baseline
or a distilled student, depending only on the composed config."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kdexp import job
from kdexp.config import ConfigError, register_configs
from kdexp.summary import record_outcome

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()
log = logging.getLogger("kdexp")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> str:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        outcome = job.run(cfg, run_dir)
    except ConfigError as err:  # bad input: one clear line, not a traceback
        print(f"kdexp: invalid config: {err}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        outcome = "failed"  # in a sweep, let the other jobs run and the summary list this one
    except Exception:
        if not multirun:
            raise
        # A raising job stops the sweep before the summary; it lists this failure and exits 1.
        log.exception("job failed: %s", run_dir)
        outcome = "failed"
    record_outcome(run_dir, outcome)
    return outcome


if __name__ == "__main__":
    main()
