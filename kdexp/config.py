"""Structured config schemas, the run-directory resolver and the validation that turns bad input
into one clear error (which key, what is wrong, what to do)."""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import os
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import II, MISSING, DictConfig, OmegaConf
import torch
from torch import nn

from kdexp import methods, optimizers, runlock, schedules
from kdexp.data import DATASETS
from kdexp.data.strong_view import STRONG_VIEWS
from kdexp.models import ARCHS, STEMS, TORCHVISION_RESNETS, model_layout
from kdexp.pretrained import init_problem
from kdexp.records import kept_result
from kdexp.trackers import tracker_classes


class ConfigError(ValueError):
    """Bad input that no training could fix; raised before anything is written."""


AMP_MODES = ("none", "bf16")
SEED_MAX = 2**32 - 1  # numpy's seed range
CHANNELS_LAST_NEEDS_CUDA = ("execution.channels_last=true needs a CUDA device: torch's CPU convolution backward in "
                            "channels_last gives wrong gradients (0.3% off fp64 at width 8, where NCHW is 1e-6 off) "
                            "and crashes at 4 channels (torch 2.14.1, measured); use execution.channels_last=null")
COMPILE_NEEDS_CUDA = ("execution.compile=true needs a CUDA device: it captures CUDA graphs, and on the CPU "
                      "torch.compile takes minutes per batch shape for no gain; use execution.compile=null")
# experiment_name is a folder under paths.output_dir (and a SLURM job name): one plain folder name.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# A run label's folder names keep these characters; each run of others (a separator, a space, a
# quote, a `$`), of `..` or a leading dot becomes one `_`. `~` is not kept: only a replaced name has one.
_NOT_IN_DIR_NAME = re.compile(r"(?:\.\.|^\.|[^A-Za-z0-9._,=+\-\[\]])+")
DIR_NAME_MAX = 200  # + `~` and 8 hex digits: within the 255 bytes of a file name


@dataclass
class ModelConfig:
    """The network trained. `model=<arch>` (one option per kdexp.models.ARCHS entry, made in
    register_configs) sets arch and the published network's width."""
    arch: str = "resnet18"
    # cifar: 3x3/1 conv1, no max-pool (PyTorch default init, as the study); imagenet: 7x7/2 + max-pool.
    # The CIFAR benchmark's networks (wrn, vgg, resnet8x4, ...) have only their own 32x32 input layer: cifar.
    stem: str = "cifar"
    # base channels (torchvision ResNets: 64; tests use 4-16) or first-conv channels (the CIFAR
    # benchmark's networks: their published value; other values scale every layer)
    width: int = 64
    num_classes: int = 10  # model=<arch>: ${data.num_classes}, one output per class of the data
    init: Optional[str] = None  # initial weights: null (from scratch) | imagenet | a torchvision-format state_dict file


@dataclass
class TeacherConfig:
    """Which teacher a student distils from: its identity (arch ... label_smoothing) names the
    checkpoint a teacher run with those settings exported. `teacher=<arch>`: the published network
    (register_configs), `teacher=none`: no teacher."""
    arch: Optional[str] = None
    stem: str = "cifar"  # teacher=<torchvision ResNet>: ${model.stem}, the student's unless set otherwise
    width: int = 64
    seed: int = 0  # the study distils from its seed-0 teacher
    init: Optional[str] = None  # the teacher run's model.init
    label_smoothing: float = 0.0  # the teacher run's trainer.label_smoothing
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
    num_classes: int = 10
    image_size: int = 32  # inputs are resized to it after augmentation (every loader, evaluation too)
    strong_view: Optional[str] = None  # a second, strongly augmented training view (kdexp.data.strong_view)


@dataclass
class TrainerConfig:
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1  # the optimiser's (optimizer group) initial learning rate
    clip_norm: Optional[float] = 1.0
    device: str = "auto"
    deterministic: bool = True
    eval_every: int = 1
    max_steps_per_epoch: Optional[int] = None
    progress: bool = True
    label_smoothing: float = 0.0  # of every cross-entropy term (DistillationMethod.cross_entropy)
    early_stopping: Optional[int] = None  # patience: evaluations without a better val accuracy; null: off
    sync_bn: bool = False  # several ranks: BatchNorm statistics over the global batch (SyncBatchNorm, CUDA only)
    dist_timeout_s: float = 600.0  # several ranks: the longest wait in a collective before the run fails


@dataclass
class ExecutionConfig:
    """How the recipe runs, never what it is (kdexp/execution.py): the `execution` group's profile
    (`reference`: the study's fp32 numerics; `fast`: bf16 and compile) and its settings. null: on
    for CUDA, off on the CPU."""
    name: str = "reference"
    amp: str = "none"  # none | bf16 (autocast)
    channels_last: Optional[bool] = None  # NHWC; CUDA only
    fused: Optional[bool] = None  # fused optimiser kernel
    compile: Optional[bool] = False  # torch.compile(mode="reduce-overhead"), CUDA graphs; CUDA only
    teacher_cache: Optional[bool] = None  # precomputed teacher logits for logit-only methods


@dataclass
class RecipeEpochs:
    student: int = MISSING
    teacher: int = MISSING


@dataclass
class PathsConfig:
    data_dir: str = MISSING
    output_dir: str = MISSING
    teachers_dir: str = MISSING


@dataclass
class TrainConfig:
    """The root (`conf/train.yaml` starts from `base_train`): the keys a run has, typed; the values
    come from train.yaml and the groups. Keys added with `+` are refused by validate()."""
    seed: int = MISSING
    recipe_epochs: RecipeEpochs = MISSING
    experiment_name: str = MISSING
    protocol_name: str = MISSING
    export_teacher: bool = MISSING
    dry_run: bool = MISSING
    retry_failed: bool = MISSING
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    teacher: TeacherConfig = MISSING
    method: Any = MISSING  # typed by the chosen method's own schema (methods.base.arguments_schema)
    trainer: TrainerConfig = MISSING
    execution: ExecutionConfig = MISSING
    scheduler: Any = MISSING  # typed by the chosen schedule's schema (kdexp/schedules.py)
    optimizer: Any = MISSING  # typed by the chosen optimiser's schema (kdexp/optimizers.py)
    paths: PathsConfig = MISSING
    # the `logger` group's trackers by name, each typed by its class's schema (kdexp/trackers/); {}: none
    logger: Dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """Schemas under `conf/<group>/base.yaml`'s name, so YAML typos and wrong types fail early."""
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=TrainConfig)
    cs.store(group="hydra/job_logging", name="kdexp", node=JOB_LOGGING)
    schedules.register(cs)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="teacher", name="base_teacher", node=TeacherConfig)
    for arch, spec in ARCHS.items():  # model=<arch>, teacher=<arch>: the published network of each
        cs.store(group="model", name=arch, node=ModelConfig(arch, width=spec.reference_width,
                                                             num_classes=II("data.num_classes")))
        cs.store(group="teacher", name=arch, node=TeacherConfig(arch, stem=_teacher_stem(arch), width=spec.reference_width))
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="execution", name="base_execution", node=ExecutionConfig)
    optimizers.register(cs)
    for method in [*method_classes(), *site_method_classes()]:
        cs.store(group="method", name=f"base_{method.name}", node=method.Config)
    for tracker in tracker_classes():
        cs.store(group="logger", name=f"base_{tracker.name}", node=tracker.Config)
    for name, resolver in (("kdexp.run_label", run_label), ("kdexp.label_excluded_keys", label_excluded_keys),
                           ("kdexp.metadata_dir", hydra_metadata_dir), ("kdexp.log_handlers", job_log_handlers),
                           ("kdexp.cpus_per_rank", cpus_per_rank)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


MIN_CPUS_PER_RANK = 4  # what a GPU fed from memory (data.loader=tensor, no workers) is given


def cpus_per_rank(num_workers: int) -> int:
    """The CPUs a SLURM launcher asks for per GPU: one per DataLoader worker (`data.num_workers`) plus
    the process that drives the GPU, at least MIN_CPUS_PER_RANK: ImageNet's 11 workers get 12."""
    return max(MIN_CPUS_PER_RANK, int(num_workers) + 1)


def _teacher_stem(arch: str) -> str:
    """A torchvision ResNet teacher has the student's stem unless set otherwise; the CIFAR
    benchmark's networks have only their own 32x32 input layer."""
    return II("model.stem") if arch in TORCHVISION_RESNETS else "cifar"


def method_classes() -> list[type[methods.DistillationMethod]]:
    """Every method defined in kdexp/methods/ (importing each module defines its class)."""
    for module in pkgutil.iter_modules(methods.__path__, prefix=f"{methods.__name__}."):
        importlib.import_module(module.name)
    return [cls for cls in methods.DistillationMethod.__subclasses__() if cls.__module__.startswith(methods.__name__)]


def site_method_classes() -> list[type[methods.DistillationMethod]]:
    """The classes that `$KDEXP_SITE_DIR/method/*.yaml` name as `_target_` (their modules on
    PYTHONPATH): a method kept outside the package starts from its `base_<name>` schema too, so
    Hydra types its arguments as it does the package's. One whose module is not found here is left
    out: runs of other methods go on, and its own composition says base_<name> is missing."""
    site = os.environ.get("KDEXP_SITE_DIR")
    found = []
    for path in sorted(Path(site).glob("method/*.yaml")) if site else []:
        target = OmegaConf.load(path).get("_target_")
        module, _, name = target.rpartition(".") if isinstance(target, str) else ("", "", "")
        try:
            cls = getattr(importlib.import_module(module), name, None) if module else None
        except ModuleNotFoundError:
            continue
        if isinstance(cls, type) and issubclass(cls, methods.DistillationMethod) and cls not in found:
            found.append(cls)
    return found


def hydra_metadata_dir(run_dir: str, retry_failed: bool, dry_run: bool) -> str | None:
    """`hydra.output_subdir`: `.hydra`, or None (Hydra then writes nothing): for a dry run, which
    leaves nothing in a run dir for analysis to count; when this start will skip a finished run, so
    `.hydra/config.yaml` stays the config that made its result: a grid resubmitted with, say, another
    trainer.device, or v2's seed-0 final (its selection run); or when another live process holds the
    run dir (this start will be refused, that run's config stays)."""
    if dry_run or kept_result(Path(run_dir), retry_failed) or runlock.holder(run_dir):
        return None
    return ".hydra"


# `hydra/job_logging=kdexp`: Hydra's default (the terminal, and train.log in the run dir), but a dry
# run logs to the terminal only. The file is opened on the first line logged (delay), so the file
# handler, built whether or not the root uses it, makes no train.log in a dry run.
JOB_LOGGING = {
    "version": 1,
    "formatters": {"simple": {"format": "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple", "stream": "ext://sys.stdout"},
                 "file": {"class": "logging.FileHandler", "formatter": "simple", "delay": True,
                          "filename": "${hydra.runtime.output_dir}/${hydra.job.name}.log"}},
    "root": {"level": "INFO", "handlers": "${kdexp.log_handlers:${dry_run}}"},
    "disable_existing_loggers": False,
}


def job_log_handlers(dry_run: bool) -> list[str]:
    """The job log's handlers (JOB_LOGGING): no train.log for a dry run."""
    return ["console"] if dry_run else ["console", "file"]


def run_role(cfg: DictConfig) -> str:
    if cfg.get("export_teacher"):
        return "teacher"
    return "baseline" if cfg.teacher.arch is None else "student"


def run_label(*, _root_: DictConfig) -> str:
    """`teacher/resnet34/seed0`, `baseline/resnet18/seed1` or `resnet50-to-resnet18/logit_a0.5_T4/seed2`,
    plus any other command-line override, so runs of different configs never share a directory.
    Hydra makes this dir before kdexp validates a value, so each part is made one folder name here:
    no value (`teacher.ckpt=../../x`, `model.arch=a/b`) puts a run dir outside its experiment's."""
    cfg = _root_
    role = run_role(cfg)
    if role == "student":
        parts = [f"{cfg.teacher.arch}-to-{cfg.model.arch}", method_tag(cfg.method)]
    else:
        parts = [role, f"{cfg.model.arch}"]
    parts.append(f"seed{cfg.seed}")
    extra = OmegaConf.select(cfg, "hydra.job.override_dirname", default="")
    if extra:
        parts.append(extra)
    return "/".join(map(dir_name, parts))


def dir_name(text: str) -> str:
    """`text` as one folder name: itself when it is one already (`trainer.epochs=3,trainer.lr=0.05`);
    else with `_` for separators, `..` and other characters a shell or a path reads specially,
    shortened to DIR_NAME_MAX, and `~` and a hash of `text` appended, so distinct values keep
    distinct dirs (`teacher.ckpt=/data/r34.pt` names `teacher.ckpt=_data_r34.pt~<hash>`)."""
    kept = _NOT_IN_DIR_NAME.sub("_", text)
    if kept == text and len(text) <= DIR_NAME_MAX:
        return text
    return f"{kept[:DIR_NAME_MAX]}~{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def experiment_name_problem(name: str) -> str | None:
    """Why `experiment_name` cannot name the experiment's folder under paths.output_dir; None if it can."""
    if SAFE_NAME.fullmatch(name):
        return None
    return (f"experiment_name={name!r} must be one folder name (letters, digits, '.', '_', '-'; starting with a "
            f"letter or digit; at most 100 characters): it names the folder under paths.output_dir, e.g. "
            f"experiment_name=my_study")


def method_tag(method_cfg: DictConfig) -> str:
    """The method class's own run tag (`logit_a0.5_T4`), found through the config's `_target_`."""
    container = OmegaConf.to_container(method_cfg, resolve=True)
    return get_class(container["_target_"]).run_tag(container)


def label_excluded_keys(keys: list[str], *, _root_: DictConfig) -> list[str]:
    """`hydra.job.config.override_dirname.exclude_keys`: `keys`, plus every key that changes no result
    (kdexp.execution.RESULT_NEUTRAL_KEYS, each with the keys under it: `logger.wandb.project`), plus
    `method.<arg>` for every argument of the run's method, whichever method it is: the method's run
    tag already names each argument that differs from its default, so a `method.*` override in the
    dir name would say it twice."""
    from kdexp.execution import RESULT_NEUTRAL_KEYS  # here: kdexp.execution imports this module
    return [*keys, *(f"method.{key}" for key in _root_.method),
            *(leaf for key in RESULT_NEUTRAL_KEYS for leaf in _key_and_keys_under(_root_, key))]


def _key_and_keys_under(root: DictConfig, key: str) -> list[str]:
    """`key` and the dotted keys of everything under it, read without resolving any value."""
    node: Any = root
    for part in key.split("."):
        node = dict(node.items_ex(resolve=False)).get(part) if isinstance(node, DictConfig) else None
    if not isinstance(node, DictConfig):
        return [key]
    return [key, *(f"{key}.{k}" for child in node for k in _key_and_keys_under(node, child))]


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


def check_known_keys(node: DictConfig, prefix: str = "") -> None:
    """Refuse keys no schema declares. Struct mode stops `trainer.epoch=3`, but Hydra's own hint
    for it, `+trainer.epoch=3`, adds the key anyway: the run would train the default epochs in a
    directory named after a setting that did nothing."""
    schema = OmegaConf.get_type(node)
    known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else list(node)
    for key, value in node.items_ex(resolve=False):
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            where = f"under {prefix.rstrip('.')}" if prefix else "at the top level"
            hint = f"did you mean {prefix}{close[0]}?" if close else \
                f"the settings {where} are {', '.join(k for k in known if k != '_target_')}"
            raise ConfigError(f"{prefix}{key} is not a kdexp setting: {hint}")
        if isinstance(value, DictConfig):
            check_known_keys(value, f"{prefix}{key}.")


def _check_seed(key: str, value: int) -> None:
    _check(0 <= value <= SEED_MAX, f"{key}={value} must be in [0, {SEED_MAX}]")


def _check_trainer(tr: DictConfig) -> None:
    _check(tr.epochs > 0, f"trainer.epochs={tr.epochs} must be > 0")
    _check(tr.batch_size > 0, f"trainer.batch_size={tr.batch_size} must be > 0")
    _check(tr.max_steps_per_epoch is None or tr.max_steps_per_epoch > 0,
           f"trainer.max_steps_per_epoch={tr.max_steps_per_epoch} must be > 0, or null for whole epochs")
    _check(tr.lr > 0, f"trainer.lr={tr.lr} must be > 0")
    _check_label_smoothing("trainer.label_smoothing", tr.label_smoothing)
    _check(tr.early_stopping is None or tr.early_stopping >= 1, f"trainer.early_stopping={tr.early_stopping} "
           f"must be >= 1 (evaluations without a better val accuracy before stopping), or null to train every epoch")
    _check(tr.eval_every >= 1, f"trainer.eval_every={tr.eval_every} must be >= 1")
    _check(tr.clip_norm is None or tr.clip_norm > 0,
           f"trainer.clip_norm={tr.clip_norm} must be > 0, or null to disable clipping")
    _check(tr.device in ("auto", "cpu", "cuda") or tr.device.startswith("cuda:"),
           f"trainer.device={tr.device!r} must be auto, cpu, cuda or cuda:N")


def _check_execution(ex: DictConfig, device: str) -> None:
    _check(ex.amp in AMP_MODES, f"execution.amp={ex.amp!r} must be one of {list(AMP_MODES)} "
           f"(execution=fast chooses bf16)")
    _check(not (ex.compile and device == "cpu"), COMPILE_NEEDS_CUDA)
    _check(not (ex.channels_last and device == "cpu"), CHANNELS_LAST_NEEDS_CUDA)


def _check_label_smoothing(key: str, value: float) -> None:
    _check(0 <= value < 1, f"{key}={value} must be in [0, 1) (0: plain cross-entropy)")


def _check_data(d: DictConfig) -> None:
    _check(d.name in DATASETS, f"data.name={d.name!r} must be one of {list(DATASETS)} (data=<that name>)")
    _check(d.loader in ("tensor", "torch"), f"data.loader={d.loader!r} must be tensor or torch")
    _check(d.val_size >= 0, f"data.val_size={d.val_size} must be >= 0 (0 = no validation split)")
    _check_seed("data.split_seed", d.split_seed)
    _check(d.eval_batch_size > 0, f"data.eval_batch_size={d.eval_batch_size} must be > 0")
    _check(d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0 (0 = load in the main process)")
    _check(d.num_classes >= 2, f"data.num_classes={d.num_classes} must be >= 2")
    dataset = DATASETS[d.name]
    _check(d.loader == "torch" or not dataset.in_folders,
           f"data.loader={d.loader} holds the images in memory, but {dataset.layout.title} is read from its files "
           f"by DataLoader workers: use data.loader=torch")
    _check(dataset.generated or d.num_classes == dataset.layout.num_classes,
           f"data.num_classes={d.num_classes} must be {dataset.layout.num_classes}: "
           f"{dataset.layout.title} has {dataset.layout.num_classes} classes")
    _check(d.image_size >= 1, f"data.image_size={d.image_size} must be a positive number of pixels "
           f"(32: CIFAR's own size, 224: ImageNet's)")
    _check(d.strong_view in (None, *STRONG_VIEWS), f"data.strong_view={d.strong_view!r} must be null or one of "
           f"{list(STRONG_VIEWS)}")
    _check(not d.strong_view or d.loader == "torch", f"data.strong_view={d.strong_view} is made by PIL transforms "
           f"in DataLoader workers, which data.loader=tensor does not run: set data.loader=torch")
    _check(not d.strong_view or not dataset.in_folders, f"data.strong_view={d.strong_view} is implemented for the "
           f"CIFAR layouts only, not {dataset.layout.title}: set data.strong_view=null")
    if dataset.generated:
        for key in ("fake_train_size", "fake_test_size"):
            _check(d[key] > 0, f"data.{key}={d[key]} must be > 0")


def _check_strong_view(method: Any, d: DictConfig) -> None:
    """A method that trains on a second, strongly augmented view (`needs_strong_view`: MLKD) has one made,
    and no other method has one made for nothing."""
    if method.needs_strong_view:
        _check(d.strong_view is not None, f"method={method.name} trains on a strongly augmented second view of "
               f"each batch: set data.strong_view=randaugment" + ("" if d.loader == "torch" else " data.loader=torch"))
    else:
        _check(d.strong_view is None, f"data.strong_view={d.strong_view} makes a second view that method="
               f"{method.name} does not read: set data.strong_view=null")


def _check_network(key: str, net: DictConfig, num_classes: int) -> nn.Module:
    """model or teacher: arch, stem, width and init, and that the network builds (on the meta
    device: no memory); returns it for its stage layout."""
    _check(net.arch in ARCHS, f"{key}.arch={net.arch!r} is not one of {sorted(ARCHS)}")
    _check(net.stem in STEMS, f"{key}.stem={net.stem!r} must be one of {list(STEMS)}")
    _check(net.width >= 1, f"{key}.width={net.width} must be a positive number of base channels")
    problem = init_problem(key, net.init, net.arch, net.stem, net.width)
    _check(problem is None, problem)
    try:
        return model_layout(net.arch, num_classes, net.stem, net.width)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


def _check_logger(logger: DictConfig) -> None:
    schemas = {tracker.Config: tracker.name for tracker in tracker_classes()}
    for name, node in logger.items():
        _check(schemas.get(OmegaConf.get_type(node)) == name, f"logger.{name} is not an experiment tracker: "
               f"choose logger=none, logger=<one of {sorted(schemas.values())}> or a list, e.g. logger=[tensorboard,wandb]")


def _check_pairing(method_cfg: DictConfig, student: nn.Module, teacher: nn.Module) -> None:
    """A method refuses networks it cannot distil between in its `bind` (a ValueError: Feature-KD's
    stages, ReviewKD's teacher families). A second instance is bound here to the networks' meta-device
    layouts (no memory, no RNG drawn), so the refusal comes from validation and the dry run, not
    from a job that has queued and loaded its teacher."""
    probe = build_method(method_cfg)
    try:
        with torch.device("meta"):
            probe.bind(student, teacher)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def validate(cfg: DictConfig) -> Any:
    """Check the composed config; returns the (unbound) method so it is built only once (the one
    `_check_pairing` binds is a throwaway on the meta device)."""
    check_known_keys(cfg)
    _check_logger(cfg.logger)
    problem = experiment_name_problem(cfg.experiment_name)
    _check(problem is None, problem)
    m, t, tr = cfg.model, cfg.teacher, cfg.trainer
    _check_seed("seed", cfg.seed)
    _check_data(cfg.data)
    _check(m.num_classes == cfg.data.num_classes, f"model.num_classes={m.num_classes} must be "
           f"data.num_classes={cfg.data.num_classes}: the classifier has one output per class of the data")
    student = _check_network("model", m, m.num_classes)
    _check_trainer(tr)
    _check_execution(cfg.execution, tr.device)
    _check(not tr.early_stopping or cfg.data.val_size > 0, f"trainer.early_stopping={tr.early_stopping} watches "
           f"the validation accuracy, but data.val_size=0 holds out none: set data.val_size (e.g. 5000) or "
           f"trainer.early_stopping=null")
    try:
        optimizers.check(cfg.optimizer)
        schedules.check(cfg.scheduler, tr.epochs, tr.lr)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    method = build_method(cfg.method)
    if method.needs_teacher:
        _check(t.arch is not None, f"method={method.name} distils from a teacher but teacher.arch is null: "
               f"choose one, e.g. teacher=resnet34 or pair=r34_to_r18")
        teacher = _check_network("teacher", t, m.num_classes)
        _check_seed("teacher.seed", t.seed)
        _check_label_smoothing("teacher.label_smoothing", t.label_smoothing)
    else:
        _check(t.arch is None, f"method={method.name} trains without a teacher but teacher.arch={t.arch}: "
               f"use teacher=none (or a KD method such as method=logit)")
    if cfg.execution.teacher_cache:
        why = "has no teacher" if not method.needs_teacher else \
            "reads its teacher live (stage outputs, tapped modules, a second view, or its own choice)"
        _check(method.can_use_teacher_cache(), f"execution.teacher_cache=true caches teacher logits, but "
               f"method={method.name} {why}: use execution.teacher_cache=null")
        _check(cfg.data.loader == "tensor", "execution.teacher_cache=true looks logits up by each image's crop and "
               "flip, which only data.loader=tensor reports: use data.loader=tensor or execution.teacher_cache=false")
    if method.needs_teacher:
        _check_pairing(cfg.method, student, teacher)
    _check_strong_view(method, cfg.data)
    return method
