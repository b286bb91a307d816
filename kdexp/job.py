"""One job, start to end: skip or resume, build, train, write the result (or the failure)."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import kdexp
from kdexp import checkpoint, distributed, runlock, teacher_cache
from kdexp.config import ConfigError, run_role, validate
from kdexp.cost import network_gflops
from kdexp.data import (DataError, FolderSplits, Splits, build_batches, check_data_present, data_identity, dataset,
                        load_data)
from kdexp.evaluation import accuracy
from kdexp.execution import Execution
from kdexp.distributed import World
from kdexp.loop import Loop, TeacherChanged, build_optimizer, predict_all, writing
from kdexp.schedules import build_scheduler
from kdexp.models import build_model, count_parameters
from kdexp.outcome import CannotStart, Outcome
from kdexp.pretrained import init_missing, initialise
from kdexp.records import RESULT_FILE, clean_up_after_a_killed_start, kept_result, write_result
from kdexp.run_record import Cost, Fidelity, Gflops, MethodId, Metrics, Params, Provenance, RunRecord
from kdexp.teacher_export import (check_export_is_ours, check_export_unclaimed, check_writable, export_trained,
                                  owning_export, restore_teacher_export)
from kdexp.teachers import (data_id, load_teacher, resolve_teacher_export_path, resolve_teacher_path,
                            train_command)
from kdexp.trackers import tracking as trackers

log = logging.getLogger(__name__)


class Interrupted(Exception):
    def __init__(self, epochs_done: int):
        super().__init__(f"interrupted after epoch {epochs_done}; rerun the same command to resume")


def run(cfg: DictConfig, run_dir: Path) -> Outcome:
    """Run one job in `run_dir` while holding its lock. Raises ConfigError or CannotStart before
    anything is written, RunLocked when another process holds the run dir (nothing touched),
    Interrupted on Ctrl-C (last.pt resumes it); any other failure is recorded in result.json as
    status=failed and re-raised. On several ranks (kdexp.distributed) every rank runs this and rank 0
    alone holds the lock and writes."""
    method = validate(cfg)
    missing = trackers.missing_client(cfg.logger)
    if missing:
        raise CannotStart(missing)
    if cfg.dry_run:
        return _dry_run(cfg, method, run_dir)
    with distributed.process_group(distributed.from_env(), cfg.trainer.dist_timeout_s) as world, \
            _held_by_main(run_dir, world):
        return _start(cfg, method, run_dir, world)


@contextlib.contextmanager
def _held_by_main(run_dir: Path, world: World) -> Iterator[None]:
    """The run dir's lock, held by rank 0 for every rank; the others are told whether it got it
    (RunLocked on every rank when another process holds the run dir)."""
    with contextlib.ExitStack() as lock:
        refusal = None
        if world.is_main:
            try:
                lock.enter_context(runlock.hold(run_dir))
            except runlock.RunLocked as err:
                refusal = str(err)
        refusal = distributed.from_main(world, refusal)
        if refusal:
            raise runlock.RunLocked(refusal)
        yield


def _start(cfg: DictConfig, method, run_dir: Path, world: World) -> Outcome:
    if world.is_main:
        clean_up_after_a_killed_start(run_dir)
    previous = distributed.from_main(world, kept_result(run_dir, cfg.retry_failed) if world.is_main else None)
    if previous is not None:  # rank 0 says so (and restores a teacher's export); the others just stop
        return _keep(cfg, run_dir, previous) if world.is_main else \
            Outcome("skipped" if previous["status"] == "completed" else "failed")
    # config errors (no CUDA, compile on CPU, a batch the ranks cannot split) leave no result
    device = distributed.local_device(resolve_device(cfg.trainer.device), world)
    distributed.check(world, cfg.trainer, cfg.data, device)
    if world.distributed:
        log.info("rank %d of %d", world.rank, world.size)
    execution = Execution.resolve(cfg.execution, device, method, cfg.data.loader)
    export = resolve_teacher_export_path(cfg) if cfg.export_teacher and world.is_main else None
    if export is not None:  # before training, not after 200 epochs
        check_writable(export.parent, "the teacher export")
        with owning_export(export, run_dir):
            pass  # claimed: other runs of this teacher are refused while this one runs, and once it completed
    started = time.time()
    loop = None
    tracking = trackers.start(cfg, run_dir)  # opens while the job builds; continues a resumed run's
    try:
        loop, images, init = _build(cfg, method, execution, device, run_dir, world)
        try:
            loop.resume()
        except TeacherChanged as err:
            raise CannotStart(str(err)) from None
        tracking.catch_up(loop.state.history)
        loop.log_epoch = tracking.log_epoch
        state = loop.fit()
        if not world.is_main:  # rank 0 records the result (and exports a teacher)
            return Outcome("completed")
        result = {**_result(cfg, method, loop, state, started), "init": init}
        if loop.teacher_file is not None:
            result["teacher"] = loop.teacher_file
        if export is not None:
            identity = data_identity(cfg.data.name, images, cfg.data.val_size, cfg.data.split_seed)
            result.update(export_trained(loop.student, export, cfg, identity, state.history[-1]["test_acc"], run_dir, init))
        with writing(run_dir / RESULT_FILE):
            write_result(run_dir, result)
        tracking.finish(result)
        return Outcome("completed")
    except KeyboardInterrupt as err:  # chained: train.log shows where it stopped
        tracking.finish(None)
        raise Interrupted(loop.state.epoch if loop else 0) from err
    except CannotStart:  # found before writing anything: refused, not failed
        tracking.finish(None)
        raise
    except Exception as err:
        distributed.report_failure(world, err)
        if not world.is_main:  # rank 0 records the run's failure, naming this rank
            raise
        epoch = loop.failed_epoch() if loop else None
        failure = _record(cfg, method, status="failed", error=distributed.failure_reason(world, err),
                          failed_epoch=epoch, cost=Cost(wall_seconds=time.time() - started))
        _record_failure(run_dir, failure)
        tracking.finish(failure)
        raise


def _record_failure(run_dir: Path, result: dict) -> None:
    try:
        write_result(run_dir, result)
    except OSError as err:  # a read-only run dir: the original error is the one to report
        log.warning("cannot record the failure in %s: %s", run_dir, err)


def _keep(cfg: DictConfig, run_dir: Path, previous: dict) -> Outcome:
    """A start that does not train: the run completed (a teacher's lost export is restored), or it
    failed while training and stays failed until retried."""
    if previous["status"] != "completed":
        return Outcome("failed", f"skipping {run_dir}: it failed in epoch {previous.get('failed_epoch')} "
                                 f"({previous.get('error')}); pass retry_failed=true to run it again")
    log.info("skipping %s: result.json says completed", run_dir)
    if cfg.export_teacher:
        restore_teacher_export(cfg, run_dir, previous)
    return Outcome("skipped")


def _dry_run(cfg: DictConfig, method, run_dir: Path) -> Outcome:
    """Say what this job would do and check what can be checked without training: the data is
    there, the teacher exists, the teacher export dir is writable. Problems make the outcome's reason;
    a missing teacher that a kdexp command trains is kept apart from the others (Outcome.problems)."""
    previous = kept_result(run_dir, cfg.retry_failed)
    if previous is not None:
        log.info("dry run: would skip %s: result.json says %s", run_dir, previous["status"])
        return Outcome("dry_run")
    problems, missing_teacher, train_teacher = [], None, None
    try:
        check_data_on_disk(cfg.data)
    except (DataError, CannotStart) as err:
        problems.append(str(err))
    missing = init_missing(cfg.model.init, cfg.model.arch) if cfg.model.init else None
    if missing:
        problems.append(missing)
    what = f"{run_role(cfg)} {cfg.model.arch} (w{cfg.model.width}, {cfg.model.stem} stem)"
    if method.needs_teacher:
        path = resolve_teacher_path(cfg)
        found = path.is_file()
        what += f" from teacher {cfg.teacher.arch} [{path}: {'found' if found else 'MISSING'}]"
        if not found and cfg.teacher.ckpt:  # a file the user names: no kdexp command trains it
            problems.append(f"teacher {path} is missing")
        elif not found:
            missing_teacher, train_teacher = f"teacher {path} is missing", train_command(cfg)
    if cfg.export_teacher:
        try:
            export = resolve_teacher_export_path(cfg)
            check_writable(export.parent, "the teacher export")
            check_export_is_ours(export, run_dir)
            check_export_unclaimed(export, run_dir)
        except CannotStart as err:
            problems.append(str(err))
    busy = runlock.holder(run_dir)
    log.info(f"dry run: would train {what} with {OmegaConf.to_container(cfg.method)} for {cfg.trainer.epochs} "
             f"epochs, seed {cfg.seed}, into {run_dir}" + (f" (running now: {busy})" if busy else ""))
    reason = "; ".join(problems + [missing_teacher] if missing_teacher else problems) or None
    return Outcome("dry_run", reason, train_teacher, tuple(problems))


def check_data_on_disk(d: DictConfig) -> None:
    """The dry run's cheap data check: generated data can be written, real data is on disk."""
    if dataset(d.name).generated:
        check_writable(Path(d.root), "the generated data")
    check_data_present(d)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is visible; use trainer.device=cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def _images(splits: Splits | FolderSplits) -> int:
    """The training images before the val split: what split indices refer to."""
    return splits.images


def _build(cfg: DictConfig, method, execution: Execution, device: torch.device,
           run_dir: Path, world: World) -> tuple[Loop, int, dict | None]:
    """The loop, the number of training images before the val split (for data identities) and
    the student's initial weights as `kdexp.pretrained.initialise` records them (None: from scratch)."""
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    splits = load_data(cfg.data)
    teacher, teacher_file, teacher_logits = None, None, None
    if method.needs_teacher:
        teacher = execution.prepare(load_teacher(cfg, device, _images(splits)))
        path = resolve_teacher_path(cfg)
        teacher_file = {"path": str(path.resolve()), "sha256": checkpoint.file_sha256(path)}
    if execution.teacher_cache:
        teacher_logits = teacher_cache.load_or_build(resolve_teacher_path(cfg), teacher, splits.train_x, execution,
                                                     cfg.data.image_size, splits.layout)
    loop = build_loop(cfg, method, execution, splits, teacher, device, run_dir, teacher_logits, teacher_file, world)
    # in place, before any step (a resumed run then loads its last.pt over it)
    init = initialise(loop.student, cfg.model.init) if cfg.model.init else None
    return loop, _images(splits), init


def build_loop(cfg: DictConfig, method, execution: Execution, splits: Splits | FolderSplits, teacher: nn.Module | None,
               device: torch.device, run_dir: Path, teacher_logits: torch.Tensor | None = None,
               teacher_file: dict | None = None, world: World = World()) -> Loop:
    """The loop from data and teacher in memory (shared with kdexp.bench); `teacher_file`: the
    teacher checkpoint's {"path", "sha256"}, which last.pt records and a resume checks; `world`: the
    ranks that share each batch and each evaluation (kdexp.distributed)."""
    # The student's initial weights depend on the seed alone (not on whether a teacher was built
    # first), so seed i of a KD run and of its baseline start alike: the seed-paired comparison.
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.model.arch, cfg.model.num_classes, cfg.model.stem, cfg.model.width).to(device)
    if cfg.trainer.sync_bn and world.distributed:  # BatchNorm statistics over the global batch
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student = execution.prepare(student)
    method.bind(student, teacher)
    if method.needs_indices:
        method.bind_training_set(splits.train_y)
    method.label_smoothing = cfg.trainer.label_smoothing
    execution.prepare(method.to(device))
    optimizer = build_optimizer(student, method, cfg.optimizer, cfg.trainer.lr, execution.fused)
    train, val, test = build_batches(cfg, splits, device, execution.channels_last, world.shard)
    teacher_test_logits = predict_all(teacher, test) if teacher is not None else None
    return Loop(student, method, teacher, optimizer, build_scheduler(optimizer, cfg.scheduler, cfg.trainer.epochs), train, val, test,
                cfg.trainer, run_dir, teacher_test_logits=teacher_test_logits, execution=execution,
                teacher_logits=teacher_logits, teacher_file=teacher_file, world=world)


def _record(cfg: DictConfig, method, **measured) -> dict:
    """The ended run's record (kdexp.run_record.RunRecord), as result.json holds it: completed or failed."""
    config = OmegaConf.to_container(cfg, resolve=True)
    record = RunRecord.of_config(config, run_role(cfg), MethodId.of_class(type(method), config["method"]),
                                 data_id(cfg.data), provenance=Provenance(**_provenance()), **measured)
    return record.to_json()


def _result(cfg: DictConfig, method, loop: Loop, state, started: float) -> dict:
    return _record(cfg, method, status="completed", metrics=_metrics(loop, state), cost=_cost(cfg, loop, started))


def _metrics(loop: Loop, state) -> Metrics:
    history, best_val = state.history, state.best_val or {}
    selected = state.best_val or state.last_eval
    fidelity = None
    if loop.teacher_test_logits is not None:
        fidelity = Fidelity(**{k: selected[k] for k in ("agreement", "kl_t1", "kl_t4")},
                            teacher_test_acc=accuracy(loop.teacher_test_logits, loop.test.labels))
    method_norms = [r["proj_grad_norm_max"] for r in history if r["proj_grad_norm_max"] is not None]
    return Metrics(
        epochs_completed=state.epoch, stopped_early_epoch=state.stopped_early_epoch,
        best_val_acc=best_val.get("val_acc"), best_val_epoch=best_val.get("epoch"),
        test_acc_at_best_val=best_val.get("test_acc"), test_acc_final=history[-1]["test_acc"],
        best_test_acc=state.best_test["test_acc"], best_test_epoch=state.best_test["epoch"],
        selected_checkpoint="best_val" if state.best_val else "final",
        per_class_test_acc=selected["per_class_test_acc"], fidelity=fidelity,
        grad_norm_max=max(r["grad_norm_max"] for r in history),
        proj_grad_norm_max=max(method_norms) if method_norms else None,
        clip_fraction=sum(r["clip_fraction"] for r in history) / len(history))


def _cost(cfg: DictConfig, loop: Loop, started: float) -> Cost:
    history = loop.state.history
    teacher = count_parameters(loop.teacher) if loop.teacher is not None else None
    return Cost(
        Params(count_parameters(loop.student), count_parameters(loop.method), teacher),
        _gflops(cfg, loop.teacher is not None),
        wall_seconds=time.time() - started,  # this process only (a resumed run started later)
        train_seconds=sum(r["epoch_seconds"] for r in history),  # every epoch, across resumes
        images_per_s=sum(r["images_per_s"] for r in history) / len(history),
        device=device_name(next(loop.student.parameters()).device), execution=loop.execution.record())


def _gflops(cfg: DictConfig, with_teacher: bool) -> Gflops:
    """Forward GFLOPs per image at data.image_size (kdexp.cost: 2 per multiply-accumulate)."""
    m, t, size = cfg.model, cfg.teacher, cfg.data.image_size
    return Gflops(network_gflops(m.arch, m.num_classes, m.stem, m.width, size),
                  network_gflops(t.arch, m.num_classes, t.stem, t.width, size) if with_teacher else None)


def device_name(device: torch.device) -> str:
    """What a result records as its device: the GPU's model name, so numbers name their hardware."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _provenance() -> dict:
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "kdexp_version": kdexp.__version__, "git_commit": git_commit(), "git_dirty": git_dirty(),
            "hostname": socket.gethostname()}


def git_commit() -> str | None:
    out = _git("rev-parse", "HEAD")
    return out.strip() or None if out is not None else None


def git_dirty() -> bool | None:
    """Whether kdexp's checkout has uncommitted changes (None: not a checkout, or git is missing)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return bool(out.strip()) if out is not None and git_commit() else None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None

