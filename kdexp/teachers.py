"""Teachers: where a teacher's checkpoint lives, how it is exported, loaded, checked and frozen.

A teacher is identified by (arch, stem, width, seed, data); its checkpoint path is derived from that
identity under `paths.teachers_dir`, so every student finds the teacher its config names and no
run ever distils from a random network.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from kdexp import checkpoint
from kdexp.models import KDResNet, build_model

FORMAT = "kdexp-teacher-v1"


class TeacherError(RuntimeError):
    """Missing, unreadable or mismatched teacher weights: always fatal."""


def data_id(data: DictConfig) -> str:
    split = f"_val{data.val_size}_split{data.split_seed}" if data.val_size else "_full"
    return f"{data.name}{split}"


def teacher_path(teachers_dir: str, arch: str, stem: str, width: int, seed: int, data: DictConfig) -> Path:
    return Path(teachers_dir) / data_id(data) / f"{arch}_{stem}_w{width}_seed{seed}.pt"


def resolve_teacher_path(cfg: DictConfig) -> Path:
    t = cfg.teacher
    if t.ckpt:
        return Path(t.ckpt)
    return teacher_path(cfg.paths.teachers_dir, t.arch, t.stem, t.width, t.seed, cfg.data)


def train_command(cfg: DictConfig) -> str:
    t, d = cfg.teacher, cfg.data
    parts = ["python -m kdexp.train experiment=teacher", f"protocol={cfg.protocol_name}",
             f"model={t.arch}", f"model.stem={t.stem}", f"model.width={t.width}", f"seed={t.seed}",
             f"data={d.name}", f"data.val_size={d.val_size}", f"data.root={d.root}",
             f"paths.teachers_dir={cfg.paths.teachers_dir}"]
    return " ".join(parts)


def export_teacher(model: KDResNet, path: Path, seed: int, data: DictConfig, test_acc: float,
                   run_dir: str) -> None:
    checkpoint.save(path, {
        "format": FORMAT, "arch": model.arch, "stem": model.stem, "width": model.width,
        "num_classes": model.fc.out_features, "seed": seed, "data": data_id(data),
        "test_acc": test_acc, "run_dir": run_dir, "state_dict": model.state_dict(),
    })


class FrozenTeacher(nn.Module):
    """A teacher that stays in eval mode (BN running stats) whatever `train()` is called on,
    with no parameter requiring grad."""

    def __init__(self, model: KDResNet):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.stage_channels = model.stage_channels

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, with_features: bool = False):
        return self.model(x, with_features=with_features)


def load_teacher(cfg: DictConfig, device: torch.device) -> FrozenTeacher:
    t = cfg.teacher
    path = resolve_teacher_path(cfg)
    if not path.is_file():
        raise TeacherError(f"teacher checkpoint not found: {path} (teacher.arch={t.arch}, stem={t.stem}, "
                           f"width={t.width}, seed={t.seed}, data={data_id(cfg.data)}). Train it first:\n"
                           f"  {train_command(cfg)}\nor point teacher.ckpt at an existing checkpoint.")
    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as err:
        raise TeacherError(f"teacher checkpoint is corrupt: {err}") from None
    if isinstance(state, dict) and state.get("format") == FORMAT:
        expected = {"arch": t.arch, "stem": t.stem, "width": t.width, "num_classes": cfg.model.num_classes}
        wrong = {k: (state[k], v) for k, v in expected.items() if state[k] != v}
        if wrong:
            details = ", ".join(f"{k}: checkpoint has {have!r}, config asks {want!r}" for k, (have, want) in wrong.items())
            raise TeacherError(f"teacher checkpoint {path} does not match teacher config ({details}); "
                               f"fix teacher.* or teacher.ckpt")
        state = state["state_dict"]
    model = build_model(t.arch, cfg.model.num_classes, t.stem, t.width)
    try:
        model.load_state_dict(state)
    except Exception as err:  # a plain state_dict from elsewhere that does not fit this architecture
        raise TeacherError(f"teacher checkpoint {path} does not fit teacher.arch={t.arch} "
                           f"stem={t.stem} width={t.width}: {str(err).splitlines()[0]}") from None
    return FrozenTeacher(model).to(device)
