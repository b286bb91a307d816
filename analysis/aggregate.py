"""Usable runs → cells (one configuration, all its seeds), and the matches the tables need:
each student cell's baseline, each pair's teacher, each pair and method's best configuration.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd

from kdexp.models import ARCHS
from kdexp.run_record import NO_KD, TeacherId

from .collect import KNOWN_CONFIG_KEYS
from .rules import Rule
from .stats import Comparison, compare, mean_std

# What makes two runs the same configuration (their seeds then vary within a cell).
# What a baseline must share with a distilled student to be its reference.
STUDENT_CONTEXT = ("student", "stem", "width", "init", "label_smoothing", "image_size", "epochs", "val_size", "data")
# Which teacher: its identity's columns (kdexp.run_record.TeacherId); its data and image size are the
# student context's (a student's teacher is looked up on the student's data).
TEACHER_FIELDS = tuple(TeacherId().columns())
# What a pair's rows share; the method and its hyperparameters vary within a pair.
PAIR_CONTEXT = TEACHER_FIELDS + STUDENT_CONTEXT
# What makes two runs the same configuration (their seeds then vary within a cell).
CELL_FIELDS = ("kind", *PAIR_CONTEXT, "kd", "hparams")
# Run columns that are no configuration but must never be averaged together: where one varies between
# runs of what would be one cell it joins the cell key, as a varying config key does (extra_keys);
# elsewhere every run of a cell has the same value, which Cell[...] reads from its runs.
SPLIT_COLUMNS = ("numerics",)
UNNAMED = "(unnamed)"  # the experiment of a run whose config does not name one (or cannot be read)


def model_name(arch: Any, width: Any) -> str:
    """`resnet18`, or `resnet18(w8)` for a width other than the published network's (64 for the
    torchvision ResNets, 32 for resnet8x4, ...): a width-16 teacher distilled into a width-8 student
    of the same architecture must not read `resnet18→resnet18`."""
    published = ARCHS[arch].reference_width if arch in ARCHS else None
    return f"{arch}(w{width})" if width not in (None, published) and arch else str(arch)


def clean(value: Any) -> Any:
    """NaN / pd.NA → None, numpy scalars → Python, so keys compare and hash predictably."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value


def run_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: clean(v) for k, v in row.items()} for row in frame.to_dict("records")]


@dataclass
class Cell:
    """One configuration of one experiment and its runs, one per seed."""

    experiment: str
    key: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        if name in self.key or name not in SPLIT_COLUMNS:
            return self.key.get(name)
        return self.runs[0].get(name)

    def values(self, column: str) -> tuple[list[float], list[int]]:
        """The runs' values of `column` that exist, and those runs' seeds."""
        pairs = sorted((r["seed"], r[column]) for r in self.runs if r.get(column) is not None)
        return [v for _, v in pairs], [s for s, _ in pairs]

    def stat(self, column: str) -> tuple[float, float, int]:
        values, _ = self.values(column)
        return (*mean_std(values), len(values))

    @property
    def student_name(self) -> str:
        return model_name(self["student"], self["width"])

    @property
    def teacher_name(self) -> str | None:
        return model_name(self["teacher"], self["teacher_width"]) if self["teacher"] else None

    @property
    def pair_name(self) -> str:
        """`resnet34→resnet18`, widths named where they differ from 64; the model alone without a teacher."""
        return f"{self.teacher_name}→{self.student_name}" if self["teacher"] else self.student_name

    @property
    def seeds(self) -> list[int]:
        return sorted(r["seed"] for r in self.runs)

    def context(self, fields: Iterable[str]) -> tuple:
        return tuple(self.key.get(f) for f in fields) + tuple(self.key.get(k) for k in self.extras)

    @property
    def extras(self) -> list[str]:
        return [k for k in self.key if k not in CELL_FIELDS and not k.startswith("method.")]

    @property
    def hparams(self) -> dict[str, Any]:
        """The method's grid cell: {hyperparameter: value}, in the grid's order."""
        return self["hparams"] or {}

    @property
    def grid(self) -> dict[str, str]:
        """The method's grid keys and their display symbols (one method per cell: any run says)."""
        return self.runs[0].get("grid") or {}

    @property
    def cell_label(self) -> str:
        """`α=0.5, T=4`: the grid cell as the method writes it ("" for a method without a grid)."""
        return self.runs[0].get("cell") or ""

    @property
    def method(self) -> str | None:
        """The method class's `name` (`feature` for both `feature` and `feature(bugged)`)."""
        return self.runs[0].get("method")

    @property
    def sort_key(self) -> tuple:
        """The study's order: sorted by (teacher or "-", student, kd, the grid cell's values, stem)."""
        return (self["teacher"] or "-", self["student"] or "", self["kd"] or "",
                tuple(sortable(v) for v in self.hparams.values()), self["stem"] or "",
                tuple(str(self.key.get(k)) for k in self.key))


def sortable(value: Any) -> tuple:
    """Numbers in numeric order before anything else in text order (None first)."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def kd_labels(cells: Iterable[Cell]) -> list[str]:
    """The KD columns (method labels) among `cells` that distil, alphabetically: one order for
    every table and figure, whatever methods an experiment ran."""
    return sorted({c["kd"] for c in cells if c["kd"] not in (None, NO_KD)})


def extra_keys(runs: list[dict[str, Any]]) -> list[str]:
    """Config keys without a column that differ between runs of what would be one cell.

    A sweep over e.g. trainer.lr must not be averaged into one row: such keys join the cell key.
    """
    by_cell: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        by_cell[tuple(repr(run.get(f)) for f in CELL_FIELDS)].append(run)
    varying: set[str] = set()
    for same in by_cell.values():
        if len(same) < 2:
            continue
        keys = set().union(*(r["config"] for r in same), SPLIT_COLUMNS) - KNOWN_CONFIG_KEYS - varying
        for key in keys:
            if len({repr(setting(r, key)) for r in same}) > 1:
                varying.add(key)
    return sorted(varying)


def setting(run: dict[str, Any], key: str) -> Any:
    """A run's value of an extra key: a split column, or a key of its configuration."""
    return run.get(key) if key in SPLIT_COLUMNS else (run["config"] or {}).get(key)


@dataclass
class Experiment:
    """The cells of one experiment, with the lookups the tables need."""

    name: str
    cells: list[Cell]
    extras: list[str]
    rule: Rule
    rule_note: str  # printed under every table

    @classmethod
    def build(cls, name: str, runs: list[dict[str, Any]], rule: Rule, rule_note: str) -> "Experiment":
        extras = extra_keys(runs)
        cells: dict[tuple, Cell] = {}
        for run in runs:
            key = {f: run.get(f) for f in CELL_FIELDS}
            key.update({k: setting(run, k) for k in extras})
            ident = tuple(repr(v) for v in key.values())
            cells.setdefault(ident, Cell(name, key)).runs.append(run)
        return cls(name, sorted(cells.values(), key=lambda c: c.sort_key), extras, rule, rule_note)

    def of_kind(self, *kinds: str) -> list[Cell]:
        return [c for c in self.cells if c["kind"] in kinds]

    def acc(self, cell: Cell) -> tuple[list[float], list[int]]:
        """The selected accuracy (the rule's column) of a cell's runs, and their seeds."""
        return cell.values(self.rule.column)

    def baseline_for(self, cell: Cell) -> Cell | None:
        context = cell.context(STUDENT_CONTEXT)
        matches = [b for b in self.of_kind("baseline") if b.context(STUDENT_CONTEXT) == context]
        return matches[0] if len(matches) == 1 else None

    def versus_baseline(self, cell: Cell) -> Comparison | None:
        base = self.baseline_for(cell)
        if base is None:
            return None
        (a, a_seeds), (b, b_seeds) = self.acc(cell), self.acc(base)
        return compare(a, a_seeds, b, b_seeds) if a and b else None

    def pairs(self) -> dict[tuple, list[Cell]]:
        """Student cells by pair context (teacher, student, stems, widths, epochs, ...)."""
        pairs: dict[tuple, list[Cell]] = defaultdict(list)
        for cell in self.of_kind("student"):
            pairs[cell.context(PAIR_CONTEXT)].append(cell)
        return dict(pairs)

    def pair_label(self, cell: Cell) -> str:
        """The name of the student cell's pair in file names and plots: `resnet34→resnet18`, then
        ` #2`, ` #3` for further pairs of the same teacher and student (another stem, width, teacher
        seed, ...), so no two pairs share a file or an axis position."""
        labels, taken = {}, Counter()
        for context, cells in sorted(self.pairs().items(), key=lambda item: repr(item[0])):
            name = cells[0].pair_name
            taken[name] += 1
            labels[context] = name if taken[name] == 1 else f"{name} #{taken[name]}"
        return labels[cell.context(PAIR_CONTEXT)]

    def selection_column(self, cells: list[Cell]) -> str:
        """Configs are chosen on val accuracy when every run has one (as the study's stage 1)."""
        has_val = all(r.get("best_val_acc") is not None for c in cells for r in c.runs)
        return "best_val_acc" if has_val else self.rule.column

    def method_cells(self, cells: list[Cell], kd: str) -> list[Cell]:
        """The cells of one method's grid that have the selected accuracy."""
        return [c for c in cells if c["kd"] == kd and self.acc(c)[0]]

    def selection_seeds(self, cells: list[Cell], kd: str) -> list[int]:
        """The seeds every cell of the method's grid ran: the best configuration is chosen on
        these only (a cell with five seeds against cells with one would otherwise be judged on
        other seeds than they were, as with the study's selection stage beside its finals)."""
        candidates = self.method_cells(cells, kd)
        if not candidates:
            return []
        column = self.selection_column(candidates)
        return sorted(set.intersection(*(set(c.values(column)[1]) for c in candidates)))

    def best_config(self, cells: list[Cell], kd: str) -> Cell | None:
        """Best cell of one method: highest mean selection accuracy on the seeds every cell ran
        (on each cell's own seeds where no seed is shared by all); ties keep the table's order."""
        candidates = self.method_cells(cells, kd)
        if not candidates:
            return None
        column, seeds = self.selection_column(candidates), set(self.selection_seeds(cells, kd))

        def score(cell: Cell) -> float:
            values = [v for v, s in zip(*cell.values(column)) if not seeds or s in seeds]
            return mean_std(values)[0] if values else -math.inf
        return max(candidates, key=score)  # max keeps the first of equals: the table's order


def teacher_runs(cell: Cell, runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The completed teacher runs a student cell distilled from (any experiment: teachers are
    usually trained in their own): those on the cell's data that trained the teacher it names."""
    named = TeacherId.of_row(cell, "student")
    return [r for r in runs if r["kind"] == "teacher" and r["data"] == cell["data"]
            and TeacherId.of_row(r, "trains") == named]


def group_by_experiment(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_name: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_name[run["experiment"] or UNNAMED].append(run)
    return dict(sorted(by_name.items()))
