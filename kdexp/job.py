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
from kdexp import checkpoint, runlock, teacher_cache
from kdexp.config import ConfigError, run_role, validate
from kdexp.cost import network_gflops
from kdexp.data import (DataError, EvalBatches, Splits, build_train_batches, check_data_present, data_identity,
                        dataset, load_data)
from kdexp.evaluation import accuracy, predict
from kdexp.execution import Execution
from kdexp.loop import Loop, TeacherChanged, build_optimizer, writing
from kdexp.schedules import build_scheduler
from kdexp.models import build_model, count_parameters
from kdexp.outcome import Outcome
from kdexp.pretrained import init_missing, initialise
from kdexp.records import RESULT_FILE, kept_result, remove_stale_temporaries, unwritable, write_result
from kdexp.teachers import (TeacherError, export_teacher, load_teacher, resolve_teacher_path, train_command)

log = logging.getLogger(__name__)


class CannotStart(Exception):
    """Found before training, with nothing written: a problem no config value fixes (a teacher
    export dir that cannot be written)."""


class Interrupted(Exception):
    def __init__(self, epochs_done: int):
        super().__init__(f"interrupted after epoch {epochs_done}; rerun the same command to resume")


def run(cfg: DictConfig, run_dir: Path) -> Outcome:
    """Run one job in `run_dir` while holding its lock. Raises ConfigError or CannotStart before
    anything is written, RunLocked when another process holds the run dir (nothing touched),
    Interrupted on Ctrl-C (last.pt resumes it); any other failure is recorded in result.json as
    status=failed and re-raised."""
    method = validate(cfg)
    if cfg.dry_run:
        return _dry_run(cfg, method, run_dir)
    with runlock.hold(run_dir):
        return _start(cfg, method, run_dir)


def _start(cfg: DictConfig, method, run_dir: Path) -> Outcome:
    _clean_up_after_a_killed_start(run_dir)
    previous = kept_result(run_dir, cfg.retry_failed)
    if previous is not None:
        return _keep(cfg, run_dir, previous)
    device = resolve_device(cfg.trainer.device)  # config errors (no CUDA, compile on CPU) leave no result
    execution = Execution.resolve(cfg.execution, device, method, cfg.data.loader)
    export = resolve_teacher_export_path(cfg) if cfg.export_teacher else None
    if export is not None:  # before training, not after 200 epochs
        check_writable(export.parent, "the teacher export")
        with owning_export(export, run_dir):
            pass  # claimed: other runs of this teacher are refused while this one runs, and once it completed
    started = time.time()
    loop = None
    try:
        loop, images, init = _build(cfg, method, execution, device, run_dir)
        try:
            loop.resume()
        except TeacherChanged as err:
            raise CannotStart(str(err)) from None
        state = loop.fit()
        result = {**_result(cfg, method, loop, state, started), "init": init}
        if loop.teacher_file is not None:
            result["teacher"] = loop.teacher_file
        if export is not None:
            identity = data_identity(cfg.data.name, images, cfg.data.val_size, cfg.data.split_seed)
            result.update(_export(loop.student, export, cfg, identity, state.history[-1]["test_acc"], run_dir, init))
        with writing(run_dir / RESULT_FILE):
            write_result(run_dir, result)
        return Outcome("completed")
    except KeyboardInterrupt as err:  # chained: train.log shows where it stopped
        raise Interrupted(loop.state.epoch if loop else 0) from err
    except CannotStart:  # found before writing anything: refused, not failed
        raise
    except Exception as err:
        epoch = loop.failed_epoch() if loop else None
        _record_failure(run_dir, {**_identity(cfg, method), "status": "failed",
                                  "error": f"{type(err).__name__}: {err}", "failed_epoch": epoch,
                                  "wall_seconds": time.time() - started, **_provenance()})
        raise


def _export(model: nn.Module, path: Path, cfg: DictConfig, identity: dict, test_acc: float, run_dir: Path,
            init: dict | None) -> dict:
    """Write the teacher export under its claim, checked again now; the result's record of it. A run
    that lost its claim or finds another run's export there fails, its weights kept in its last.pt."""
    try:
        with owning_export(path, run_dir), writing(path):
            export_teacher(model, path, cfg.seed, cfg.data, identity, test_acc, str(run_dir), init,
                           cfg.trainer.label_smoothing)
            sha256 = checkpoint.file_sha256(path)  # under the claim: the file this run wrote
    except CannotStart as err:
        raise TeacherError(f"{err} (this run's teacher stays in {run_dir / checkpoint.LAST}, not exported: rerun "
                           f"with retry_failed=true to export it without retraining)") from None
    log.info("exported teacher to %s", path)
    return {"teacher_checkpoint": str(path), "teacher_checkpoint_sha256": sha256}


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


def restore_teacher_export(cfg: DictConfig, run_dir: Path, result: dict) -> None:
    """A completed teacher run whose export is missing, unreadable or not its final weights
    (deleted, overwritten) writes it again from its own last.pt, without retraining."""
    path = resolve_teacher_export_path(cfg)
    last = run_dir / checkpoint.LAST
    if not last.is_file():
        if path.is_file():
            return
        raise TeacherError(f"teacher export {path} is missing and its completed run {run_dir} has no "
                           f"{checkpoint.LAST} to write it from: delete {run_dir} to train it again")
    weights = checkpoint.load(last)["student"]
    if _holds_weights(path, weights):
        return
    check_writable(path.parent, "the teacher export")
    model = build_model(cfg.model.arch, cfg.model.num_classes, cfg.model.stem, cfg.model.width)
    model.load_state_dict(weights)
    images = _images(load_data(cfg.data))
    identity = data_identity(cfg.data.name, images, cfg.data.val_size, cfg.data.split_seed)
    with owning_export(path, run_dir), writing(path):
        export_teacher(model, path, cfg.seed, cfg.data, identity, result["test_acc_final"], str(run_dir),
                       result.get("init"), cfg.trainer.label_smoothing)
    log.info("re-exported teacher %s from %s (the run is complete; not retrained)", path, last)


def _holds_weights(path: Path, weights: dict) -> bool:
    try:
        state = checkpoint.load(path)
    except (checkpoint.CheckpointError, FileNotFoundError):
        return False
    exported = state.get("state_dict") if isinstance(state, dict) else None
    return (isinstance(exported, dict) and exported.keys() == weights.keys()
            and all(torch.equal(exported[k], weights[k]) for k in weights))


def check_writable(folder: Path, what: str) -> None:
    why = unwritable(folder)
    if why:
        raise CannotStart(f"cannot write {what} into {folder}: {why}; make it writable or choose another "
                          f"folder (paths.*, data.root)")


def check_export_is_ours(path: Path, run_dir: Path) -> None:
    """A teacher export belongs to the run that wrote it: another run of the same teacher identity
    (another output dir, another init file of the same name, other epochs) must not replace the
    teacher that students already distil from. An unreadable file is no teacher: it may be replaced."""
    try:
        owner = checkpoint.load(path).get("run_dir") if path.is_file() else None
    except checkpoint.CheckpointError:
        return
    if owner is not None and Path(owner).resolve() != run_dir.resolve():
        raise CannotStart(f"teacher export {path} already holds the teacher trained in {owner}, which students "
                          f"of this identity load; keep it and export this one elsewhere (paths.teachers_dir=...), "
                          f"or delete it and {runlock.claim_file(path)} to replace it")


def _clean_up_after_a_killed_start(folder: Path, name: str = "*") -> None:
    """Half-written files a killed process of this run (or export) left: this one is their only writer now."""
    for path in remove_stale_temporaries(folder, name):
        log.info("removed %s, left half-written by a killed process", path)


@contextlib.contextmanager
def owning_export(path: Path, run_dir: Path) -> Iterator[None]:
    """Claim teacher export `path` for `run_dir` (kdexp.runlock.claim) and hold it while the block
    checks or writes the export; CannotStart while another run keeps the claim or the export holds
    another run's teacher."""
    try:
        with runlock.claim(path, run_dir):
            _clean_up_after_a_killed_start(path.parent, path.name)
            check_export_is_ours(path, run_dir)
            yield
    except runlock.Claimed as err:
        check_export_is_ours(path, run_dir)  # another run's export in place says more than its claim
        raise CannotStart(_claimed(path, err.owner, err.state)) from None


def check_export_unclaimed(path: Path, run_dir: Path) -> None:
    """The dry run's look at the claim (takes nothing): CannotStart while another run keeps it."""
    other = runlock.claimant(path, run_dir)
    if other:
        raise CannotStart(_claimed(path, *other))


def _claimed(path: Path, owner: str, state: str) -> str:
    return (f"teacher export {path} is claimed by the teacher run in {owner}, which {state}; export this one "
            f"elsewhere (paths.teachers_dir=...), or delete {runlock.claim_file(path)} to let this run replace "
            f"its teacher")


def resolve_teacher_export_path(cfg: DictConfig) -> Path:
    """Where this teacher run's weights go: the path students of the same identity look up."""
    m = cfg.model
    teacher_view = OmegaConf.merge(cfg, {"teacher": {"arch": m.arch, "stem": m.stem, "width": m.width, "seed": cfg.seed,
                                                     "init": m.init, "label_smoothing": cfg.trainer.label_smoothing,
                                                     "ckpt": None}})
    return resolve_teacher_path(teacher_view)


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


def _images(splits: Splits) -> int:
    """The training images before the val split: what split indices refer to."""
    return len(splits.train_x) + len(splits.val_x)


def _build(cfg: DictConfig, method, execution: Execution, device: torch.device,
           run_dir: Path) -> tuple[Loop, int, dict | None]:
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
    loop = build_loop(cfg, method, execution, splits, teacher, device, run_dir, teacher_logits, teacher_file)
    # in place, before any step (a resumed run then loads its last.pt over it)
    init = initialise(loop.student, cfg.model.init) if cfg.model.init else None
    return loop, _images(splits), init


def build_loop(cfg: DictConfig, method, execution: Execution, splits: Splits, teacher: nn.Module | None,
               device: torch.device, run_dir: Path, teacher_logits: torch.Tensor | None = None,
               teacher_file: dict | None = None) -> Loop:
    """The loop from data and teacher in memory (shared with kdexp.bench); `teacher_file`: the
    teacher checkpoint's {"path", "sha256"}, which last.pt records and a resume checks."""
    d = cfg.data
    # The student's initial weights depend on the seed alone (not on whether a teacher was built
    # first), so seed i of a KD run and of its baseline start alike: the seed-paired comparison.
    torch.manual_seed(cfg.seed)
    student = execution.prepare(build_model(cfg.model.arch, cfg.model.num_classes, cfg.model.stem,
                                            cfg.model.width).to(device))
    method.bind(student, teacher)
    method.label_smoothing = cfg.trainer.label_smoothing
    execution.prepare(method.to(device))
    optimizer = build_optimizer(student, method, cfg.optimizer, cfg.trainer.lr, execution.fused)
    test = EvalBatches(splits.test_x, splits.test_y, d.eval_batch_size, device, execution.channels_last,
                       d.image_size, splits.layout, splits.classes)
    val = EvalBatches(splits.val_x, splits.val_y, d.eval_batch_size, device, execution.channels_last,
                      d.image_size, splits.layout, splits.classes) if d.val_size else None
    train = build_train_batches(d.loader, splits.train_x, splits.train_y, cfg.trainer.batch_size, cfg.seed,
                                device, cfg.trainer.max_steps_per_epoch, execution.channels_last,
                                d.image_size, num_workers=d.num_workers, layout=splits.layout)
    teacher_test_logits = predict(teacher, test) if teacher is not None else None
    return Loop(student, method, teacher, optimizer, build_scheduler(optimizer, cfg.scheduler, cfg.trainer.epochs), train, val, test,
                cfg.trainer, run_dir, teacher_test_logits=teacher_test_logits, execution=execution,
                teacher_logits=teacher_logits, teacher_file=teacher_file)


def _identity(cfg: DictConfig, method) -> dict:
    return {"kind": run_role(cfg), "method": method.name, "epochs": cfg.trainer.epochs}


def _result(cfg: DictConfig, method, loop: Loop, state, started: float) -> dict:
    history = state.history
    selected = state.best_val or state.last_eval
    fid = None
    if loop.teacher_test_logits is not None:
        fid = {k: selected[k] for k in ("agreement", "kl_t1", "kl_t4")}
        fid["teacher_test_acc"] = accuracy(loop.teacher_test_logits, loop.test.labels)
    method_norms = [r["proj_grad_norm_max"] for r in history if r["proj_grad_norm_max"] is not None]
    return {
        **_identity(cfg, method), "status": "completed", "error": None, "failed_epoch": None,
        "epochs_completed": state.epoch,
        "stopped_early_epoch": state.stopped_early_epoch,  # trainer.early_stopping ended it there (null: it did not)
        "best_val_acc": state.best_val["val_acc"] if state.best_val else None,
        "best_val_epoch": state.best_val["epoch"] if state.best_val else None,
        "test_acc_at_best_val": state.best_val["test_acc"] if state.best_val else None,
        "test_acc_final": history[-1]["test_acc"],
        "best_test_acc": state.best_test["test_acc"], "best_test_epoch": state.best_test["epoch"],
        "selected_checkpoint": "best_val" if state.best_val else "final",
        "per_class_test_acc": selected["per_class_test_acc"],
        "fidelity": fid,
        "grad_norm_max": max(r["grad_norm_max"] for r in history),
        "proj_grad_norm_max": max(method_norms) if method_norms else None,
        "clip_fraction": sum(r["clip_fraction"] for r in history) / len(history),
        "params": {"student": count_parameters(loop.student), "method": count_parameters(loop.method),
                   "teacher": count_parameters(loop.teacher) if loop.teacher is not None else None},
        "gflops": _gflops(cfg, loop.teacher is not None),
        "wall_seconds": time.time() - started,  # this process only (a resumed run started later)
        "train_seconds": sum(r["epoch_seconds"] for r in history),  # every epoch, across resumes
        "images_per_s": sum(r["images_per_s"] for r in history) / len(history),
        "device": device_name(next(loop.student.parameters()).device),
        "execution": loop.execution.record(),
        **_provenance(),
    }


def _gflops(cfg: DictConfig, with_teacher: bool) -> dict:
    """Forward GFLOPs per image at data.image_size (kdexp.cost: 2 per multiply-accumulate)."""
    m, t, size = cfg.model, cfg.teacher, cfg.data.image_size
    return {"student": network_gflops(m.arch, m.num_classes, m.stem, m.width, size),
            "teacher": network_gflops(t.arch, m.num_classes, t.stem, t.width, size) if with_teacher else None}


def device_name(device: torch.device) -> str:
    """What a result records as its device: the GPU's model name, so numbers name their hardware."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _provenance() -> dict:
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "kdexp_version": kdexp.__version__, "git_commit": git_commit(), "hostname": socket.gethostname()}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None

