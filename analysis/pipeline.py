"""collect()'s frame → every table, the missing / failed / skipped list and the missing cells."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import pandas as pd

from .aggregate import UNNAMED, Experiment, group_by_experiment, run_records
from .canary import Canary, canary_table, provenance_table
from .expected import UNFINISHED_STATUSES, CellState, problem_cells, unfinished_runs
from .literature import literature_tables
from .rules import RULES, Rule, default_rule, rule_note
from .tables import Table, comparison, experiment_tables


@dataclass
class Analysis:
    frame: pd.DataFrame
    experiments: list[Experiment]
    tables: dict[str, list[Table]]           # experiment name → its tables
    problems: Table                          # runs not averaged in, and why
    cells: list[CellState]                   # expected cells without a completed run
    unfinished: dict[str, int]               # status → failed/corrupt/unknown-method/incomplete runs of configs never completed
    shared: list[Table] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)  # --experiment names no run has
    canaries: list[Canary] = field(default_factory=list)  # the GPU checks found under the roots
    provenance: list[Table] = field(default_factory=list)  # the canaries' table, the runs' code and environment

    @property
    def complete(self) -> bool:
        """What --strict checks: no expected cell missing, no configuration only failed, every
        selected experiment found."""
        return not self.cells and not sum(self.unfinished.values()) and not self.not_found

    def incomplete_text(self) -> str:
        """`2 expected cell(s) missing or failed; runs of configurations that never completed: 1 failed, 1 corrupt`."""
        runs = ", ".join(f"{n} {status}" for status, n in self.unfinished.items() if n) or "none"
        text = (f"{len(self.cells)} expected cell(s) missing or failed; runs of configurations that never "
                f"completed: {runs}")
        return text + (f"; no run of experiment {', '.join(self.not_found)}" if self.not_found else "")

    def cells_table(self) -> Table:
        rows = [[c.experiment, c.family, c.cell, c.state, "; ".join(c.run_dirs) or "-"] for c in self.cells]
        return Table("missing_cells", "Missing cells of the expected grid",
                     ["Experiment", "Sweep / group", "Cell", "State", "Run dirs"], rows,
                     ["Expected cells come from each job's Hydra sweep (.hydra/hydra.yaml: "
                      "hydra.sweeper.params and hydra.overrides.task) and, for the study's files, from "
                      "protocol v2's seeds."])


def analyse(frame: pd.DataFrame, select: str | None = None,
            only: Iterable[str] | None = None, canaries: Iterable[Canary] = ()) -> Analysis:
    """Tables per experiment (all of them, or those named in `only`) under rule `select`
    (None: each experiment's default, `val` where its runs have a validation split), and the
    provenance tables: `canaries` (canary.find) beside the runs they guarded."""
    runs = run_records(frame)
    usable = [r for r in runs if r["status"] == "completed"]
    problems = [[r["status"], r["reason"] or "", r["experiment"] or "-", r["run_dir"]]
                for r in runs if r["status"] != "completed"]
    problems += [["note", r["notes"], r["experiment"] or "-", r["run_dir"]] for r in usable if r["notes"]]
    only = set(only) if only else None
    present = {r["experiment"] or UNNAMED for r in runs}
    not_found = sorted(only - present) if only else []
    experiments, tables = [], {}
    for name, exp_runs in group_by_experiment(usable).items():
        if only is not None and name not in only:
            problems += [["skipped", f"other experiment {name!r} (not selected with --experiment)", name,
                          r["run_dir"]] for r in exp_runs]
            continue
        rule = RULES[select] if select else default_rule(exp_runs)
        problems += [["skipped", _lacking(rule, r), name, r["run_dir"]]
                     for r in exp_runs if r.get(rule.column) is None]
        exp = Experiment.build(name, exp_runs, rule, rule_note(rule, chosen_by_default=select is None))
        experiments.append(exp)
        # Teachers are matched across experiments: they are usually trained in their own.
        tables[name] = experiment_tables(exp, usable)
    problem_table = Table("problems", "Missing / failed / skipped runs",
                          ["Status", "Reason", "Experiment", "Run dir"], sorted(problems),
                          ["None of these runs is averaged into any table, except 'note' rows "
                           "(complete runs whose curves are partly unreadable)."])
    shared = [t for t in [comparison(experiments)] if t is not None]
    shared += literature_tables(frame, RULES[select] if select else None)  # CIFAR-100 runs beside the published numbers
    cells, unfinished = problem_cells(frame), unfinished_runs(frame)
    if only is not None:  # --strict judges the selected experiments only
        cells = [c for c in cells if c.experiment in only]
        # A run whose config cannot be read may belong to any experiment: it still counts.
        unfinished = unfinished[unfinished["experiment"].isin(only) | unfinished["experiment"].isna()]
    counts = {status: int((unfinished["status"] == status).sum()) for status in UNFINISHED_STATUSES}
    canaries = list(canaries)
    shown = [r for e in experiments for c in e.cells for r in c.runs]
    provenance = [t for t in (canary_table(canaries, shown), provenance_table(shown)) if t is not None]
    return Analysis(frame, experiments, tables, problem_table, cells, counts, shared, not_found, canaries,
                    provenance)


def _lacking(rule: Rule, run: dict) -> str:
    if rule.name == "test" and run["source"] == "study":
        return ("best test unavailable: the study's history has no test accuracy "
                "(not averaged under --select test)")
    if rule.name == "val":
        return "no validation split: test@best-val unavailable (not averaged under --select val)"
    return f"no {rule.short} recorded (not averaged under --select {rule.name})"
