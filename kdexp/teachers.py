"""Teachers: where a teacher's checkpoint lives, how it is exported, loaded, checked and frozen.

A teacher is identified by its `kdexp.run_record.TeacherId` (arch, stem, width, init, seed, label
smoothing, data and its image size); its checkpoint path is derived from that identity under `paths.teachers_dir`, so every
student finds the teacher its config names (an ImageNet-initialised or label-smoothed teacher never
shares a file with a scratch, plain-CE one) and no run ever distils from a random network.
"""
from __future__ import annotations

import functools
import logging
import shlex
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdexp import checkpoint
from kdexp.config import register_configs
from kdexp.data import data_identity, dataset, split_indices
from kdexp.data.loaders import SIZE
from kdexp.models import build_model, filled_on_load, state_dict_misfit
from kdexp.run_record import TeacherId
from kdexp.train import CONFIG_DIR

FORMAT = "kdexp-teacher-v1"
log = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """Missing, unreadable, mismatched or wrongly trained teacher weights: always fatal."""


def data_id(data: DictConfig) -> str:
    """`cifar10_val5000_split1234`; generated data carries its sizes (`fake3000x1000_...`,
    `fake_cifar100_5000x500_...`), so teachers trained on different generated sets never share a
    path; inputs resized to another image size than CIFAR's 32 pixels say so
    (`cifar10_224px_val5000_split1234`)."""
    name = data.name
    if dataset(data.name).generated:
        sizes = f"{data.fake_train_size}x{data.fake_test_size}"
        name = f"fake{sizes}" if name == "fake" else f"{name}_{sizes}"  # data=fake's paths as they always were
    size = f"_{data.image_size}px" if data.image_size != SIZE else ""
    split = f"_val{data.val_size}_split{data.split_seed}" if data.val_size else "_full"
    return f"{name}{size}{split}"


def teacher_id(cfg: DictConfig) -> TeacherId:
    """The teacher a student config names."""
    return TeacherId.of_config(cfg, "student", data_id(cfg.data))


def trained_teacher_id(cfg: DictConfig) -> TeacherId:
    """The teacher a teacher run's config trains."""
    return TeacherId.of_config(cfg, "trains", data_id(cfg.data))


def resolve_teacher_path(cfg: DictConfig) -> Path:
    if cfg.teacher.ckpt:
        return Path(cfg.teacher.ckpt)
    return derived_teacher_path(cfg)


def derived_teacher_path(cfg: DictConfig) -> Path:
    """Where this config's teacher lives by its identity (ignoring teacher.ckpt)."""
    return teacher_id(cfg).path(cfg.paths.teachers_dir)


def resolve_teacher_export_path(cfg: DictConfig) -> Path:
    """Where this teacher run's weights go: the path students of the same identity look up."""
    return trained_teacher_id(cfg).path(cfg.paths.teachers_dir)


def _compose(overrides: list[str]) -> DictConfig:
    """The train config as the command line `overrides` compose it (inside a Hydra app or not).
    Read only: a multirun's dry run asks for the same few teachers once per job, and each composition
    costs ~0.3 s, so each is made once per process."""
    return _composed(tuple(overrides))


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    overrides = list(overrides)
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def train_command(cfg: DictConfig) -> str:
    """The command a user types to train this config's teacher (README form): the teacher preset,
    protocol and model, plus only the overrides whose default there differs from what this student
    needs, so the teacher lands exactly at the path the student looks up (and no other key ends up in
    its run dir's name)."""
    d, paths, teacher = cfg.data, cfg.paths, teacher_id(cfg)
    overrides = ["experiment=teacher", f"protocol={cfg.protocol_name}", f"model={teacher.arch}"]
    # in this order: a later key's default may follow from an earlier one (the generated data's root
    # from its sizes, teachers_dir from output_dir)
    needed = [("data.name", d.name, f"data={d.name}"), ("paths.output_dir", paths.output_dir, None),
              ("paths.teachers_dir", paths.teachers_dir, None),
              ("data.fake_train_size", d.fake_train_size, None), ("data.fake_test_size", d.fake_test_size, None),
              ("data.root", d.root, None), ("data.val_size", d.val_size, None), ("data.split_seed", d.split_seed, None),
              *((key, value, None) for key, value in teacher.overrides())]
    composed = _compose(overrides)
    for key, want, override in needed:
        if OmegaConf.select(composed, key) != want:
            overrides.append(override or f"{key}={want}")
            composed = _compose(overrides)  # only after a change: each composition costs ~0.3 s
    return "python -m kdexp.train " + " ".join(shlex.quote(o) for o in overrides)


def export_teacher(model: nn.Module, path: Path, teacher: TeacherId, data_identity: dict, test_acc: float,
                   run_dir: str, init: dict | None = None) -> None:
    """Write the teacher checkpoint students load: weights, the teacher's identity as it records itself
    (architecture, how it was trained, the data and image size), the data identity
    (`kdexp.data.data_identity`) and its initial weights' hash (`init`: as `kdexp.pretrained.initialise`
    records them)."""
    checkpoint.save(path, {
        "format": FORMAT, **teacher.recorded(), "num_classes": model.num_classes,
        "init_sha256": init["sha256"] if init else None, "data_identity": data_identity,
        "test_acc": test_acc, "run_dir": run_dir, "state_dict": model.state_dict(),
    })


class FrozenTeacher(nn.Module):
    """A teacher that stays in eval mode (BN running stats) whatever `train()` is called on,
    with no parameter requiring grad."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        # the structure a method's `bind` reads of its teacher (Feature-KD: its stages' channels and strides)
        self.stage_channels, self.stage_strides = model.stage_channels, model.stage_strides

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, with_features: bool = False):
        return self.model(x, with_features=with_features)


def load_teacher(cfg: DictConfig, device: torch.device, images: int) -> FrozenTeacher:
    """The config's teacher, checked against the config and against the student's data (`images`:
    the student's training set before its val split), frozen on `device`."""
    t = cfg.teacher
    path = resolve_teacher_path(cfg)
    _check_exists(cfg, path)
    try:
        state = checkpoint.load(path)
    except checkpoint.UnsafeCheckpointError as err:  # not corrupt, and not kdexp's export: nothing to re-export
        raise TeacherError(f"{err}; if you trust its source, load it yourself, torch.save its state_dict alone "
                           f"and point teacher.ckpt at that file") from None
    except checkpoint.CheckpointError as err:
        raise TeacherError(f"teacher checkpoint is corrupt: {err}. Re-export it by running its teacher command "
                           f"again (a completed teacher run re-exports without retraining): "
                           f"{train_command(cfg)}") from None
    if isinstance(state, dict) and state.get("format") == FORMAT:
        wrong = teacher_id(cfg).mismatches(state)
        if state.get("num_classes") != cfg.model.num_classes:  # the student's classes, not the teacher's identity
            wrong["num_classes"] = (state.get("num_classes"), cfg.model.num_classes)
        if wrong:
            details = ", ".join(f"{k}: checkpoint has {have!r}, config asks {want!r}" for k, (have, want) in wrong.items())
            raise TeacherError(f"teacher checkpoint {path} does not match teacher config ({details}); "
                               f"fix teacher.* or teacher.ckpt")
        check_teacher_data(path, state.get("data_identity"), cfg, images)
        state = state["state_dict"]
    else:
        check_teacher_data(path, None, cfg, images)
        state = foreign_weights(state)
    model = build_model(t.arch, cfg.model.num_classes, t.stem, t.width)
    misfit = state_dict_misfit(model.state_dict(), state, filled_on_load(model, state))
    if misfit:  # weights from elsewhere that do not fit this architecture
        raise TeacherError(f"teacher checkpoint {path} does not fit teacher.arch={t.arch} "
                           f"stem={t.stem} width={t.width} num_classes={cfg.model.num_classes}: {misfit}")
    model.load_state_dict(state)  # strict; fills the BatchNorm counters a pre-0.4.1 file lacks
    return FrozenTeacher(model).to(device)


def foreign_weights(state: object) -> object:
    """The weights in a checkpoint kdexp did not export: a plain state_dict, or the KD benchmark's
    published layout (RepDistiller, mdistiller: `{'model': state_dict, 'epoch', 'accuracy' or
    'best_acc', 'optimizer', ...}`), whose module names kdexp's CIFAR networks share. Loaded
    strictly afterwards: any key or shape that differs is an error, not a partial load, except the
    BatchNorm counters a file saved before PyTorch 0.4.1 lacks, which torch fills (`filled_on_load`)."""
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        return state["model"]
    return state


def _check_exists(cfg: DictConfig, path: Path) -> None:
    if path.is_file():
        return
    if cfg.teacher.ckpt:
        what = "is a directory" if path.is_dir() else "does not exist"
        raise TeacherError(f"teacher.ckpt={path} {what}: point it at a teacher checkpoint file, or drop "
                           f"teacher.ckpt to use {derived_teacher_path(cfg)} (trained by: {train_command(cfg)})")
    t = cfg.teacher
    trained = "".join(f", {key}={t[key]}" for key in ("init", "label_smoothing") if t[key])
    raise TeacherError(f"teacher checkpoint not found: {path} (teacher.arch={t.arch}, stem={t.stem}, "
                       f"width={t.width}, seed={t.seed}{trained}, data={data_id(cfg.data)}); train it first: "
                       f"{train_command(cfg)} (or point teacher.ckpt at an existing checkpoint)")


def check_teacher_data(path: Path, recorded: dict | None, cfg: DictConfig, images: int) -> None:
    """Refuse a teacher that was trained on other data or on any of this run's validation images
    (its val accuracy, and so model selection, would be inflated). A teacher that records nothing
    (exported before kdexp recorded it, or a foreign state_dict) is used with a warning."""
    data = cfg.data
    mine = f"{data.name} ({images} images, val_size={data.val_size}, split_seed={data.split_seed})"
    if recorded is None:
        log.warning("teacher %s records no training data (a published checkpoint, or exported before kdexp "
                    "recorded it): cannot check that it never saw this run's validation images (%s)", path, mine)
        return
    theirs = (f"{recorded['dataset']} ({recorded['images']} images, val_size={recorded['val_size']}, "
              f"split_seed={recorded['split_seed']})")
    if (recorded["dataset"], recorded["images"]) != (data.name, images):
        raise TeacherError(f"teacher {path} was trained on {theirs}, this run uses {mine}: "
                           f"train one on this run's data: {train_command(cfg)}")
    if recorded != data_identity(data.name, images, recorded["val_size"], recorded["split_seed"]):
        raise TeacherError(f"teacher {path} records training indices that kdexp's split of {theirs} does not "
                           f"produce: retrain it")
    taught, _ = split_indices(images, recorded["val_size"], recorded["split_seed"])
    _, val = split_indices(images, data.val_size, data.split_seed)
    seen = int(torch.isin(val, taught).sum())
    if seen:
        raise TeacherError(f"teacher {path} was trained on {theirs}, which includes {seen} of this run's "
                           f"{len(val)} validation images ({mine}): use a teacher trained with this run's "
                           f"split, as trained by: {train_command(cfg)}")
