"""One run's record: what ran (network, teacher, method, setting), what it measured and cost, where
it ran, and its resolved config. The job builds it once and writes it as result.json with
`schema_version: 2`; analysis reads it back as it is (`RunRecord.from_json`), and today's v1 files
through the one translation of them (`RunRecord.from_v1`).

The JSON keeps v1's top-level keys (`status`, `test_acc_final`, `fidelity`, `params`, ...: launch,
trackers and users read them) by merging the `flat` parts into the top level; the identity parts and
the config are nested objects. No torch here: analysis reads records without it.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

SCHEMA_VERSION = 2
# What a run or teacher export made before kdexp recorded these was trained with: CIFAR's 32 pixels
# (kdexp.data.loaders.SIZE), from scratch, plain CE. The study's runs too.
UNRECORDED = {"image_size": 32, "init": None, "label_smoothing": 0.0}


def _flat(part: type, tabled: bool = True) -> Any:
    """A part whose fields sit at the top level of the JSON (v1's layout) and, where `tabled`, are
    columns of analysis's run table."""
    return field(default_factory=part, metadata={"flat": True, "prefix": "", **({} if tabled else {"column": None})})


def _unprefixed(**kwargs: Any) -> Any:
    """A nested part whose fields are columns under their own names (not `<part>_<field>`)."""
    return field(metadata={"prefix": ""}, **kwargs)


def _column(name: str) -> Any:
    """A number whose analysis column has another name than its result.json key (v1's names)."""
    return field(default=None, metadata={"column": name})


def _not_a_column(**kwargs: Any) -> Any:
    """Recorded, but no column of analysis's run table (a dict, or a fact no table reads)."""
    return field(metadata={"column": None}, **kwargs)


@dataclass(frozen=True)
class NetworkId:
    """The student's network."""
    arch: str | None = _column("student")
    stem: str | None = None
    width: int | None = None
    init: str | None = UNRECORDED["init"]  # null: from scratch; "imagenet"; or a state_dict file

    @classmethod
    def of(cls, node: Mapping[str, Any]) -> NetworkId:
        return cls(node.get("arch"), node.get("stem"), node.get("width"), node.get("init", UNRECORDED["init"]))


def _name_token(prefix: str, shown: Callable[[Any], Any] = lambda v: v, when_unset: bool = True) -> Callable[[Any], str]:
    def token(value: Any) -> str:
        return f"{prefix}{shown(value)}" if value or when_unset else ""
    return token


def _init_name(init: str | None) -> str | None:
    from kdexp.pretrained import init_name  # here: analysis reads identities without torch
    return init_name(init)


def _fmt(value: Any) -> str:
    from kdexp.methods.base import fmt  # here: analysis reads identities without torch
    return fmt(value)


def _teacher_field(default: Any, student: str, trains: str, token: Callable[[Any], str] | None,
                   recorded: Callable[[Any], Any] = lambda v: v, column: str | None = "",
                   run_column: str = "", checked: bool = True) -> Any:
    """A field of a teacher's identity, and everything that follows from it:
    `student`: the student config's key naming it; `trains`: the teacher run's config key that trains
    it (and the override train_command gives); `token`: its part of the checkpoint's file name (None:
    none); `recorded`: how an export records it; `checked`: whether loading compares the export's
    record with it; `column`: the student row's analysis column (default `teacher_<field>`; None: the
    student's own column holds it); `run_column`: a teacher run's column that holds it (default
    `<field>`), which is how analysis pairs students with teacher runs."""
    return field(default=default, metadata={"student": student, "trains": trains, "token": token,
                                            "recorded": recorded, "column": column, "run_column": run_column,
                                            "checked": checked})


@dataclass(frozen=True)
class TeacherId:
    """What makes two teachers different networks to distil from. A student's config names one
    (`of_config(cfg, "student")`), a teacher run trains one (`of_config(cfg, "trains")`) and an export
    records one; its checkpoint path, the check of an export against it, the overrides that train it
    and analysis's pairing of students with teacher runs all follow from its fields' declarations.
    The file name: `resnet34_cifar_w64_seed0`, plus how it was trained when not from scratch with
    plain CE: `resnet34_imagenet_w64_seed0_init-imagenet_ls0.1`."""

    image_size: int | None = _teacher_field(UNRECORDED["image_size"], "data.image_size", "data.image_size",
                                            token=None, column=None)  # part of its data's name
    arch: str | None = _teacher_field(None, "teacher.arch", "model.arch", _name_token(""), column="teacher",
                                      run_column="student")
    stem: str | None = _teacher_field(None, "teacher.stem", "model.stem", _name_token("_"))
    width: int | None = _teacher_field(None, "teacher.width", "model.width", _name_token("_w"))
    seed: int | None = _teacher_field(None, "teacher.seed", "seed", _name_token("_seed"), checked=False)
    init: str | None = _teacher_field(UNRECORDED["init"], "teacher.init", "model.init",
                                      _name_token("_init-", _init_name, when_unset=False), recorded=_init_name)
    label_smoothing: float | None = _teacher_field(UNRECORDED["label_smoothing"], "teacher.label_smoothing",
                                                   "trainer.label_smoothing",
                                                   _name_token("_ls", _fmt, when_unset=False))
    data: str | None = _not_a_column(default=None)  # kdexp.teachers.data_id: the dataset, its split and generated sizes

    @classmethod
    def of_config(cls, cfg: Mapping[str, Any], role: str, data: str | None) -> TeacherId:
        """The teacher a config names (`role` "student") or trains (`role` "trains"), on `data`."""
        return cls(**{f.name: _select(cfg, f.metadata[role], f.default) for f in _identity_fields()}, data=data)

    @staticmethod
    def config_keys(role: str) -> tuple[str, ...]:
        """The config keys that name a student's teacher (`role` "student") or that a teacher run trains it with."""
        return tuple(f.metadata[role] for f in _identity_fields())

    @classmethod
    def of_row(cls, row: Any, role: str) -> TeacherId:
        """From analysis's columns: the teacher a student row names (`role` "student") or the teacher a
        teacher run's row trained (`role` "trains"); without its data (rows pair on their data column)."""
        key = "column" if role == "student" else "run_column"
        return cls(**{f.name: row[_column_name(f, key)] for f in _identity_fields()})

    @property
    def name(self) -> str:
        return "".join(f.metadata["token"](getattr(self, f.name)) for f in _identity_fields() if f.metadata["token"])

    def path(self, teachers_dir: str | Path) -> Path:
        return Path(teachers_dir) / str(self.data) / f"{self.name}.pt"

    def recorded(self) -> dict[str, Any]:
        """The fields as a teacher export records them (kdexp.teachers.export_teacher)."""
        return {**{f.name: f.metadata["recorded"](getattr(self, f.name)) for f in _identity_fields()}, "data": self.data}

    def mismatches(self, export: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """{field: (the export's, this identity's)} where an export records another teacher; an export
        made before a field was recorded trained with its default (UNRECORDED)."""
        checked = {f.name: f.default for f in _identity_fields() if f.metadata["checked"]}
        mine = self.recorded()
        return {k: (export.get(k, default), mine[k]) for k, default in checked.items() if export.get(k, default) != mine[k]}

    def overrides(self) -> list[tuple[str, Any]]:
        """(key, value) of the teacher run's config that make it train this teacher (beside its data)."""
        return [(f.metadata["trains"], getattr(self, f.name)) for f in _identity_fields()]

    def columns(self) -> dict[str, Any]:
        """The student row's columns naming its teacher."""
        return _columns(self)


@functools.cache
def _identity_fields() -> tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(TeacherId) if "trains" in f.metadata)


def _column_name(f: dataclasses.Field, key: str) -> str:
    """A teacher field's column in a student's row (`key` "column") or in a teacher run's ("run_column")."""
    name = f.metadata[key]
    if name is None:  # the student's own column
        return f.name
    return name or (f"teacher_{f.name}" if key == "column" else f.name)


def _select(cfg: Mapping[str, Any], dotted: str, default: Any) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


@dataclass(frozen=True)
class MethodId:
    """The method's identity as its class declares it (kdexp.methods.base), computed at run time."""
    name: str | None = _column("method")
    kd: str | None = None                                    # the KD column: "logit(std)", "none"
    hparams: dict[str, Any] = field(default_factory=dict)    # the grid cell: {"alpha": 0.5, "T": 4.0}
    cell: str | None = None                                  # the cell as tables show it: "α=0.5, T=4"
    grid: dict[str, str] = field(default_factory=dict)       # grid key -> display symbol

    @classmethod
    def of_class(cls, method_class: Any, cfg: Mapping[str, Any]) -> MethodId:
        """The identity a method class (kdexp.methods.base.DistillationMethod) gives its config
        `cfg` (every argument present); methods without a teacher are the "none" KD column."""
        hparams = {key: _number(value) for key, value in method_class.cell(cfg).items()}
        kd = method_class.label(cfg) if method_class.needs_teacher else NO_KD
        return cls(method_class.name, kd, hparams, method_class.cell_label(cfg), dict(method_class.grid))

    def columns(self) -> dict[str, Any]:
        return _columns(self)


NO_KD = "none"  # the KD column of runs whose method needs no teacher


def _number(value: Any) -> Any:
    """4 and 4.0 are one cell (a sweep typed `T=4` against a schema's 4.0); a list is a tuple, so a
    cell's values can be grouped and sorted."""
    if isinstance(value, (list, tuple)):
        return tuple(_number(v) for v in value)
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


@dataclass(frozen=True)
class Setting:
    """How the run was set up, besides its networks and method."""
    experiment: str | None = None
    protocol: str | None = None
    kind: str | None = None  # teacher | baseline | student
    seed: int | None = None
    epochs: int | None = None
    data: str | None = None  # the dataset's name
    val_size: int | None = None
    image_size: int | None = UNRECORDED["image_size"]
    label_smoothing: float | None = UNRECORDED["label_smoothing"]
    clip_norm: float | None = None


@dataclass(frozen=True)
class Fidelity:
    """The student's agreement with its teacher on the test set, at the selected checkpoint."""
    agreement: float | None = None
    kl_t1: float | None = None
    kl_t4: float | None = None
    teacher_test_acc: float | None = None


@dataclass(frozen=True)
class Metrics:
    """What the run measured (accuracies are fractions in [0, 1])."""
    epochs_completed: int | None = None
    stopped_early_epoch: int | None = None  # trainer.early_stopping ended it there (null: it did not)
    best_val_acc: float | None = None
    best_val_epoch: int | None = None
    test_acc_at_best_val: float | None = _column("test_at_best_val")
    test_acc_final: float | None = _column("test_final")
    best_test_acc: float | None = _column("best_test")
    best_test_epoch: int | None = None
    selected_checkpoint: str | None = _not_a_column(default=None)  # best_val | final
    per_class_test_acc: dict[str, float] | None = _not_a_column(default=None)
    fidelity: Fidelity | None = _unprefixed(default=None)
    grad_norm_max: float | None = None
    proj_grad_norm_max: float | None = None
    clip_fraction: float | None = None


@dataclass(frozen=True)
class Params:
    student: int | None = None
    method: int | None = None  # the method's own trained modules (projections, ...)
    teacher: int | None = None


@dataclass(frozen=True)
class Gflops:
    """Forward GFLOPs per image at the run's input size (kdexp.cost: 2 per multiply-accumulate)."""
    student: float | None = None
    teacher: float | None = None


@dataclass(frozen=True)
class Cost:
    params: Params = field(default_factory=Params)
    gflops: Gflops = field(default_factory=Gflops)
    wall_seconds: float | None = None  # this process only (a resumed run started later)
    train_seconds: float | None = None  # every epoch, across resumes
    images_per_s: float | None = None
    device: str | None = None
    execution: dict[str, Any] = _not_a_column(default_factory=dict)  # kdexp.execution.Execution.record


@dataclass(frozen=True)
class Provenance:
    torch: str | None = None
    cuda: str | None = None
    python: str | None = _not_a_column(default=None)
    kdexp_version: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None  # uncommitted changes in kdexp's checkout (null: unknown)
    hostname: str | None = _not_a_column(default=None)


@dataclass(frozen=True)
class Outputs:
    """What the run left besides its numbers: its init, the teacher file it read, the export it wrote."""
    init: dict[str, Any] | None = None  # kdexp.pretrained.initialise's record (null: from scratch)
    teacher: dict[str, Any] | None = None  # the teacher checkpoint read: {"path", "sha256"}
    teacher_checkpoint: str | None = None
    teacher_checkpoint_sha256: str | None = None


@dataclass(frozen=True)
class Identity:
    network: NetworkId = _unprefixed()
    teacher: TeacherId | None = _unprefixed(default=None)
    method: MethodId | None = _unprefixed(default=None)  # None: its class cannot be told (analysis says why)


@dataclass(frozen=True)
class RunRecord:
    identity: Identity = _unprefixed()
    status: str | None = _not_a_column(default=None)  # completed | failed; None: the run has not ended
    setting: Setting = _flat(Setting)
    metrics: Metrics = _flat(Metrics)
    cost: Cost = _flat(Cost)
    provenance: Provenance = _flat(Provenance)
    outputs: Outputs = _flat(Outputs, tabled=False)
    error: str | None = None
    failed_epoch: int | None = None
    config: dict[str, Any] = _not_a_column(default_factory=dict)  # resolved

    def to_json(self) -> dict[str, Any]:
        # "method": v1's key for the method's name, which readers of result.json use
        return {"schema_version": SCHEMA_VERSION, **_to_json(self), "method": self.method_name}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        return _from_json(cls, data)

    @classmethod
    def of_config(cls, config: Mapping[str, Any], kind: str | None, method: MethodId | None,
                  teacher_data: str | None = None, **measured: Any) -> RunRecord:
        """A run of `config` (resolved, plain containers): its identity and setting read from it (its
        teacher's data as `teacher_data` names it: kdexp.teachers.data_id), the rest as `measured`."""
        model, teacher, trainer, data = (_node(config, k) for k in ("model", "teacher", "trainer", "data"))
        setting = Setting(
            experiment=config.get("experiment_name"), protocol=config.get("protocol_name"),
            # a run without a teacher may be a teacher or a baseline: only its result says
            kind=kind or ("student" if teacher.get("arch") else None),
            seed=config.get("seed"), epochs=trainer.get("epochs"), data=data.get("name"),
            val_size=data.get("val_size", 0), image_size=data.get("image_size", UNRECORDED["image_size"]),
            label_smoothing=trainer.get("label_smoothing", UNRECORDED["label_smoothing"]),
            clip_norm=trainer.get("clip_norm", 1.0))
        teacher_id = TeacherId.of_config(config, "student", teacher_data) if teacher.get("arch") else None
        return cls(identity=Identity(NetworkId.of(model), teacher_id, method), setting=setting, config=dict(config),
                   **measured)

    @classmethod
    def from_v1(cls, config: Mapping[str, Any], result: Mapping[str, Any] | None,
                method: MethodId | None = None) -> RunRecord:
        """A v1 run: its config (Hydra's `.hydra/config.yaml`, resolved) and its v1 result.json (None:
        not ended), with the method's identity where its class could be told."""
        result = result or {}
        return cls.of_config(config, result.get("kind"), method, status=result.get("status"),
                             metrics=_from_json(Metrics, result), cost=_from_json(Cost, result),
                             provenance=_from_json(Provenance, result), outputs=_from_json(Outputs, result),
                             error=result.get("error"), failed_epoch=result.get("failed_epoch"))

    @property
    def method_name(self) -> str | None:
        return self.identity.method.name if self.identity.method else None

    def columns(self) -> dict[str, Any]:
        """The analysis columns: each part's fields (a nested part's as `<part>_<field>` unless it is
        unprefixed), under the column name a field declares."""
        return _columns(self)


def _node(cfg: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = cfg.get(key)
    return value if isinstance(value, Mapping) else {}


def _to_json(part: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(part):
        value = getattr(part, f.name)
        value = _to_json(value) if dataclasses.is_dataclass(value) else value
        out.update(value if f.metadata.get("flat") else {f.name: value})
    return out


def _from_json(cls: type, data: Mapping[str, Any]) -> Any:
    """`cls` from its JSON (a flat part reads its fields from `data` itself); a missing or
    mistyped key is the field's default, so a hand-edited or older file still reads."""
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        part = _dataclass_in(hints[f.name])
        if f.metadata.get("flat"):
            values[f.name] = _from_json(part, data)
        elif f.name in data:
            raw = data[f.name]
            values[f.name] = (_from_json(part, raw) if isinstance(raw, Mapping) else None) if part else raw
    return cls(**values)


@functools.cache
def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's type names (`Fidelity | None` → Fidelity), or None."""
    options = typing.get_args(hint) or (hint,)
    return next((t for t in options if dataclasses.is_dataclass(t)), None)


def column_types() -> dict[str, type]:
    """Each column a record fills in analysis's run table, in the record's order, with its values'
    type (int, float, str, bool; `object` for containers)."""
    return {name: _scalar(hint) for name, _, hint in _column_fields(RunRecord)}


def _columns(part: Any) -> dict[str, Any]:
    return {name: _follow(part, path) for name, path, _ in _column_fields(type(part))}


@functools.cache  # the same few classes for every run of a tree
def _column_fields(cls: type, prefix: str = "") -> tuple[tuple[str, tuple[str, ...], Any], ...]:
    """(column name, attribute path, type hint) of each column the parts of `cls` make."""
    hints, out = _hints(cls), []
    for f in dataclasses.fields(cls):
        nested = _dataclass_in(hints[f.name])
        if nested:
            if f.metadata.get("column", "") is not None:
                inner = f.metadata.get("prefix", f"{f.name}_")
                out += [(name, (f.name, *path), hint) for name, path, hint in _column_fields(nested, prefix + inner)]
        elif (name := _column_of(f)) is not None:
            out.append((prefix + name, (f.name,), hints[f.name]))
    return tuple(out)


@functools.cache  # typing.get_type_hints evaluates every annotation each call
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _column_of(f: dataclasses.Field) -> str | None:
    if "trains" in f.metadata:  # a teacher's identity: its own rule
        return None if f.metadata["column"] is None else _column_name(f, "column")
    return f.metadata.get("column", f.name)


def _follow(part: Any, path: tuple[str, ...]) -> Any:
    """The value at `path`; None where a part on the way is None (a run without a teacher)."""
    for name in path:
        if part is None:
            return None
        part = getattr(part, name)
    return part


def _scalar(hint: Any) -> type:
    """`int | None` → int; a container → object."""
    options = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
    return options[0] if len(options) == 1 and options[0] in (int, float, str, bool) else object
