"""logger=mlflow: an MLflow run per job in the experiment named after kdexp's, its config as
params and its grouping as tags. The tracking URI is MLflow's own setting: a server
(http://...), a local file store, or a SQLite file (sqlite:///path/mlflow.db)."""
from __future__ import annotations

import time
from typing import Any, Optional

from kdexp.trackers.base import RunInfo, Tracker, headline, numbers

PARAM_VALUE_MAX = 6000  # MLflow's limit on a param's value
BATCH_MAX = 100  # MLflow's limit on params per log_batch


class Mlflow(Tracker):
    name = "mlflow"
    package = "mlflow"

    def __init__(self, tracking_uri: Optional[str] = None, experiment: Optional[str] = None):
        self.tracking_uri = tracking_uri  # null: MLFLOW_TRACKING_URI, else MLflow's default
        self.experiment = experiment  # null: the run's experiment_name
        self._client = None
        self._id = ""

    def start(self, run: RunInfo) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(self.tracking_uri)
        if run.resume_id is not None:
            self._client.update_run(run.resume_id, status="RUNNING")
            self._id = run.resume_id
            return self._id  # its params are logged: MLflow refuses to change one (an execution key may)
        experiment = _experiment_id(self._client, self.experiment or run.tags["experiment"])
        created = self._client.create_run(experiment, run_name=run.name,
                                          tags={**run.tags, "run_dir": str(run.run_dir)})
        self._id = created.info.run_id
        params = [Param(k, str(v)[:PARAM_VALUE_MAX]) for k, v in _flat(run.config).items()]
        for i in range(0, len(params), BATCH_MAX):
            self._client.log_batch(self._id, params=params[i:i + BATCH_MAX])
        return self._id

    def last_epoch(self) -> int | None:
        return max((int(m.value) for m in self._client.get_metric_history(self._id, "epoch")), default=0)

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._log(numbers(row), row["epoch"])

    def finish(self, result: dict[str, Any] | None) -> None:
        if result is None:
            self._client.set_terminated(self._id, status="KILLED")  # a later start sets it RUNNING again
            return
        step = result.get("epochs_completed") or result.get("failed_epoch") or 0
        self._log({f"final/{k}": v for k, v in headline(result).items()}, step)
        self._client.set_tag(self._id, "status", result["status"])
        self._client.set_terminated(self._id, status="FINISHED" if result["status"] == "completed" else "FAILED")

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._id, metrics=[Metric(k, v, now, step) for k, v in values.items()])


def _experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another job of the sweep created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _flat(node: dict, prefix: str = "") -> dict[str, Any]:
    """The nested config as MLflow's flat params: `trainer.lr`."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
