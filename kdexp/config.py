"""Structured config schemas, the run-directory resolver and the validation that turns bad input
into one clear error (which key, what is wrong, what to do)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from kdexp.models import ARCHS, STEMS
from kdexp.records import kept_result


class ConfigError(ValueError):
    """Bad input that no training could fix; raised before anything is written."""


AMP_MODES = ("auto", "none", "bf16")
COMPILE_NEEDS_CUDA = ("trainer.compile=true needs a CUDA device: it captures CUDA graphs, and on the CPU "
                      "torch.compile takes minutes per batch shape for no gain; use trainer.compile=false")


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    stem: str = "cifar"
    width: int = 64
    num_classes: int = 10


@dataclass
class TeacherConfig:
    arch: Optional[str] = None
    stem: str = "cifar"
    width: int = 64
    seed: int = 0  # the study distils from its seed-0 teacher
    ckpt: Optional[str] = None  # explicit checkpoint; by default derived from the teacher's identity


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str = "data"
    download: bool = False
    verify_md5: bool = True
    val_size: int = 0
    split_seed: int = 1234
    loader: str = "tensor"
    num_workers: int = 0
    eval_batch_size: int = 256
    fake_train_size: int = 2000
    fake_test_size: int = 500


@dataclass
class TrainerConfig:
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    eta_min: float = 1e-4
    clip_norm: Optional[float] = 1.0
    device: str = "auto"
    deterministic: bool = True
    eval_every: int = 1
    max_steps_per_epoch: Optional[int] = None
    progress: bool = True
    # Speed options (kdexp/execution.py); "auto"/null picks the fast setting on CUDA and the
    # reference one on the CPU, so the CPU path and its exact results stay the study's.
    amp: str = "auto"  # auto | none | bf16
    channels_last: Optional[bool] = None
    fused: Optional[bool] = None  # fused SGD
    compile: bool = False  # torch.compile(mode="reduce-overhead") of forward+loss+backward; CUDA only
    teacher_cache: Optional[bool] = None  # precomputed teacher logits for logit-only methods


def register_configs() -> None:
    """Schemas under `conf/<group>/base.yaml`'s name, so YAML typos and wrong types fail early."""
    cs = ConfigStore.instance()
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="teacher", name="base_teacher", node=TeacherConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    for name, resolver in (("kdexp.run_label", run_label), ("kdexp.metadata_dir", hydra_metadata_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def hydra_metadata_dir(run_dir: str, retry_failed: bool) -> str | None:
    """`hydra.output_subdir`: `.hydra`, or None (Hydra then writes nothing) when this start will
    skip a finished run, so `.hydra/config.yaml` stays the config that made its result: a grid
    resubmitted with, say, another trainer.device, or v2's seed-0 final (its selection run)."""
    return None if kept_result(Path(run_dir), retry_failed) else ".hydra"


def run_role(cfg: DictConfig) -> str:
    if cfg.get("export_teacher"):
        return "teacher"
    return "baseline" if cfg.teacher.arch is None else "student"


def run_label(*, _root_: DictConfig) -> str:
    """`teacher/resnet34/seed0`, `baseline/resnet18/seed1` or `resnet50-to-resnet18/logit_a0.5_T4/seed2`,
    plus any other command-line override, so runs of different configs never share a directory."""
    cfg = _root_
    role = run_role(cfg)
    if role == "student":
        head = f"{cfg.teacher.arch}-to-{cfg.model.arch}/{method_tag(cfg.method)}"
    else:
        head = f"{role}/{cfg.model.arch}"
    label = f"{head}/seed{cfg.seed}"
    extra = OmegaConf.select(cfg, "hydra.job.override_dirname", default="")
    return f"{label}/{extra}" if extra else label


def method_tag(method_cfg: DictConfig) -> str:
    container = OmegaConf.to_container(method_cfg, resolve=True)
    return get_class(container["_target_"]).run_tag(container)


def build_method(method_cfg: DictConfig) -> Any:
    """Instantiate the method, turning its argument checks into ConfigErrors."""
    try:
        return instantiate(method_cfg)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(str(cause)) from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: DictConfig) -> Any:
    """Check the composed config; returns the (unbound) method so it is built only once."""
    m, t, tr = cfg.model, cfg.teacher, cfg.trainer
    _check(m.arch in ARCHS, f"model.arch={m.arch!r} is not one of {sorted(ARCHS)}")
    _check(m.stem in STEMS, f"model.stem={m.stem!r} must be one of {list(STEMS)}")
    _check(m.width >= 1, f"model.width={m.width} must be a positive number of base channels")
    _check(tr.epochs > 0, f"trainer.epochs={tr.epochs} must be > 0")
    _check(tr.batch_size > 0, f"trainer.batch_size={tr.batch_size} must be > 0")
    _check(tr.lr > 0, f"trainer.lr={tr.lr} must be > 0")
    _check(tr.eval_every >= 1, f"trainer.eval_every={tr.eval_every} must be >= 1")
    _check(tr.clip_norm is None or tr.clip_norm > 0,
           f"trainer.clip_norm={tr.clip_norm} must be > 0, or null to disable clipping")
    _check(tr.device in ("auto", "cpu", "cuda") or tr.device.startswith("cuda:"),
           f"trainer.device={tr.device!r} must be auto, cpu, cuda or cuda:N")
    _check(cfg.data.loader in ("tensor", "torch"), f"data.loader={cfg.data.loader!r} must be tensor or torch")
    _check(tr.amp in AMP_MODES, f"trainer.amp={tr.amp!r} must be one of {list(AMP_MODES)}")
    _check(not (tr.compile and tr.device == "cpu"), COMPILE_NEEDS_CUDA)
    _check(cfg.data.val_size >= 0, f"data.val_size={cfg.data.val_size} must be >= 0 (0 = no validation split)")
    method = build_method(cfg.method)
    if method.needs_teacher:
        _check(t.arch is not None, f"method={method.name} distils from a teacher but teacher.arch is null: "
               f"choose one, e.g. teacher=resnet34 or pair=r34_to_r18")
        _check(t.arch in ARCHS, f"teacher.arch={t.arch!r} is not one of {sorted(ARCHS)}")
        _check(t.stem in STEMS, f"teacher.stem={t.stem!r} must be one of {list(STEMS)}")
    else:
        _check(t.arch is None, f"method={method.name} trains without a teacher but teacher.arch={t.arch}: "
               f"use teacher=none (or a KD method such as method=logit)")
    if tr.teacher_cache:
        why = "needs teacher features" if method.needs_teacher else "has no teacher"
        _check(method.needs_teacher and not method.needs_features, f"trainer.teacher_cache=true caches teacher "
               f"logits, but method={method.name} {why}: use trainer.teacher_cache=null")
        _check(cfg.data.loader == "tensor", "trainer.teacher_cache=true looks logits up by each image's crop and "
               "flip, which only data.loader=tensor reports: use data.loader=tensor or trainer.teacher_cache=false")
    if method.needs_features:
        _check(t.stem == m.stem, f"method={method.name} matches feature maps stage by stage, so "
               f"teacher.stem ({t.stem}) must equal model.stem ({m.stem})")
    return method
