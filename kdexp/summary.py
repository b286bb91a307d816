"""The multirun's closing summary: how many jobs completed, failed, were skipped or dry-run.

Jobs may run on other machines (SLURM), so each job leaves its outcome as a small file in the
sweep dir and the driver reads them back when the sweep ends. Several multiruns of one experiment
share its sweep dir (and job numbers) and may run at once, so each driver gets its own folder,
named by an id it puts in the environment its jobs inherit (locally and through sbatch)."""
from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from kdexp.records import atomic_write_json

OUTCOMES = ".kdexp-outcomes"
RUN_ID_ENV = "KDEXP_MULTIRUN_ID"


def record_outcome(run_dir: Path, outcome: str) -> None:
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    atomic_write_json(_folder(hc.sweep.dir) / f"{hc.job.num}.json", {"outcome": outcome, "run_dir": str(run_dir)})


def _folder(sweep_dir: str) -> Path:
    return Path(sweep_dir) / OUTCOMES / os.environ.get(RUN_ID_ENV, "default")


class MultirunSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[RUN_ID_ENV] = uuid.uuid4().hex

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = _folder(config.hydra.sweep.dir)
        outcomes = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        shutil.rmtree(folder, ignore_errors=True)
        counts = Counter(o["outcome"] for o in outcomes)
        line = "multirun summary: " + ", ".join(f"{counts[k]} {k}" for k in
                                                ("completed", "failed", "skipped", "dry_run") if counts[k])
        failed = [o["run_dir"] for o in outcomes if o["outcome"] == "failed"]
        print(line + "".join(f"\n  failed: {d}/result.json" for d in failed), flush=True)
        if failed:  # Hydra turns a callback's exception into a warning: exit here so the driver fails
            print(f"{len(failed)} of {len(outcomes)} jobs failed (listed above)", file=sys.stderr, flush=True)
            sys.exit(1)
