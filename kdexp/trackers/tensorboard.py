"""logger=tensorboard: event files in the run dir, read by `tensorboard --logdir outputs/<experiment>`,
which then lists every run by its path (pair, cell, seed)."""
from __future__ import annotations

from typing import Any

import yaml

from kdexp.trackers.base import RunInfo, Tracker, headline, numbers


class TensorBoard(Tracker):
    name = "tensorboard"
    package = "tensorboard"  # torch.utils.tensorboard writes with it

    def __init__(self, dir: str = "tensorboard"):
        self.dir = dir  # under the run dir
        self._writer = None
        self._run_dir = ""

    def start(self, run: RunInfo) -> str:
        from torch.utils.tensorboard import SummaryWriter

        log_dir, self._run_dir = run.run_dir / self.dir, str(run.run_dir)
        self._writer = SummaryWriter(str(log_dir))
        if run.resume_id is None:
            self._writer.add_text("config", _code(yaml.safe_dump(run.config, sort_keys=False)), 0)
            self._writer.add_text("tags", _code(yaml.safe_dump({**run.tags, "run_dir": str(run.run_dir)})), 0)
            self._writer.flush()
        return str(log_dir)

    def last_epoch(self) -> int | None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(self._writer.log_dir, size_guidance={"scalars": 0})  # 0: every event
        events.Reload()  # the whole dir, as TensorBoard reads it
        if "epoch" not in events.Tags()["scalars"]:
            return 0
        return max(int(e.value) for e in events.Scalars("epoch"))

    def log_epoch(self, row: dict[str, Any]) -> None:
        for key, value in numbers(row).items():
            self._writer.add_scalar(key, value, row["epoch"])
        self._writer.flush()  # on disk now: a killed job keeps every epoch it logged

    def finish(self, result: dict[str, Any] | None) -> None:
        if result is not None:
            step = result.get("epochs_completed") or result.get("failed_epoch") or 0
            for key, value in headline(result).items():
                self._writer.add_scalar(f"final/{key}", value, step)
            self._writer.add_text("result", _code(yaml.safe_dump(
                {"status": result["status"], "error": result.get("error"), "run_dir": self._run_dir})), step)
        self._writer.close()


def _code(text: str) -> str:
    """TensorBoard renders text as Markdown: keep the YAML's lines and indentation."""
    return f"```\n{text}```"
