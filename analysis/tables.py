"""The paper's tables, as rows of display strings (percent, two decimals, mean ± sample std).

Each builder takes an `aggregate.Experiment` and returns `Table`s; `render` turns them into
Markdown, LaTeX, CSV and HTML. Accuracies are fractions in the runs and percent here.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import numerics
from .aggregate import CELL_FIELDS, PAIR_CONTEXT, Cell, Experiment, kd_labels, sortable, teacher_runs
from .stats import LEVEL, POWER, Comparison, compare, mean_std

DASH = "-"
# Cell fields shown as a column only when they take more than one value in a table.
# Widths are in the model names (aggregate.model_name).
_OPTIONAL_COLUMNS = {"teacher_stem": "Teacher stem", "teacher_seed": "Teacher seed", "teacher_init": "Teacher init",
                     "teacher_label_smoothing": "Teacher label smoothing", "init": "Init",
                     "label_smoothing": "Label smoothing", "image_size": "Image size", "epochs": "Epochs",
                     "val_size": "Val split", "data": "Data", "numerics": "Numerics"}
STD_NOTE = "Values: mean ± sample std (ddof=1) over seeds, in %; a single seed shows the mean alone."
COMPARED_SEEDS_NOTE = (" Each row's value is taken on the seeds its Δ compares (the reference row's: on those of "
                       "the Δs against it), so a Δ is the difference of the two values it sits between; a row "
                       "that ran other seeds too shows its value on all of them after it.")


@dataclass
class Table:
    name: str                 # file stem
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- formatting
def pct(mean: float, std: float = math.nan) -> str:
    """`95.37 ± 0.18`, as the study prints it; the mean alone where there is no std."""
    if mean is None or math.isnan(mean):
        return DASH
    return f"{100 * mean:.2f}" if std is None or math.isnan(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def pp(delta: float) -> str:
    return DASH if delta is None or math.isnan(delta) else f"{100 * delta:+.2f}"


def ci_text(ci: tuple[float, float]) -> str:
    low, high = ci
    return DASH if math.isnan(low) or math.isnan(high) else f"[{100 * low:+.2f}, {100 * high:+.2f}]"


def p_text(p: float) -> str:
    if p is None or math.isnan(p):
        return DASH
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def num(value: Any) -> str:
    return DASH if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def slug(text: str) -> str:
    """A file-name-safe form: `resnet34→resnet18 #2` → `resnet34_to_resnet18_2`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("→", "_to_")).strip("_")


def seeds_text(seeds: list[int]) -> str:
    return f"{len(seeds)} {seeds}"


def stat_text(cell: Cell, column: str) -> str:
    mean, std, _ = cell.stat(column)
    return pct(mean, std)


def compared_stat_text(cell: Cell, column: str, comps: Iterable[Comparison | None]) -> str:
    """The cell's mean ± std on the seeds its Δ (`comps`: those it is a side of) compares, so a Δ is
    the difference of the two means it sits between; where the cell ran other seeds too, its figure on
    all of them follows (kept visible, never mixed in)."""
    values, seeds = cell.values(column)
    compared = sorted(set(seeds) & {s for comp in comps if comp is not None for s in comp.seeds})
    every = pct(*mean_std(values))
    if not compared or len(compared) == len(seeds):
        return every
    on = pct(*mean_std([v for v, s in zip(values, seeds) if s in compared]))
    return f"{on} (seeds {', '.join(map(str, compared))}; all {len(seeds)} seeds: {every})"


def verdict(comp: Comparison | None) -> str:
    if comp is None or comp.within_noise is None:
        return "n/a (needs ≥2 shared seeds)"
    if comp.within_noise:
        return "within noise"
    return "significant gain" if comp.delta > 0 else "significant loss"


def unmatched_text(comp: Comparison | None, sides: tuple[str, str]) -> str:
    """The seeds one side ran and the other did not: left out of Δ, so listed."""
    if comp is None:
        return DASH
    parts = [f"{side}: {', '.join(map(str, seeds))}" for side, seeds in zip(sides, (comp.only_a, comp.only_b))
             if seeds]
    return "; ".join(parts) or DASH


def comparison_headers(delta: str) -> list[str]:
    return [f"{delta} (pp)", "95% CI (pp)", "Test, seeds compared", "p", "Verdict", "Detectable Δ (pp)",
            "Seeds for Δ", "Seeds not compared", "p (Welch, for reference)"]


def comparison_values(comp: Comparison | None, sides: tuple[str, str]) -> list[str]:
    """The cells under `comparison_headers`: Δ, then the CI, p and verdict of one test, named with its
    seeds, and what those seeds can detect."""
    if comp is None:
        return [DASH] * 9
    return [pp(comp.delta), ci_text(comp.ci), comp.basis, p_text(comp.p), verdict(comp), detectable_text(comp),
            seeds_needed_text(comp), unmatched_text(comp, sides), p_text(comp.welch_p)]


def detectable_text(comp: Comparison | None) -> str:
    """The smallest |Δ| the compared seeds detect (`±0.45`)."""
    return DASH if comp is None or comp.power is None else f"±{100 * comp.power.detectable:.2f}"


MANY_SEEDS = 1000  # beyond this a seed count says only that seeds will not tell


def seeds_needed_text(comp: Comparison | None) -> str:
    """The seeds the observed Δ needs to be detected (`14`; `> 1000`, `never` for a Δ of 0)."""
    if comp is None or comp.power is None:
        return DASH
    needed = comp.power.seeds_needed
    if needed is None:
        return "never (Δ = 0)"
    return f"> {MANY_SEEDS}" if needed > MANY_SEEDS else str(needed)


def noise_answer(comp: Comparison) -> str:
    """Whether a Δ exceeds seed noise, and if not, what it would take to tell: one phrase."""
    if comp.within_noise is None:
        return f"{pp(comp.delta)} pp, {comp.basis}: too few seeds to tell"
    seeds = f"{comp.n} seeds"
    if not comp.within_noise:
        return f"{pp(comp.delta)} pp exceeds seed noise ({seeds})"
    if comp.power is None:  # Welch's test: no paired power
        return f"{pp(comp.delta)} pp within noise ({comp.basis})"
    tell = ("no number of seeds tells a Δ of 0" if comp.power.seeds_needed is None
            else f"this Δ needs {seeds_needed_text(comp)} seeds")
    return f"{pp(comp.delta)} pp within noise ({seeds} detect {detectable_text(comp)} pp; {tell})"


POWER_NOTE = (
    f"Detectable Δ: the smallest |Δ| the compared seeds detect with {POWER:.0%} power at α = {1 - LEVEL:.2g} "
    "(two-sided, paired t); Seeds for Δ: the seeds the observed Δ would need for that power. Both take "
    "the paired differences as normal and their observed std as the true one (statsmodels' TTestPower "
    "on the differences); '-' where there is no paired test.")
COMPARISON_NOTE = (
    "Δ: on the seeds both sides ran, paired by seed (paired t-test; Welch's t-test where the paired "
    "differences are all equal); a seed only one side ran is listed under 'Seeds not compared', never "
    "averaged into one side. Without a shared seed: Welch's t-test on all seeds, unpaired. The 95% CI, "
    "p and the verdict come from the one test named beside them; 'within noise': that CI contains 0. "
    "p (Welch, for reference): Welch's t-test (scipy.stats.ttest_ind, unequal variances), the test the "
    "study reports, on the same seeds; where the test is 'paired t' it is not the verdict's test, so a "
    "Welch p below 0.05 may stand beside 'within noise' and the reverse. " + POWER_NOTE)


def delta_text(comp: Comparison | None) -> str:
    if comp is None:
        return DASH
    noise = {True: " (within noise)", False: "", None: " (n<2)"}[comp.within_noise]
    return pp(comp.delta) + noise


def config_text(cell: Cell | None) -> str:
    """`α=0.5, T=4 (n=3)`: a method's grid cell as the method writes it, and its number of seeds."""
    if cell is None:
        return DASH
    return f"{cell.cell_label or DASH} (n={len(cell.runs)})"


# ---------------------------------------------------------------- column helpers
def _varying(cells: Iterable[Cell], fields: Iterable[str]) -> list[str]:
    cells = list(cells)
    return [f for f in fields if len({repr(c[f]) for c in cells if c[f] is not None}) > 1]


def _optional(cells: list[Cell], exp: Experiment, shown: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(fields, headers) of the optional and extra-config columns that vary across `cells`, but for
    those the table `shown` already."""
    fields = _varying(cells, [f for f in dict.fromkeys(list(_OPTIONAL_COLUMNS) + exp.extras) if f not in shown])
    return fields, [_OPTIONAL_COLUMNS.get(f, f) for f in fields]


def _values(cell: Cell, fields: list[str]) -> list[str]:
    return [num(cell[f]) for f in fields]


def grid_keys(cells: Iterable[Cell]) -> list[str]:
    """The grid keys of every method among `cells`, in order of first appearance: one column each."""
    return list(dict.fromkeys(key for c in cells for key in c.grid))


def identity_headers(keys: list[str]) -> list[str]:
    """Teacher, Student, KD, one column per grid key (alpha, T, ...), Stem: the study's grouping columns."""
    return ["Teacher", "Student", "KD", *keys, "Stem"]


def _identity(cell: Cell, keys: list[str]) -> list[str]:
    """The values under `identity_headers(keys)`; '-' under a key the cell's method does not have."""
    return [cell.teacher_name or DASH, cell.student_name, str(cell["kd"]),
            *(num(cell.hparams.get(key)) for key in keys), str(cell["stem"] or DASH)]
STUDY_METRICS = [("best_val_acc", "Val acc (%)"), ("test_at_best_val", "Test@best (%)"),
                 ("test_final", "Test@final (%)")]


def _rule_notes(exp: Experiment, cells: Iterable[Cell | None],
                more_runs: Iterable[dict[str, Any]] = ()) -> list[str]:
    """What every table says first: the selection rule, and its runs' numerics where they are not all
    the reference (`cells` and `more_runs`, e.g. teacher runs: the runs the table's numbers come from)."""
    notes = [exp.rule_note]
    if exp.rule.optimistic:
        notes.append("OPTIMISTIC: best test accuracy over epochs selects the checkpoint on the test set.")
    runs = {id(r): r for c in cells if c is not None for r in c.runs}  # a baseline shown twice counts once
    runs.update((id(r), r) for r in more_runs)
    if text := numerics.note(runs.values()):
        notes.append(text)
    return notes


def _with_baselines(exp: Experiment, cells: list[Cell]) -> list[Cell | None]:
    """`cells` and the baselines their Δs are taken against."""
    return cells + [exp.baseline_for(c) for c in cells]


# ---------------------------------------------------------------- 1. key results
def runs_table(exp: Experiment, cells: list[Cell], name: str, title: str) -> Table:
    """The study's aggregation: one row per configuration, val / test@best / test@final."""
    fields, headers = _optional(cells, exp)
    metrics = list(STUDY_METRICS)
    if exp.rule.name == "test":
        metrics.append(("best_test", "Best test (%) (optimistic)"))
    keys = grid_keys(cells)
    columns = identity_headers(keys) + headers + ["Seeds"] + [h for _, h in metrics]
    rows = [_identity(c, keys) + _values(c, fields) + [seeds_text(c.seeds)]
            + [stat_text(c, col) for col, _ in metrics] for c in cells]
    notes = _rule_notes(exp, cells) + [
        STD_NOTE, "Test@best: test accuracy at the best-validation epoch; Test@final: after the last epoch."]
    return Table(name, title, columns, rows, notes)


def key_results(exp: Experiment) -> list[Table]:
    tables = []
    students = exp.of_kind("student", "baseline")
    if students:
        tables.append(runs_table(exp, students, "key_results", f"Key results: {exp.name}"))
    teachers = exp.of_kind("teacher")
    if teachers:
        tables.append(runs_table(exp, teachers, "teachers", f"Teachers: {exp.name}"))
    return tables


def pair_summary(exp: Experiment, all_runs: list[dict[str, Any]]) -> Table | None:
    """Per pair: teacher, baseline, gap, and each KD method's best configuration and its Δ."""
    pairs = exp.pairs()
    if not pairs:
        return None
    label = exp.rule.label
    context = [f for f in _OPTIONAL_COLUMNS if f in PAIR_CONTEXT] + [k for k in exp.extras
                                                                    if not k.startswith("method.")]
    fields = _varying([cells[0] for cells in pairs.values()], context)
    headers = [_OPTIONAL_COLUMNS.get(f, f) for f in fields]
    methods = kd_labels(exp.of_kind("student"))
    columns = (["Teacher", "Student", "Stem"] + headers + ["Teacher (%)", "Baseline (%)", "Gap (pp)"]
               + [f"{kd} {what}" for kd in methods for what in ("best", "Δ (pp)", "seeds for Δ")] + ["Best method"])
    rows, used_fidelity, unmatched, chosen_on, answers = [], False, [], {}, []
    shown: list[Cell | None] = []
    teachers: list[dict[str, Any]] = []
    for cells in sorted(pairs.values(), key=lambda cs: cs[0].sort_key):
        ref = cells[0]
        teacher_mean, teacher_text, from_fidelity = _teacher_acc(exp, ref, cells, all_runs)
        used_fidelity |= from_fidelity
        base = exp.baseline_for(ref)
        shown += [*cells, base]
        teachers += teacher_runs(ref, all_runs)
        base_mean, base_std = mean_std(exp.acc(base)[0]) if base else (math.nan, math.nan)
        gap = teacher_mean - base_mean
        best = {kd: exp.best_config(cells, kd) for kd in methods}
        comps = {kd: exp.versus_baseline(c) if c else None for kd, c in best.items()}
        for kd, c in best.items():
            if c is not None:
                chosen_on[f"{exp.pair_label(ref)} {kd}"] = exp.selection_seeds(cells, kd)
            if (text := unmatched_text(comps[kd], ("KD", "baseline"))) != DASH:
                unmatched.append(f"{exp.pair_label(ref)} {kd}: {text}")
        if told := [f"{kd} {noise_answer(comp)}" for kd, comp in comps.items() if comp is not None]:
            answers.append(f"Beyond seed noise? {exp.pair_label(ref)}: {'; '.join(told)}.")
        rows.append([str(ref.teacher_name), ref.student_name, str(ref["stem"])] + _values(ref, fields) + [
            teacher_text, pct(base_mean, base_std), pp(gap)]
            + [text for kd in methods for text in (config_text(best[kd]), delta_text(comps[kd]),
                                                   seeds_needed_text(comps[kd]))]
            + [_best_method(exp, base, best, comps)])
    notes = _rule_notes(exp, shown, teachers) + [
        f"All accuracies: {label}. Gap = teacher − baseline; Δ = best configuration − baseline "
        "(percentage points) on every seed both ran, paired by seed; 'within noise': its 95% CI contains 0 "
        "(test and seeds: see the significance table). Best method: the largest such Δ ('none (baseline)' "
        "where no method gains).",
        "Teacher: the teacher run the students distilled from (same architecture, stem, width, init, label "
        "smoothing, data, image size and seed = teacher.seed).",
        _best_config_note(exp, label), selection_seeds_note(chosen_on)]
    if unmatched:
        notes.append("Seeds not in Δ (run by one side only): " + "; ".join(unmatched) + ".")
    notes += answers
    if answers:
        notes.append(POWER_NOTE)
    if used_fidelity:
        notes.append("† no teacher run found: the teacher's test accuracy recorded in the students' "
                     "fidelity data (teacher_test_acc), averaged over those runs.")
    return Table("pairs", f"Per pair: {exp.name}", columns, rows, notes)


def _best_config_note(exp, label: str) -> str:
    how = ("Best configuration per pair and method: highest mean {} over the grid, on the seeds every cell of "
           "the grid ran (a cell's further seeds do not enter the choice); n = all seeds of that configuration, "
           "on which its Δ is reported.")
    if exp.selection_column(exp.of_kind("student")) == "best_val_acc":
        return how.format("validation accuracy")
    # Without a validation split the grid cell is picked on test numbers: say so, as for `--select test`.
    return how.format(label) + (" No validation split: the cell is chosen on the test set (as the study's v1 "
                                "did), so each best-configuration Δ is OPTIMISTIC.")


def selection_seeds_note(chosen_on: dict[str, list[int]]) -> str:
    """Which seeds each grid's best configuration was chosen on (one line when all agree)."""
    def seeds(values: list[int]) -> str:
        return (f"seed{'s' if len(values) > 1 else ''} {', '.join(map(str, values))}" if values
                else "each cell's own seeds (no seed common to every cell)")
    distinct = {tuple(v) for v in chosen_on.values()}
    if len(distinct) == 1:
        return f"Best configurations chosen on {seeds(list(next(iter(distinct))))}."
    return "Best configurations chosen on: " + "; ".join(f"{k}: {seeds(v)}" for k, v in chosen_on.items()) + "."


def _teacher_acc(exp: Experiment, ref: Cell, cells: list[Cell],
                 all_runs: list[dict[str, Any]]) -> tuple[float, str, bool]:
    values = [r[exp.rule.column] for r in teacher_runs(ref, all_runs) if r.get(exp.rule.column) is not None]
    if values:
        mean, std = mean_std(values)
        return mean, pct(mean, std), False
    recorded = [r["teacher_test_acc"] for c in cells for r in c.runs if r.get("teacher_test_acc") is not None]
    if recorded:
        mean = mean_std(recorded)[0]
        return mean, pct(mean) + " †", True
    return math.nan, DASH, False


def _best_method(exp: Experiment, base: Cell | None, best: dict[str, Cell | None],
                 comps: dict[str, Comparison | None]) -> str:
    """The method whose best configuration gains most over the baseline, each gain on the seeds it
    shares with the baseline (raw means over different seed sets would compare unlike things).
    Without a baseline, each method's gain is its smallest margin over any other method."""
    if base is None:
        found = [kd for kd, c in best.items() if c is not None]
        if len(found) < 2:
            return found[0] if found else DASH
        comps = {kd: min((compare(*exp.acc(best[kd]), *exp.acc(best[other])) for other in found if other != kd),
                         key=lambda c: c.delta if not math.isnan(c.delta) else math.inf)
                 for kd in found}
    gains = {kd: c.delta for kd, c in comps.items() if c is not None and not math.isnan(c.delta)}
    if not gains:
        return DASH
    winner = max(gains, key=gains.get)
    if base is not None and gains[winner] <= 0:
        return "none (baseline)"
    return f"{winner} (within noise)" if comps[winner].within_noise else winner


# ---------------------------------------------------------------- 2. grids
def grids(exp: Experiment) -> list[Table]:
    """Per pair and method: rows the grid's first hyperparameter, columns the others' combinations
    (α × T for `logit`; one column for a one-key grid); mean ± std of the rule's metric."""
    tables = []
    for cells in exp.pairs().values():
        for kd in kd_labels(cells):
            method_cells = [c for c in cells if c["kd"] == kd]
            grid = method_cells[0].grid
            if len(method_cells) < 2 or not grid:
                continue
            row_key, *col_keys = grid
            best = exp.best_config(method_cells, kd)
            # Cells of unlike seed counts (a selection stage beside its finals) say how many.
            uneven = len({len(exp.acc(c)[0]) for c in method_cells}) > 1

            def text(c: Cell) -> str:
                n = len(exp.acc(c)[0])
                return pct(*mean_std(exp.acc(c)[0])) + (f" (n={n})" if uneven else "") + (" *" if c is best else "")
            row_values = _axis(method_cells, [row_key])
            col_values = _axis(method_cells, col_keys)
            rows = [[num(r[0])] + [", ".join(text(c) for c in method_cells
                                             if _at(c, [row_key], r) and _at(c, col_keys, col)) or DASH
                                   for col in col_values] for r in row_values]
            ref = method_cells[0]
            label = exp.pair_label(ref)
            title = (f"{label} ({ref['stem']} stem{_extras_text(exp, ref)}) · {kd}: {' × '.join(grid.values())}, "
                     f"{exp.rule.label} (%)")
            headers = ([", ".join(f"{grid[k]}={num(v)}" for k, v in zip(col_keys, col)) for col in col_values]
                       if col_keys else [f"{exp.rule.label} (%)"])
            notes = _rule_notes(exp, method_cells) + [
                STD_NOTE, "* best configuration: highest mean validation accuracy where runs have a validation "
                "split, else the selected accuracy, on the seeds every cell of this grid ran (a cell's further "
                "seeds do not enter the choice).", selection_seeds_note({kd: exp.selection_seeds(cells, kd)})]
            tables.append(Table(slug(f"grid__{label}__{kd}"), title, [row_key] + headers, rows, notes))
    return tables


def _extras_text(exp: Experiment, cell: Cell) -> str:
    """`, numerics=fast`: the pair's values of the keys that split cells (a pair's grid tables and
    figures differ by these alone, e.g. a grid run in both numerics)."""
    return "".join(f", {k}={num(cell[k])}" for k in exp.extras if not k.startswith("method."))


def _axis(cells: list[Cell], keys: list[str]) -> list[tuple]:
    """The distinct values of `keys` among the cells, in numeric order: one row or column each."""
    values = {tuple(c.hparams.get(k) for k in keys) for c in cells}
    return sorted(values, key=lambda v: tuple(sortable(x) for x in v))


def _at(cell: Cell, keys: list[str], values: tuple) -> bool:
    return tuple(cell.hparams.get(k) for k in keys) == values


# ---------------------------------------------------------------- 4. significance of every Δ
def significance(exp: Experiment) -> Table | None:
    cells = [c for c in exp.of_kind("student") if exp.baseline_for(c) is not None]
    if not cells:
        return None
    fields, headers = _optional(cells, exp)
    keys = grid_keys(cells)
    columns = identity_headers(keys) + headers + comparison_headers("Δ")
    rows = [_identity(c, keys) + _values(c, fields) + comparison_values(exp.versus_baseline(c), ("KD", "baseline"))
            for c in cells]
    notes = _rule_notes(exp, _with_baselines(exp, cells)) + [
        f"Δ = KD − baseline ({exp.rule.label}), percentage points. " + COMPARISON_NOTE,
        "No correction for multiple comparisons: with a whole grid, about 1 in 20 configurations will "
        "look significant by chance."]
    return Table("significance", f"Significance of every Δ vs baseline: {exp.name}", columns, rows, notes)


# ---------------------------------------------------------------- 3. ablations
def sweeps(exp: Experiment) -> Table | None:
    """A method run over one hyperparameter of its grid with the others fixed (kd_grid=tsweep: logit's
    T at α=0.5), each value against the baseline; full grids are in the grid tables."""
    found = []  # (cell, kd, fixed keys, swept key and value)
    for cells in exp.pairs().values():
        for kd in kd_labels(cells):
            method_cells = [c for c in cells if c["kd"] == kd]
            grid = method_cells[0].grid
            varying = [k for k in grid if len({repr(c.hparams.get(k)) for c in method_cells}) > 1]
            if len(grid) < 2 or len(varying) != 1:  # a one-key grid is its own sweep: see its grid table
                continue
            (swept,) = varying
            fixed = ", ".join(f"{grid[k]}={num(method_cells[0].hparams.get(k))}" for k in grid if k != swept)
            found += [(c, kd, fixed, f"{grid[swept]}={num(c.hparams.get(swept))}")
                      for c in sorted(method_cells, key=lambda c: sortable(c.hparams.get(swept)))]
    if not found:
        return None
    shown = [c for c, *_ in found]
    fields, headers = _optional(shown, exp)
    comps = [exp.versus_baseline(c) for c, *_ in found]
    rows = [[c.pair_name, str(c["stem"]), kd, fixed, swept] + _values(c, fields)
            + [seeds_text(c.seeds), compared_stat_text(c, exp.rule.column, [comp])]
            + comparison_values(comp, ("KD", "baseline")) for (c, kd, fixed, swept), comp in zip(found, comps)]
    return Table("ablation_sweep", f"One hyperparameter swept, the others fixed: {exp.name}",
                 ["Pair", "Stem", "KD", "Fixed", "Swept"] + headers + ["Seeds", f"{exp.rule.label} (%)"]
                 + comparison_headers("Δ vs baseline"), rows,
                 _rule_notes(exp, _with_baselines(exp, shown)) + [STD_NOTE + COMPARED_SEEDS_NOTE, COMPARISON_NOTE])


def _ablation_groups(exp: Experiment, ignore: tuple[str, ...]) -> list[list[Cell]]:
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for c in exp.cells:
        groups[tuple(repr(v) for k, v in c.key.items() if k not in ignore)].append(c)
    return list(groups.values())


def stem_ablation(exp: Experiment) -> Table | None:
    """Same configuration with the CIFAR and the ImageNet stem; Δ against the CIFAR-stem cell."""
    rows = []
    groups = [g for g in _ablation_groups(exp, ("stem", "teacher_stem")) if len({c["stem"] for c in g}) > 1]
    shown = [c for g in groups for c in g]
    keys = grid_keys(shown)
    fields, headers = _optional(shown, exp, ("teacher_stem",))
    for group in groups:
        ref = next((c for c in group if c["stem"] == "cifar" and c["teacher_stem"] in (None, "cifar")), None)
        ordered = sorted(group, key=lambda c: (c["stem"] != "cifar", c["stem"], c["teacher_stem"] or ""))
        comps = {id(c): _versus(exp, c, ref) for c in ordered}
        for c in ordered:
            sides = comps.values() if c is ref else [comps[id(c)]]
            rows.append([str(c["kind"]), c.pair_name, str(c["kd"]), *(num(c.hparams.get(k)) for k in keys),
                         str(c["stem"]), str(c["teacher_stem"] or DASH), *_values(c, fields), seeds_text(c.seeds),
                         compared_stat_text(c, exp.rule.column, sides)]
                        + comparison_values(comps[id(c)], (str(c["stem"]), "cifar")))
    if not rows:
        return None
    return Table("ablation_stem", f"CIFAR vs ImageNet stem: {exp.name}",
                 ["Kind", "Pair / model", "KD", *keys, "Stem", "Teacher stem", *headers, "Seeds",
                  f"{exp.rule.label} (%)"] + comparison_headers("Δ vs CIFAR stem"), rows,
                 _rule_notes(exp, shown) + [STD_NOTE + COMPARED_SEEDS_NOTE, COMPARISON_NOTE])


def _versus(exp: Experiment, cell: Cell, ref: Cell | None) -> Comparison | None:
    """cell − ref on the rule's accuracy (None: no reference, or the reference itself)."""
    if ref is None or cell is ref:
        return None
    (a, sa), (b, sb) = exp.acc(cell), exp.acc(ref)
    return compare(a, sa, b, sb) if a and b else None


def variant_ablation(exp: Experiment) -> Table | None:
    """A method's variant against the plain method in the same cell (`feature(bugged)`, v1's
    projections outside the gradient clip, vs `feature`; `logit(std)` vs `logit`), on shared seeds."""
    found = []
    for group in _ablation_groups(exp, ("kd",)):
        for plain in (c for c in group if c["kind"] == "student" and c["kd"] == c.method):
            variants = [c for c in group if c["kind"] == "student" and c.method == plain.method and c is not plain]
            if variants:
                found.append((plain, variants))
    if not found:
        return None
    keys = grid_keys(plain for plain, _ in found)
    shown = [c for plain, variants in found for c in (plain, *variants)]
    fields, headers = _optional(shown, exp)
    rows = []
    for plain, variants in found:
        comps = {id(c): _versus(exp, c, plain) for c in [plain, *variants]}
        for c in [plain, *variants]:
            comp = comps[id(c)]
            rows.append([c.pair_name, str(c["kd"]), *(num(c.hparams.get(k)) for k in keys), *_values(c, fields),
                         seeds_text(c.seeds),
                         compared_stat_text(c, exp.rule.column, comps.values() if c is plain else [comp]),
                         _max_text(c, "grad_norm_max"),
                         _max_text(c, "proj_grad_norm_max"), _mean_pct(c, "clip_fraction"),
                         _mean_pct(c, "clipped_epoch_fraction")]
                        + comparison_values(comp, ("variant", "plain")))
    return Table("ablation_variants", f"Method variants vs the plain method: {exp.name}",
                 ["Pair", "KD", *keys, *headers, "Seeds", f"{exp.rule.label} (%)",
                  "Max pre-clip grad norm", "Max projection grad norm", "Clipped steps (%)",
                  "Epochs clipped (%)"] + comparison_headers("Δ variant − plain"), rows,
                 _rule_notes(exp, shown) + [
                     STD_NOTE + COMPARED_SEEDS_NOTE, "Each variant (`method(variant)`: a switch of the method, e.g. `feature(bugged)`: "
                     "clip_projection=false, the study's v1 bug) against the plain method with the same "
                     "hyperparameters, on the row above it. " + COMPARISON_NOTE,
                     "Gradient norms: the largest over all steps and seeds (pre-clip norm of "
                     "the clipped parameter set; a method's own parameters, e.g. projections, alone). Clipped "
                     "steps: mean over seeds of the fraction of steps whose pre-clip norm exceeded the clip "
                     "threshold (not logged by the study: '-'); epochs clipped: fraction of epochs whose largest "
                     "norm exceeded it."])


def fidelity(exp: Experiment) -> Table | None:
    cells = [c for c in exp.of_kind("student") if c.values("agreement")[0]]
    if not cells:
        return None
    keys = grid_keys(cells)
    fields, headers = _optional(cells, exp)
    rows = [_identity(c, keys) + _values(c, fields)
            + [seeds_text(c.seeds), stat_text(c, "agreement"), _mean_std_plain(c, "kl_t1"),
               _mean_std_plain(c, "kl_t4"), stat_text(c, "teacher_test_acc")] for c in cells]
    return Table("fidelity", f"Teacher fidelity: {exp.name}",
                 identity_headers(keys) + headers
                 + ["Seeds", "Agreement (%)", "KL T=1", "KL T=4", "Teacher test (%)"], rows,
                 _rule_notes(exp, cells) + [STD_NOTE, "Agreement: teacher–student top-1 agreement on the test split; "
                                     "KL(teacher ‖ student) at T=1 and T=4 (nats, not %)."])


def compute(exp: Experiment) -> Table | None:
    """What the runs cost, per configuration and in all: device, precision, s/epoch, hours."""
    cells = [c for c in exp.cells if c.values("train_seconds")[0]]
    if not cells:
        return None
    keys = grid_keys(cells)
    fields, headers = _optional(cells, exp)
    rows = [[str(c["kind"])] + _identity(c, keys) + _values(c, fields)
            + [str(len(c.runs)), _distinct(c, "device"), _distinct(c, "precision"), _per_epoch_text(c), _hours(c.runs)]
            for c in cells]
    every_run = [r for c in cells for r in c.runs]
    rows.append(["Total", *[""] * (len(identity_headers(keys)) + len(fields)), str(len(every_run)), "", "", "",
                 _hours(every_run)])
    return Table("compute", f"Compute: {exp.name}",
                 ["Kind"] + identity_headers(keys) + headers
                 + ["Runs", "Device", "Precision", "Train s/epoch", "Train hours"],
                 rows,
                 _rule_notes(exp, cells) + ["Train s/epoch: each run's training time (result.json train_seconds: the training steps of "
                  "every epoch, across resumes; evaluation excluded) over its epochs, mean ± sample std over "
                  "runs. Train hours: the sum over runs. Device and precision: as each run's result.json records "
                  "them. Training throughput (images/s) is in the cost table, beside accuracy."])


# ---------------------------------------------------------------- cost: parameters, GFLOPs, throughput
COST_NOTE = ("Params: parameters of the network, in millions (result.json params; a method's own, e.g. "
             "projections, not included); GFLOPs/image: one forward pass at the run's input size (result.json "
             "gflops, counted from the model); images/s: measured training throughput, mean over runs. S/T: "
             "student ÷ teacher (the teacher the student distilled from, as the student's run recorded it).")


def cost(exp: Experiment) -> Table | None:
    """Accuracy beside what each configuration costs: parameters, GFLOPs per image, training
    images/s, and for students the teacher's cost and the student/teacher ratios."""
    cells = [c for c in exp.cells if any(c.values(col)[0] for col in ("params_student", "gflops_student",
                                                                       "images_per_s"))]
    if not cells:
        return None
    keys = grid_keys(cells)
    fields, headers = _optional(cells, exp)
    rows = [[str(c["kind"])] + _identity(c, keys) + _values(c, fields)
            + [seeds_text(c.seeds), stat_text(c, exp.rule.column), _millions(_mean(c, "params_student")),
               _gflops(_mean(c, "gflops_student")), _mean_text(c, "images_per_s"),
               _millions(_mean(c, "params_teacher")), _gflops(_mean(c, "gflops_teacher")),
               _ratio(_mean(c, "params_student"), _mean(c, "params_teacher")),
               _ratio(_mean(c, "gflops_student"), _mean(c, "gflops_teacher"))] for c in cells]
    return Table("cost", f"Accuracy and cost: {exp.name}",
                 ["Kind"] + identity_headers(keys) + headers
                 + ["Seeds", f"{exp.rule.label} (%)", "Params (M)", "GFLOPs/image", "Train images/s",
                    "Teacher params (M)", "Teacher GFLOPs/image", "Params S/T", "GFLOPs S/T"],
                 rows, _rule_notes(exp, cells) + [STD_NOTE, COST_NOTE])


def teacher_vs_student(exp: Experiment, all_runs: list[dict[str, Any]]) -> Table | None:
    """The report's comparison, per pair: teacher and student accuracy, the fraction of the
    teacher's accuracy the student keeps, and what each costs (the baseline and each method's best
    configuration)."""
    rows, chosen_on, cells_shown, teachers = [], {}, [], []
    for cells in sorted(exp.pairs().values(), key=lambda cs: cs[0].sort_key):
        ref = cells[0]
        teacher_mean, teacher_text, _ = _teacher_acc(exp, ref, cells, all_runs)
        if math.isnan(teacher_mean):
            continue
        teachers += teacher_runs(ref, all_runs)
        teacher_params = _mean_over(cells, "params_teacher")
        teacher_gflops = _mean_over(cells, "gflops_teacher")
        shown = [("baseline", exp.baseline_for(ref))]
        for kd in kd_labels(cells):
            if (best := exp.best_config(cells, kd)) is not None:
                shown.append((f"{kd} (best: {best.cell_label})" if best.cell_label else kd, best))
                chosen_on[f"{exp.pair_label(ref)} {kd}"] = exp.selection_seeds(cells, kd)
        for what, c in shown:
            if c is None:
                continue
            mean, std = mean_std(exp.acc(c)[0])
            cells_shown.append(c)
            rows.append([exp.pair_label(ref), str(ref["stem"]), what, seeds_text(c.seeds), teacher_text,
                         pct(mean, std), _retained(mean, teacher_mean), _millions(teacher_params),
                         _millions(_mean(c, "params_student")),
                         _ratio(_mean(c, "params_student"), teacher_params), _gflops(teacher_gflops),
                         _gflops(_mean(c, "gflops_student")), _ratio(_mean(c, "gflops_student"), teacher_gflops)])
    if not rows:
        return None
    fields, headers = _optional(cells_shown, exp, ("stem",))
    rows = [row[:3] + _values(c, fields) + row[3:] for row, c in zip(rows, cells_shown)]
    return Table("teacher_vs_student", f"Teacher vs student: {exp.name}",
                 ["Pair", "Stem", "Student", *headers, "Seeds", "Teacher (%)", "Student (%)", "Retained (%)",
                  "Teacher params (M)", "Student params (M)", "Params S/T", "Teacher GFLOPs/image",
                  "Student GFLOPs/image", "GFLOPs S/T"], rows,
                 _rule_notes(exp, cells_shown, teachers) + [
                     STD_NOTE, "Retained: the student's mean accuracy ÷ the teacher's (the teacher run the students "
                     "distilled from; † as in the per-pair table), in %.", COST_NOTE,
                     "Each method's best configuration as in the per-pair table. " + selection_seeds_note(chosen_on)
                     if chosen_on else "Only baselines: no method's best configuration to show."])


def _mean(cell: Cell, column: str) -> float | None:
    values = cell.values(column)[0]
    return mean_std(values)[0] if values else None


def _mean_over(cells: list[Cell], column: str) -> float | None:
    values = [v for c in cells for v in c.values(column)[0]]
    return mean_std(values)[0] if values else None


def _millions(value: float | None) -> str:
    return DASH if value is None else f"{value / 1e6:.3g}"


def _gflops(value: float | None) -> str:
    return DASH if value is None else f"{value:.3g}"


def _ratio(student: float | None, teacher: float | None) -> str:
    return DASH if student is None or not teacher else f"{student / teacher:.3g}"


def _retained(student: float, teacher: float) -> str:
    return DASH if math.isnan(student) or not teacher else f"{100 * student / teacher:.2f}"


def _distinct(cell: Cell, column: str) -> str:
    return ", ".join(sorted({str(r[column]) for r in cell.runs if r.get(column)})) or DASH


def _per_epoch_text(cell: Cell) -> str:
    values = [r["train_seconds"] / r["epochs_completed"] for r in cell.runs
              if r.get("train_seconds") is not None and r.get("epochs_completed")]
    if not values:
        return DASH
    mean, std = mean_std(values)
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _mean_text(cell: Cell, column: str) -> str:
    values = cell.values(column)[0]
    return f"{mean_std(values)[0]:.0f}" if values else DASH


def _hours(runs: list[dict[str, Any]]) -> str:
    return f"{sum(r['train_seconds'] or 0 for r in runs) / 3600:.3f}"


def _max_text(cell: Cell, column: str) -> str:
    values = cell.values(column)[0]
    return f"{max(values):.2f}" if values else DASH


def _mean_pct(cell: Cell, column: str) -> str:
    values = cell.values(column)[0]
    return f"{100 * mean_std(values)[0]:.1f}" if values else DASH


def _mean_std_plain(cell: Cell, column: str) -> str:
    mean, std, n = cell.stat(column)
    if not n:
        return DASH
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


# ---------------------------------------------------------------- across experiments
def comparison(experiments: list[Experiment]) -> Table | None:
    """The same configuration in several experiments side by side (e.g. kdexp's vs the study's), like
    numerics with like (a fast run of a reference configuration is its own row)."""
    if len(experiments) < 2:
        return None
    found: dict[tuple, dict[str, Cell]] = defaultdict(dict)
    for exp in experiments:
        for c in exp.cells:
            found[tuple(repr(c[f]) for f in (*CELL_FIELDS, "numerics"))][exp.name] = c
    shared = [cells for cells in found.values() if len(cells) > 1]
    if not shared:
        return None
    shared.sort(key=lambda cs: next(iter(cs.values())).sort_key)
    rows, keys = [], grid_keys(c for cells in shared for c in cells.values())
    mixed = _varying([next(iter(cells.values())) for cells in shared], ["numerics"])
    for cells in shared:
        ref = next(iter(cells.values()))
        row = [str(ref["kind"])] + _identity(ref, keys) + _values(ref, mixed)
        for exp in experiments:
            c = cells.get(exp.name)
            row.append(f"{stat_text(c, exp.rule.column)} (n={len(exp.acc(c)[0])})" if c else DASH)
        rows.append(row)
    return Table("comparison", "The same configurations across experiments",
                 ["Kind"] + identity_headers(keys) + ["Numerics"] * len(mixed)
                 + [f"{e.name}: {e.rule.label} (%)" for e in experiments], rows,
                 [f"{e.name}: {e.rule_note}" for e in experiments]
                 + [n for n in [numerics.note(r for cells in shared for c in cells.values() for r in c.runs)] if n]
                 + [STD_NOTE, "Each experiment under its own selection rule (in the header)."])


def experiment_tables(exp: Experiment, all_runs: list[dict[str, Any]]) -> list[Table]:
    """Every table of one experiment, in reading order; ablations only where their runs exist."""
    tables = key_results(exp)
    optional = [pair_summary(exp, all_runs), teacher_vs_student(exp, all_runs), significance(exp)]
    tables += [t for t in optional if t is not None]
    tables += grids(exp)
    ablations = [sweeps(exp), stem_ablation(exp),
                 variant_ablation(exp), fidelity(exp), cost(exp), compute(exp)]
    return tables + [t for t in ablations if t is not None]
