"""kdexp's benchmark runs beside the published numbers: CIFAR-100's (`published_cifar100.yaml`),
ImageNet's (`published_imagenet.yaml`); a file `published_<data.name>.yaml` here is one benchmark.

One table per benchmark pair that has kdexp runs: for the teacher, the student alone, and each
published method (KD, CRD, DKD, DIST, ReviewKD, CTKD, MLKD, and those with logit standardisation), kdexp's
mean ± std under the analysis's selection rule, the published figure, and their difference; then
kdexp's best test accuracy over epochs, which is the published numbers' own rule (a checkpoint
chosen on the test set: optimistic for both), for the like-for-like line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

from kdexp.data import dataset

from . import numerics
from .aggregate import model_name
from .rules import RULES, Rule, default_rule
from .stats import mean_std
from .tables import DASH, Table, pct, slug

PUBLISHED_FILE = Path(__file__).with_name("published_cifar100.yaml")
PUBLISHED_PREFIX = "published_"  # published_<data.name>.yaml: the numbers of the benchmark on that data
# The columns of collect()'s frame this module reads (analysis/schema.py), besides the rules' columns.
FRAME_COLUMNS = ["status", "data", "kind", "teacher", "student", "width", "kd", "cell", "seed", "epochs", "val_size",
                 "numerics"]
# A published entry's kdexp counterpart: the teacher's and the student's own runs, or the KD column
# (collect's `kd`, the method's label) of distilled runs of the pair, which is the entry's own key
# (`crd`, `dkd(std)`) except for KD's.
OWN_RUNS = {"teacher": "teacher", "student": "baseline"}
KD_COLUMN = {"kd": "logit"}
ROW_NAMES = {"teacher": "teacher", "student": "student alone (CE)", "kd": "KD", "crd": "CRD", "dkd": "DKD",
             "dist": "DIST", "reviewkd": "ReviewKD", "ctkd": "CTKD", "mlkd": "MLKD", "logit(std)": "KD+LS", "ctkd(std)": "CTKD+LS",
             "dkd(std)": "DKD+LS", "mlkd(std)": "MLKD+LS"}
BEST_TEST = RULES["test"]


@dataclass(frozen=True)
class Source:
    key: str
    citation: str
    verified: str
    selection: Rule     # the source's own selection rule
    evidence: str       # how that rule was established


@dataclass(frozen=True)
class PublishedPair:
    teacher: str
    student: str
    accuracy: dict[str, tuple[float, Source]]  # "kd" -> (percent, source), in the file's order

    @property
    def name(self) -> str:
        return f"{self.teacher}→{self.student}"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's published pairs and the data its runs are on: kdexp's `data.name` of the real
    data, and its generated stand-in `fake_<name>` (same layout), matched too so that a test's tiny run
    shows in the table, with its data named in every row."""
    data: str
    pairs: list[PublishedPair]

    @property
    def datasets(self) -> tuple[str, str]:
        return self.data, f"fake_{self.data}"

    @property
    def title(self) -> str:
        return dataset(self.data).layout.title


def benchmarks() -> list[Benchmark]:
    """Every `published_<data.name>.yaml` beside this module, in name order."""
    return [Benchmark(path.stem.removeprefix(PUBLISHED_PREFIX), load_published(path))
            for path in sorted(PUBLISHED_FILE.parent.glob(f"{PUBLISHED_PREFIX}*.yaml"))]


def load_published(path: Path = PUBLISHED_FILE) -> list[PublishedPair]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    sources = {key: Source(key, s["citation"], s["verified"], RULES[s["selection"]], s["selection_evidence"])
               for key, s in data["sources"].items()}
    return [PublishedPair(p["teacher"], p["student"],
                          {what: (float(e["value"]), sources[e["source"]]) for what, e in p["accuracy"].items()})
            for p in data["pairs"]]


def literature_tables(frame: pd.DataFrame, rule: Rule | None = None) -> list[Table]:
    """A table per published pair with completed runs on its benchmark's data in `frame` (collect()'s
    frame); `rule`: kdexp's selection rule (None: `val` where every run of the benchmark has a
    validation split, else `final`)."""
    return [table for benchmark in benchmarks() for table in _benchmark_tables(benchmark, frame, rule)]


def _benchmark_tables(benchmark: Benchmark, frame: pd.DataFrame, rule: Rule | None) -> list[Table]:
    runs = _benchmark_runs(frame, benchmark)
    if not runs:
        return []
    rule = rule or default_rule(runs)
    return [table for pair in benchmark.pairs if (table := _pair_table(benchmark, pair, runs, rule)) is not None]


def _benchmark_runs(frame: pd.DataFrame, benchmark: Benchmark) -> list[dict[str, Any]]:
    columns = list(dict.fromkeys(FRAME_COLUMNS + [r.column for r in RULES.values()]))
    used = frame.loc[(frame["status"] == "completed") & frame["data"].isin(benchmark.datasets), columns]
    return [{k: (None if _missing(v) else v) for k, v in row.items()} for row in used.to_dict("records")]


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _matches(pair: PublishedPair, what: str, run: dict[str, Any]) -> bool:
    if what in OWN_RUNS:
        network = pair.teacher if what == "teacher" else pair.student
        return run["kind"] == OWN_RUNS[what] and run["student"] == network
    return (run["kind"] == "student" and run["teacher"] == pair.teacher and run["student"] == pair.student
            and run["kd"] == KD_COLUMN.get(what, what))


def _groups(runs: Iterable[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Runs of one configuration and numerics: same network width, method cell, epochs, data and
    numerics (seeds vary; a fast and a reference run are never averaged together)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        key = (run["student"], run["width"], run["cell"] or DASH, run["epochs"], run["data"], run["numerics"])
        groups.setdefault(key, []).append(run)
    return dict(sorted(groups.items(), key=lambda item: tuple(str(k) for k in item[0])))


def _pair_table(benchmark: Benchmark, pair: PublishedPair, runs: list[dict[str, Any]], rule: Rule) -> Table | None:
    rows, sources, shown = [], {}, []
    for what, (value, source) in pair.accuracy.items():
        sources[source.key] = source
        matched = [r for r in runs if _matches(pair, what, r)]
        shown += matched
        label = ROW_NAMES.get(what, what)
        if not matched:
            rows.append([label, DASH, DASH, DASH, DASH, "0", DASH, f"{value:.2f}", DASH, DASH, DASH, _cite(source)])
        for (arch, width, cell, epochs, data, kind), group in _groups(matched).items():
            mean, std = _stat(group, rule.column)
            best, best_std = _stat(group, BEST_TEST.column)
            network = model_name(arch, width) + ("" if kind == numerics.REFERENCE else f" ({kind or numerics.UNRECORDED})")
            rows.append([label, network, cell, str(epochs), data, str(len(group)),
                         pct(mean, std), f"{value:.2f}", _delta(mean, value), pct(best, best_std),
                         _delta(best, value), _cite(source)])
    if not shown:
        return None
    columns = ["Run", "Network", "Cell", "Epochs", "Data", "Seeds", f"kdexp {rule.label}", "Published",
               "Δ (pp)", f"kdexp {BEST_TEST.label}", "Δ best test (pp)", "Published: source, rule"]
    return Table(f"literature_{slug(pair.name)}", f"{pair.name} on {benchmark.title}: kdexp beside the published "
                 f"numbers", columns, rows, _notes(benchmark, rule, sources.values(), shown))


def _cite(source: Source) -> str:
    return f"{source.key}, {source.selection.label}"


def _stat(group: list[dict[str, Any]], column: str) -> tuple[float, float]:
    return mean_std([r[column] for r in group if r[column] is not None])


def _delta(mean: float, published: float) -> str:
    """kdexp minus published, in percentage points (kdexp's accuracies are fractions)."""
    return DASH if math.isnan(mean) else f"{100 * mean - published:+.2f}"


def _notes(benchmark: Benchmark, rule: Rule, sources: Iterable[Source], runs: list[dict[str, Any]]) -> list[str]:
    notes = [f"kdexp {rule.label}: mean ± sample std over seeds; selection rule `{rule.name}`: {rule.description}.",
             f"kdexp {BEST_TEST.label}: selection rule `{BEST_TEST.name}`, the published numbers' own rule, "
             f"for the like-for-like line: {BEST_TEST.description}.",
             "Δ: kdexp's mean minus the published number, in percentage points."]
    notes += [f"Source {s.key}: {s.citation}; figures as read from {s.verified} Selection rule `{s.selection.name}` "
              f"({s.selection.short}): {s.evidence}" for s in sources]
    if text := numerics.note(runs):
        notes.append(text)
    if any(r["data"] != benchmark.data for r in runs):
        notes.append(f"Rows on generated data ({benchmark.datasets[1]}) only show the table works: their accuracies "
                     "say nothing about the published ones.")
    return notes
