"""A Hydra callback for tests: each job's run dir and resolved config, as a JSON file in
$KDEXP_TEST_JOBS. A dry run writes nothing into its run dirs, so this is how a test sees where each
job of a real `python -m kdexp.train` would have written and with which config (job_args adds it)."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

ENV = "KDEXP_TEST_JOBS"
TESTS = Path(__file__).resolve().parent


def job_args(record_dir: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """The override and environment that make `python -m kdexp.train` record its jobs in `record_dir`."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return ("+hydra.callbacks.record_job._target_=job_record.RecordJob",), \
        {ENV: str(record_dir), "PYTHONPATH": path}


def recorded(record_dir: Path) -> dict[Path, dict]:
    """{run dir: resolved config} of every job recorded in `record_dir`."""
    jobs = [json.loads(p.read_text()) for p in record_dir.glob("*.json")]
    return {Path(job["run_dir"]): job["config"] for job in jobs}


class RecordJob(Callback):
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        task = {key: OmegaConf.to_container(config[key], resolve=True) if OmegaConf.is_config(config[key])
                else config[key] for key in config if key != "hydra"}
        folder = Path(os.environ[ENV])
        folder.mkdir(parents=True, exist_ok=True)
        record = {"run_dir": config.hydra.runtime.output_dir, "config": task}
        (folder / f"{uuid.uuid4().hex}.json").write_text(json.dumps(record))
