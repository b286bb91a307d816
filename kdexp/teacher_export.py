"""A teacher run's export: claimed before training (kdexp.runlock.claim), checked again and written
under that claim when the run ends, and written again from the run's last.pt when a completed run
finds it missing or replaced. Two runs of one teacher identity never replace each other's export."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig
from torch import nn

from kdexp import checkpoint, runlock
from kdexp.data import data_identity, load_data
from kdexp.loop import writing
from kdexp.models import build_model
from kdexp.outcome import CannotStart
from kdexp.records import clean_up_after_a_killed_start, unwritable
from kdexp.teachers import TeacherError, export_teacher, resolve_teacher_export_path, trained_teacher_id

log = logging.getLogger(__name__)


def export_trained(model: nn.Module, path: Path, cfg: DictConfig, identity: dict, test_acc: float, run_dir: Path,
                   init: dict | None) -> dict:
    """Write the teacher export under its claim, checked again now; the result's record of it. A run
    that lost its claim or finds another run's export there fails, its weights kept in its last.pt."""
    try:
        with owning_export(path, run_dir), writing(path):
            export_teacher(model, path, trained_teacher_id(cfg), identity, test_acc, str(run_dir), init)
            sha256 = checkpoint.file_sha256(path)  # under the claim: the file this run wrote
    except CannotStart as err:
        raise TeacherError(f"{err} (this run's teacher stays in {run_dir / checkpoint.LAST}, not exported: rerun "
                           f"with retry_failed=true to export it without retraining)") from None
    log.info("exported teacher to %s", path)
    return {"teacher_checkpoint": str(path), "teacher_checkpoint_sha256": sha256}


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
    images = load_data(cfg.data).images
    identity = data_identity(cfg.data.name, images, cfg.data.val_size, cfg.data.split_seed)
    with owning_export(path, run_dir), writing(path):
        export_teacher(model, path, trained_teacher_id(cfg), identity, result["test_acc_final"], str(run_dir),
                       result.get("init"))
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


@contextlib.contextmanager
def owning_export(path: Path, run_dir: Path) -> Iterator[None]:
    """Claim teacher export `path` for `run_dir` (kdexp.runlock.claim) and hold it while the block
    checks or writes the export; CannotStart while another run keeps the claim or the export holds
    another run's teacher."""
    try:
        with runlock.claim(path, run_dir):
            clean_up_after_a_killed_start(path.parent, path.name)
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
