"""Experiment trackers (kdexp/trackers/), offline, each read back from what it wrote: TensorBoard's
event files (tbparse), W&B's offline run files, MLflow's SQLite store. The jobs run in process
(kdexp.job.run, as Hydra's basic launcher runs each job of a multirun); the resume test kills a real
process with SIGKILL and starts it again."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from helpers import REPO, TINY, communicate, compose_cfg, run_process, wait_until
from kdexp import job
from kdexp.data.fake import write_fake_cifar
from kdexp.records import METRICS_FILE, RESULT_FILE, TRACKER_FILE, read_metrics, read_result
from kdexp.trackers import tracking
from kdexp.trackers.base import FailSafe, RunInfo, Tracker, numbers
from kdexp.trackers.tensorboard import TensorBoard
from kdexp.trackers.wandb import Wandb

tbparse = pytest.importorskip("tbparse", reason="the tracker tests read TensorBoard files with tbparse: "
                                                "pip install -e '.[test]'")
pytest.importorskip("wandb", reason="pip install -e '.[test]' installs the wandb client")
pytest.importorskip("mlflow", reason="pip install -e '.[test]' installs the mlflow client")
from mlflow.tracking import MlflowClient  # noqa: E402 (after the skip)

e2e = pytest.mark.e2e  # the tests that train
SIZES = ("data.fake_train_size=400", "data.fake_test_size=100", "data.val_size=100")
STEPS = ("trainer.max_steps_per_epoch=1", "trainer.batch_size=16")
ALL = "logger=[tensorboard,wandb,mlflow]"


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "fake"
    write_fake_cifar(root, train_size=400, test_size=100)
    return root


def offline(out: Path) -> tuple[str, ...]:
    """Every tracker without network: W&B offline, MLflow in a SQLite file beside the runs."""
    return ("logger.wandb.mode=offline", f"logger.mlflow.tracking_uri=sqlite:///{out}/mlflow.db")


def baseline_cfg(root: Path, out: Path, *overrides: str):
    return compose_cfg(*TINY, *SIZES, *STEPS, "experiment=baseline", f"data.root={root}", f"paths.output_dir={out}",
                       "trainer.epochs=3", *overrides)


def run_job(cfg) -> Path:
    """One job in process, in the run dir Hydra would give it (its tracker run is named after it)."""
    run_dir = Path(cfg.paths.output_dir) / cfg.experiment_name / "baseline" / cfg.model.arch / f"seed{cfg.seed}"
    run_dir.mkdir(parents=True)  # as Hydra does
    job.run(cfg, run_dir)
    return run_dir


def kept(run_dir: Path) -> dict:
    return json.loads((run_dir / TRACKER_FILE).read_text())


@pytest.fixture(scope="module")
def grid(tmp_path_factory, small_root):
    """Two jobs of a grid (seeds 0 and 1) in one process, each tracked by all three trackers."""
    out = tmp_path_factory.mktemp("grid")
    cfgs = [baseline_cfg(small_root, out, ALL, *offline(out), f"seed={seed}") for seed in (0, 1)]
    return out, cfgs, [run_job(cfg) for cfg in cfgs]


# --- reading back what each tracker wrote ---

def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    df = tbparse.SummaryReader(str(log_dir)).scalars
    out: dict[str, dict[int, float]] = {}
    for tag, step, value in zip(df["tag"], df["step"], df["value"]):
        assert step not in out.setdefault(tag, {}), f"{tag} logged twice at step {step}"
        out[tag][int(step)] = float(value)
    return out


def tensorboard_text(log_dir: Path) -> dict[str, object]:
    df = tbparse.SummaryReader(str(log_dir)).text
    return {tag: yaml.safe_load(value.strip("`\n")) for tag, value in zip(df["tag"], df["value"])}


def wandb_records(run_file: Path):
    """The records of a W&B run file (`run-<id>.wandb`: LevelDB's log format, 32 KiB blocks of
    crc/length/type-framed chunks, each record a protobuf); a killed writer's torn tail is skipped."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, block = run_file.read_bytes(), 7, b"", 32768  # 7: the ':W&B' header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if len(chunk) < length:
            break
        pending += chunk
        if kind in (1, 4):  # a full record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(run_dir: Path) -> list[dict]:
    """Each offline run dir's run id, config, tags, history (step -> values) and summary, in order."""
    runs = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        run = {"id": None, "config": {}, "history": {}, "summary": {}, "group": None, "tags": []}
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, group=record.run.run_group, tags=list(record.run.tags),
                           config={i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                values = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                step = values.pop("_step")
                assert step not in run["history"], f"W&B step {step} logged twice"
                run["history"][step] = values
            elif kind == "summary":
                run["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.summary.update})
        runs.append(run)
    return runs


def mlflow_history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    steps: dict[int, float] = {}
    for metric in client.get_metric_history(run_id, key):
        assert metric.step not in steps, f"MLflow {key} logged twice at step {metric.step}"
        steps[metric.step] = metric.value
    return steps


def assert_epochs(logged: dict[str, dict[int, float]], rows: list[dict]) -> None:
    """Every number of every metrics.jsonl line, at its epoch, and no other epoch."""
    for key in numbers(rows[0]):
        assert logged[key] == pytest.approx({r["epoch"]: r[key] for r in rows if r.get(key) is not None},
                                            rel=1e-6), key


# --- TensorBoard ---

@e2e
def test_tensorboard_holds_the_config_every_epoch_and_the_final_numbers(grid):
    _, cfgs, run_dirs = grid
    run_dir, rows, result = run_dirs[0], read_metrics(run_dirs[0]), read_result(run_dirs[0])
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert_epochs(scalars, rows)
    assert scalars["final/test_acc_final"] == pytest.approx({3: result["test_acc_final"]})
    assert scalars["final/best_val_acc"] == pytest.approx({3: result["best_val_acc"]})
    text = tensorboard_text(run_dir / "tensorboard")
    assert text["config"] == OmegaConf.to_container(cfgs[0], resolve=True)
    assert text["tags"] == {"experiment": cfgs[0].experiment_name, "pair": "resnet18", "method": "ce", "cell": "ce",
                            "seed": "0", "kind": "baseline", "run_dir": str(run_dir)}
    assert text["result"] == {"status": "completed", "error": None, "run_dir": str(run_dir)}
    assert kept(run_dir)["tensorboard"] == {"id": str(run_dir / "tensorboard"), "epoch": 3}


# --- W&B (offline) ---

@e2e
def test_wandb_offline_holds_the_config_every_epoch_and_the_final_numbers(grid):
    _, cfgs, run_dirs = grid
    run_dir, rows, result = run_dirs[0], read_metrics(run_dirs[0]), read_result(run_dirs[0])
    [run] = wandb_runs(run_dir)
    assert run["id"] == kept(run_dir)["wandb"]["id"] and kept(run_dir)["wandb"]["epoch"] == 3
    history = {key: {step: values[key] for step, values in run["history"].items() if key in values}
               for key in numbers(rows[0])}
    assert_epochs(history, rows)
    assert run["config"]["trainer"] == OmegaConf.to_container(cfgs[0].trainer, resolve=True)
    assert run["config"]["run"]["run_dir"] == str(run_dir) and run["config"]["run"]["seed"] == "0"
    assert run["group"] == f"{cfgs[0].experiment_name}/resnet18/ce"  # the seeds of a cell, together
    assert "method:ce" in run["tags"] and "seed:0" in run["tags"]
    assert run["summary"]["final/test_acc_final"] == pytest.approx(result["test_acc_final"])
    assert run["summary"]["final/best_val_acc"] == pytest.approx(result["best_val_acc"])
    assert run["summary"]["status"] == "completed" and run["summary"]["run_dir"] == str(run_dir)


# --- MLflow (SQLite) ---

@e2e
def test_mlflow_holds_the_config_every_epoch_and_the_final_numbers(grid):
    out, cfgs, run_dirs = grid
    run_dir, rows, result = run_dirs[0], read_metrics(run_dirs[0]), read_result(run_dirs[0])
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run = client.get_run(kept(run_dir)["mlflow"]["id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "baseline/resnet18/seed0"
    assert client.get_experiment(run.info.experiment_id).name == cfgs[0].experiment_name
    assert_epochs({key: mlflow_history(client, run.info.run_id, key) for key in numbers(rows[0])}, rows)
    params = run.data.params
    assert params["trainer.lr"] == str(cfgs[0].trainer.lr) and params["seed"] == "0"
    assert params["model.width"] == "4" and params["method._target_"] == cfgs[0].method._target_
    assert {k: run.data.tags[k] for k in ("experiment", "pair", "method", "cell", "seed", "run_dir", "status")} == {
        "experiment": cfgs[0].experiment_name, "pair": "resnet18", "method": "ce", "cell": "ce", "seed": "0",
        "run_dir": str(run_dir), "status": "completed"}
    assert run.data.metrics["final/test_acc_final"] == pytest.approx(result["test_acc_final"])
    assert run.data.metrics["final/epochs_completed"] == 3


@e2e
def test_each_job_of_a_grid_is_its_own_tracker_run(grid):
    out, cfgs, run_dirs = grid
    ids = [kept(d) for d in run_dirs]
    for name in ("tensorboard", "wandb", "mlflow"):
        assert ids[0][name]["id"] != ids[1][name]["id"], name
    assert [len(wandb_runs(d)) for d in run_dirs] == [1, 1]
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(cfgs[0].experiment_name).experiment_id])
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1"]
    for run_dir in run_dirs:  # each its own numbers
        seed_run = client.get_run(kept(run_dir)["mlflow"]["id"])
        assert seed_run.data.metrics["final/test_acc_final"] == pytest.approx(read_result(run_dir)["test_acc_final"])


# --- resume: a killed and restarted process continues the same tracker runs ---

@e2e
def test_a_killed_run_restarted_continues_the_same_tracker_runs(tmp_path, small_root):
    out = tmp_path / "out"
    args = (*TINY, *SIZES, *STEPS, "experiment=baseline", f"data.root={small_root}", f"paths.output_dir={out}",
            "trainer.epochs=4", ALL, *offline(out))
    # its own W&B service: not this process's (which the grid's jobs started and WANDB_SERVICE names)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    proc = subprocess.Popen([sys.executable, "-m", "kdexp.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        metrics = wait_until(lambda: next(out.rglob(METRICS_FILE), None), "metrics.jsonl")
        # killed once every tracker has epoch 1 (a kill while one is logging it: test_a_continued_...)
        wait_until(lambda: proc.poll() is not None or (metrics.parent / TRACKER_FILE).exists() and len(
            [e for e in kept(metrics.parent).values() if e["epoch"] >= 1]) == 3, "epoch 1 in every tracker")
        proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: a node failure or an OOM kill
    finally:
        communicate(proc)
    run_dir = metrics.parent
    assert "logger" not in str(run_dir.relative_to(out))  # a tracker changes no result: not in the dir name
    assert not (run_dir / RESULT_FILE).exists(), "the run ended before it was killed"
    before = {name: entry["id"] for name, entry in kept(run_dir).items()}
    assert set(before) == {"tensorboard", "wandb", "mlflow"}  # the runs were open before epoch 1
    # the last epoch each tracker had taken when the kill came: the restart sends it every later one
    # (the kill may fall after last.pt kept an epoch and before a tracker took it: it is sent again)
    logged = {name: entry["epoch"] for name, entry in kept(run_dir).items()}

    resumed = run_process([sys.executable, "-m", "kdexp.train", *args], cwd=REPO, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir} after epoch" in resumed.stdout + resumed.stderr
    assert {name: entry["id"] for name, entry in kept(run_dir).items()} == before
    assert {name: entry["epoch"] for name, entry in kept(run_dir).items()} == dict.fromkeys(before, 4), \
        [line for line in resumed.stdout.splitlines() if "WARNING" in line]
    rows, result = read_metrics(run_dir), read_result(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and result["status"] == "completed"

    assert_epochs(tensorboard_scalars(run_dir / "tensorboard"), rows)  # each epoch once
    resumed_after = int(re.search(r"resuming .* after epoch (\d+)", resumed.stdout + resumed.stderr).group(1))
    wandb_starts = wandb_runs(run_dir)
    # W&B writes its offline file every 15 s (its x_transaction_log_flush_interval): what the killed
    # start logged can be missing there (README); the continued start is the same run, with the rest
    assert len(wandb_starts) == 2 and wandb_starts[1]["id"] == before["wandb"]
    assert wandb_starts[0]["id"] in (None, before["wandb"])
    assert not set(wandb_starts[0]["history"]) & set(wandb_starts[1]["history"]), "an epoch logged by both starts"
    assert sorted(wandb_starts[1]["history"]) == list(range(logged["wandb"] + 1, 5))
    assert logged["wandb"] <= resumed_after
    history = {**wandb_starts[0]["history"], **wandb_starts[1]["history"]}
    assert_epochs({k: {s: v[k] for s, v in history.items() if k in v} for k in numbers(rows[0])},
                  [r for r in rows if r["epoch"] in history])
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name(run_dir.relative_to(out).parts[0]).experiment_id])
    assert run.info.run_id == before["mlflow"] and run.info.status == "FINISHED"
    assert_epochs({key: mlflow_history(client, run.info.run_id, key) for key in numbers(rows[0])}, rows)
    assert run.data.metrics["final/test_acc_final"] == pytest.approx(result["test_acc_final"])


# --- failure: a tracker never fails or slows the run ---

class Broken(Exception):
    pass


@e2e
@pytest.mark.parametrize("where", ["start", "log_epoch", "finish"])
def test_a_tracker_that_fails_is_one_warning_and_the_run_completes(tmp_path, small_root, monkeypatch, caplog, where):
    calls = {"log_epoch": 0}
    original = getattr(TensorBoard, where)

    def failing(self, *args):
        if where == "log_epoch":
            calls["log_epoch"] += 1
            if calls["log_epoch"] == 2:  # mid-run: epoch 2, as a full disk would
                raise OSError(errno.ENOSPC, "No space left on device")
        elif where == "start":
            raise ImportError("cannot import name 'SummaryWriter'")
        else:
            raise Broken("connection refused")
        return original(self, *args)

    monkeypatch.setattr(TensorBoard, where, failing)
    with caplog.at_level(logging.INFO):
        run_dir = run_job(baseline_cfg(small_root, tmp_path, "logger=tensorboard"))
    assert read_result(run_dir)["status"] == "completed"
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2, 3]  # the record is whole
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("logger=tensorboard failed and is off"), warnings
    assert {"start": "ImportError", "log_epoch": "No space left", "finish": "Broken"}[where] in warnings[0]
    if where == "log_epoch":  # epoch 1 was logged; nothing after the failure
        assert set(tensorboard_scalars(run_dir / "tensorboard")["test_acc"]) == {1}


@e2e
def test_a_tracker_that_hangs_does_not_hold_the_run(tmp_path, small_root, monkeypatch, caplog):
    release = threading.Event()

    def hang(self, run):
        release.wait()
        raise Broken("gave up")

    monkeypatch.setattr(TensorBoard, "start", hang)
    monkeypatch.setattr(tracking, "START_WAIT_S", 0.2)
    monkeypatch.setattr(tracking, "CLOSE_WAIT_S", 0.2)
    try:
        with caplog.at_level(logging.WARNING):
            run_dir = run_job(baseline_cfg(small_root, tmp_path, "logger=tensorboard"))
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        release.set()  # its thread then fails, off the record
    assert read_result(run_dir)["status"] == "completed"
    assert [w.split(":")[0] for w in warnings] == ["logger=tensorboard has not opened its run within 0 s",
                                                   "logger=tensorboard did not finish within 0 s"], warnings


# --- what starts no tracker ---

@e2e
def test_a_dry_run_logs_nothing(tmp_path, small_root):
    cfg = baseline_cfg(small_root, tmp_path, "logger=tensorboard", "dry_run=true")
    run_dir = tmp_path / "run"
    assert job.run(cfg, run_dir).status == "dry_run"
    assert not run_dir.exists() or not {p.name for p in run_dir.iterdir()} & {TRACKER_FILE, "tensorboard"}


def test_a_rank_other_than_0_tracks_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    quiet = tracking.start(compose_cfg(*TINY, "logger=tensorboard"), tmp_path)
    quiet.catch_up([{"epoch": 1, "loss": 1.0}])
    quiet.finish({"status": "completed"})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    loud = tracking.start(compose_cfg(*TINY, "logger=tensorboard"), tmp_path)
    loud.finish(None)
    assert {p.name for p in tmp_path.iterdir()} == {TRACKER_FILE, "tensorboard"}


def test_a_missing_client_is_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(Wandb, "package", "wandb_is_not_installed_here")
    cfg = compose_cfg(*TINY, "experiment=baseline", f"paths.output_dir={tmp_path}", "logger=[tensorboard,wandb]")
    with pytest.raises(job.CannotStart) as refused:
        job.run(cfg, tmp_path / "run")
    assert str(refused.value) == ("logger=wandb needs the wandb_is_not_installed_here package, which is not "
                                  "installed: pip install -e '.[wandb]'")
    assert list(tmp_path.iterdir()) == []


def test_logger_settings_and_choices_are_checked(tmp_path):
    from kdexp.config import ConfigError, validate

    assert list(compose_cfg(*TINY).logger) == []  # logger=none, the default
    assert list(compose_cfg(*TINY, "logger=[mlflow,tensorboard]").logger) == ["mlflow", "tensorboard"]
    with pytest.raises(ConfigError, match=r"logger.neptune is not an experiment tracker: choose logger=none"):
        validate(compose_cfg(*TINY, "+logger.neptune.project=x"))
    with pytest.raises(Exception, match="logger.wandb.projekt"):
        compose_cfg(*TINY, "logger=wandb", "logger.wandb.projekt=x")


def test_analysis_counts_no_tracker_setting_as_a_config_difference():
    from analysis.collect import ENV_KEY

    for key in ("logger", "logger.wandb.project", "logger.mlflow.tracking_uri"):
        assert ENV_KEY.match(key), key


# --- the fan-out, without training ---

class Recorder(Tracker):
    """A tracker that remembers its calls (class-wide: the test reads them after the job)."""

    name = "recorder"
    package = "json"
    calls: list = []
    holds = 0  # the last epoch its continued run holds

    def start(self, run: RunInfo) -> str:
        self.calls.append(("start", run.resume_id, run.logged_epoch))
        return run.resume_id or "r1"

    def last_epoch(self) -> int:
        return self.holds

    def log_epoch(self, row: dict) -> None:
        self.calls.append(("epoch", row["epoch"]))

    def finish(self, result: dict | None) -> None:
        self.calls.append(("finish", result and result["status"]))


@pytest.mark.parametrize("holds", [0, 3])
def test_a_continued_tracker_run_gets_each_epoch_once(tmp_path, monkeypatch, holds):
    """The run dir says the tracker had epochs 1 and 2; a start killed between logging epoch 3 and
    recording it leaves a tracker that holds 3 (where it can tell): either way 3 is logged once."""
    Recorder.calls.clear()
    monkeypatch.setattr(Recorder, "holds", holds)
    (tmp_path / TRACKER_FILE).write_text(json.dumps({"recorder": {"id": "r1", "epoch": 2}}))
    cfg = compose_cfg(*TINY)
    both = tracking.Tracking(tmp_path, {"recorder": {"_target_": f"{__name__}.Recorder"}})
    both.open(cfg)
    both.catch_up([{"epoch": e} for e in (1, 2, 3)])  # a resume after epoch 3; the tracker had 1 and 2
    both.log_epoch({"epoch": 3})  # offered again: not logged again
    both.log_epoch({"epoch": 4})
    both.finish({"status": "completed"})
    assert Recorder.calls == [("start", "r1", 2), *([("epoch", 3)] if holds < 3 else []), ("epoch", 4),
                              ("finish", "completed")]
    assert kept(tmp_path) == {"recorder": {"id": "r1", "epoch": 4}}


def test_fail_safe_runs_calls_in_order_and_stops_at_the_first_failure(caplog):
    done: list[int] = []
    safe = FailSafe("x")

    def boom():
        raise Broken("no network")

    for call in (lambda: done.append(1), boom, lambda: done.append(2)):
        safe.submit(call)
    assert safe.flushed(10)
    safe.submit(lambda: done.append(3))
    safe.close(10)
    assert done == [1] and safe.failed
    assert [r.getMessage() for r in caplog.records] == [
        "logger=x failed and is off for the rest of this run: Broken: no network; training goes on "
        "(metrics.jsonl has every epoch)"]
