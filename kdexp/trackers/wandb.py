"""logger=wandb: a Weights & Biases run per job, grouped by experiment, pair and cell (its seeds
together, as analysis averages them). WANDB_MODE=offline (or logger.wandb.mode=offline) writes it
under <run dir>/wandb/ for `wandb sync` later: the way on compute nodes without network."""
from __future__ import annotations

from typing import Any, Optional

from kdexp.trackers.base import RunInfo, Tracker, headline, numbers


class Wandb(Tracker):
    name = "wandb"
    package = "wandb"

    def __init__(self, project: str = "kdexp", entity: Optional[str] = None, mode: Optional[str] = None,
                 init_timeout: float = 60.0):
        self.project = project
        self.entity = entity  # null: your W&B default entity
        self.mode = mode  # online | offline | disabled; null: WANDB_MODE, else online
        self.init_timeout = init_timeout  # seconds before a W&B server that does not answer disables it
        self._run = None
        self._run_dir = ""

    def start(self, run: RunInfo) -> str:
        import wandb

        t, self._run_dir = run.tags, str(run.run_dir)
        self._run = wandb.init(
            project=self.project, entity=self.entity, mode=self.mode, dir=run.run_dir,
            id=run.resume_id, resume="allow", name=run.name, job_type=t["method"],
            group=f"{t['experiment']}/{t['pair']}/{t['cell']}", tags=[f"{k}:{v}"[:64] for k, v in t.items()],
            config={**run.config, "run": {**t, "run_dir": str(run.run_dir)}},
            # console="off": kdexp's own log and one-line errors stay as they are
            settings=wandb.Settings(console="off", silent=True, init_timeout=self.init_timeout))
        return self._run.id

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._run.log(numbers(row), step=row["epoch"])

    def finish(self, result: dict[str, Any] | None) -> None:
        if result is not None:
            self._run.summary.update({**{f"final/{k}": v for k, v in headline(result).items()},
                                      "status": result["status"], "run_dir": self._run_dir})
        self._run.finish(exit_code=0 if result is not None and result["status"] == "completed" else 1)
