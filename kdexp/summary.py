"""The multirun's closing summary: how many jobs completed, failed, were skipped or dry-run.

Jobs may run on other machines (SLURM), so each job leaves its outcome as a small file in the
sweep dir and the driver reads them back when the sweep ends."""
from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from kdexp.records import atomic_write_json

OUTCOMES = ".kdexp-outcomes"
log = logging.getLogger(__name__)


class MultirunFailures(RuntimeError):
    pass


def record_outcome(run_dir: Path, outcome: str) -> None:
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    atomic_write_json(Path(hc.sweep.dir) / OUTCOMES / f"{hc.job.num}.json",
                      {"outcome": outcome, "run_dir": str(run_dir)})


class MultirunSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        shutil.rmtree(Path(config.hydra.sweep.dir) / OUTCOMES, ignore_errors=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir) / OUTCOMES
        outcomes = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        counts = Counter(o["outcome"] for o in outcomes)
        line = "multirun summary: " + ", ".join(f"{counts[k]} {k}" for k in
                                                ("completed", "failed", "skipped", "dry_run") if counts[k])
        failed = [o["run_dir"] for o in outcomes if o["outcome"] == "failed"]
        print(line + "".join(f"\n  failed: {d}/result.json" for d in failed), flush=True)
        if failed:
            raise MultirunFailures(f"{len(failed)} of {len(outcomes)} jobs failed (listed above)")
