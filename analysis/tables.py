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

from .aggregate import CELL_FIELDS, PAIR_CONTEXT, Cell, Experiment, teacher_runs
from .stats import Comparison, compare, mean_std

DASH = "-"
# Cell fields shown as a column only when they take more than one value in a table.
# Widths are in the model names (aggregate.model_name).
_OPTIONAL_COLUMNS = {"teacher_stem": "Teacher stem", "teacher_seed": "Teacher seed", "beta": "beta", "epochs": "Epochs",
                     "val_size": "Val split", "data": "Data"}
STD_NOTE = "Values: mean ± sample std (ddof=1) over seeds, in %; a single seed shows the mean alone."


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
    return [f"{delta} (pp)", "95% CI (pp)", "Test, seeds compared", "p", "Verdict", "Seeds not compared",
            "p (Welch, for reference)"]


def comparison_values(comp: Comparison | None, sides: tuple[str, str]) -> list[str]:
    """The cells under `comparison_headers`: Δ, then the CI, p and verdict of one test, named with its seeds."""
    if comp is None:
        return [DASH] * 7
    return [pp(comp.delta), ci_text(comp.ci), comp.basis, p_text(comp.p), verdict(comp),
            unmatched_text(comp, sides), p_text(comp.welch_p)]


COMPARISON_NOTE = (
    "Δ: on the seeds both sides ran, paired by seed (paired t-test; Welch's t-test where the paired "
    "differences are all equal); a seed only one side ran is listed under 'Seeds not compared', never "
    "averaged into one side. Without a shared seed: Welch's t-test on all seeds, unpaired. The 95% CI, "
    "p and the verdict come from the one test named beside them; 'within noise': that CI contains 0. "
    "p (Welch, for reference): Welch's t-test (scipy.stats.ttest_ind, unequal variances), the test the "
    "study reports, on the same seeds; where the test is 'paired t' it is not the verdict's test, so a "
    "Welch p below 0.05 may stand beside 'within noise' and the reverse.")


def delta_text(comp: Comparison | None) -> str:
    if comp is None:
        return DASH
    noise = {True: " (within noise)", False: "", None: " (n<2)"}[comp.within_noise]
    return pp(comp.delta) + noise


def config_text(cell: Cell | None) -> str:
    if cell is None:
        return DASH
    parts = [f"α={num(cell['alpha'])}"] + ([f"T={num(cell['T'])}"] if cell["T"] is not None else [])
    return ", ".join(parts) + f" (n={len(cell.runs)})"


# ---------------------------------------------------------------- column helpers
def _varying(cells: Iterable[Cell], fields: Iterable[str]) -> list[str]:
    cells = list(cells)
    return [f for f in fields if len({repr(c[f]) for c in cells if c[f] is not None}) > 1]


def _optional(cells: list[Cell], exp: Experiment) -> tuple[list[str], list[str]]:
    """(fields, headers) of the optional and extra-config columns that vary across `cells`."""
    fields = _varying(cells, list(_OPTIONAL_COLUMNS) + exp.extras)
    return fields, [_OPTIONAL_COLUMNS.get(f, f) for f in fields]


def _values(cell: Cell, fields: list[str]) -> list[str]:
    return [num(cell[f]) for f in fields]


def _identity(cell: Cell) -> list[str]:
    """Teacher, Student, KD, alpha, T, Stem: the study's grouping columns."""
    return [cell.teacher_name or DASH, cell.student_name, str(cell["kd"]), num(cell["alpha"]),
            num(cell["T"]), str(cell["stem"] or DASH)]


IDENTITY_HEADERS = ["Teacher", "Student", "KD", "alpha", "T", "Stem"]
STUDY_METRICS = [("best_val_acc", "Val acc (%)"), ("test_at_best_val", "Test@best (%)"),
                 ("test_final", "Test@final (%)")]


def _rule_notes(exp: Experiment) -> list[str]:
    notes = [exp.rule_note]
    if exp.rule.optimistic:
        notes.append("OPTIMISTIC: best test accuracy over epochs selects the checkpoint on the test set.")
    return notes


# ---------------------------------------------------------------- 1. key results
def runs_table(exp: Experiment, cells: list[Cell], name: str, title: str) -> Table:
    """The study's aggregation: one row per configuration, val / test@best / test@final."""
    fields, headers = _optional(cells, exp)
    metrics = list(STUDY_METRICS)
    if exp.rule.name == "test":
        metrics.append(("best_test", "Best test (%) (optimistic)"))
    columns = IDENTITY_HEADERS + headers + ["Seeds"] + [h for _, h in metrics]
    rows = [_identity(c) + _values(c, fields) + [seeds_text(c.seeds)] + [stat_text(c, col) for col, _ in metrics]
            for c in cells]
    notes = _rule_notes(exp) + [
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
    """Per pair: teacher, baseline, gap, the best Logit-/Feature-KD configuration and its Δ."""
    pairs = exp.pairs()
    if not pairs:
        return None
    label = exp.rule.label
    context = [f for f in _OPTIONAL_COLUMNS if f in PAIR_CONTEXT] + [k for k in exp.extras
                                                                    if not k.startswith("method.")]
    fields = _varying([cells[0] for cells in pairs.values()], context)
    headers = [_OPTIONAL_COLUMNS.get(f, f) for f in fields]
    columns = (["Teacher", "Student", "Stem"] + headers
               + ["Teacher (%)", "Baseline (%)", "Gap (pp)", "Logit-KD best", "Logit-KD Δ (pp)",
                  "Feature-KD best", "Feature-KD Δ (pp)", "Best method"])
    rows, used_fidelity, unmatched, chosen_on = [], False, [], {}
    for cells in sorted(pairs.values(), key=lambda cs: cs[0].sort_key):
        ref = cells[0]
        teacher_mean, teacher_text, from_fidelity = _teacher_acc(exp, ref, cells, all_runs)
        used_fidelity |= from_fidelity
        base = exp.baseline_for(ref)
        base_mean, base_std = mean_std(exp.acc(base)[0]) if base else (math.nan, math.nan)
        gap = teacher_mean - base_mean
        best = {kd: exp.best_config(cells, kd) for kd in ("logit", "feature")}
        comps = {kd: exp.versus_baseline(c) if c else None for kd, c in best.items()}
        for kd, c in best.items():
            if c is not None:
                chosen_on[f"{exp.pair_label(ref)} {kd}"] = exp.selection_seeds(cells, kd)
            if (text := unmatched_text(comps[kd], ("KD", "baseline"))) != DASH:
                unmatched.append(f"{exp.pair_label(ref)} {kd}: {text}")
        rows.append([str(ref.teacher_name), ref.student_name, str(ref["stem"])] + _values(ref, fields) + [
            teacher_text, pct(base_mean, base_std), pp(gap),
            config_text(best["logit"]), delta_text(comps["logit"]),
            config_text(best["feature"]), delta_text(comps["feature"]),
            _best_method(exp, base, best, comps)])
    notes = _rule_notes(exp) + [
        f"All accuracies: {label}. Gap = teacher − baseline; Δ = best configuration − baseline "
        "(percentage points) on every seed both ran, paired by seed; 'within noise': its 95% CI contains 0 "
        "(test and seeds: see the significance table). Best method: the largest such Δ ('none (baseline)' "
        "where no method gains).",
        "Teacher: the teacher run the students distilled from (same architecture, stem, width, data and "
        "seed = teacher.seed).",
        _best_config_note(exp, label), selection_seeds_note(chosen_on)]
    if unmatched:
        notes.append("Seeds not in Δ (run by one side only): " + "; ".join(unmatched) + ".")
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
    shares with the baseline (raw means over different seed sets would compare unlike things)."""
    if base is None:
        found = [kd for kd, c in best.items() if c is not None]
        if len(found) != 2:
            return found[0] if found else DASH
        (a, sa), (b, sb) = exp.acc(best["logit"]), exp.acc(best["feature"])
        comps = {"logit": compare(a, sa, b, sb)}
        comps["feature"] = compare(b, sb, a, sa)
    gains = {kd: c.delta for kd, c in comps.items() if c is not None and not math.isnan(c.delta)}
    if not gains:
        return DASH
    winner = max(gains, key=gains.get)
    if base is not None and gains[winner] <= 0:
        return "none (baseline)"
    return f"{winner} (within noise)" if comps[winner].within_noise else winner


# ---------------------------------------------------------------- 2. grids
def grids(exp: Experiment) -> list[Table]:
    """Per pair and method: rows α, columns T (logit) or β (feature); mean ± std of the rule's metric."""
    tables = []
    for cells in exp.pairs().values():
        for kd in sorted({c["kd"] for c in cells}):
            method_cells = [c for c in cells if c["kd"] == kd]
            if len(method_cells) < 2:
                continue
            col_field = "T" if kd == "logit" else "beta"
            best = exp.best_config(method_cells, kd)
            alphas = sorted({c["alpha"] for c in method_cells})
            cols = sorted({c[col_field] for c in method_cells}, key=lambda v: (v is None, v or 0))
            # Cells of unlike seed counts (a selection stage beside its finals) say how many.
            uneven = len({len(exp.acc(c)[0]) for c in method_cells}) > 1
            rows = []
            for alpha in alphas:
                row = [num(alpha)]
                for col in cols:
                    here = [c for c in method_cells if c["alpha"] == alpha and c[col_field] == col]
                    row.append(", ".join(pct(*mean_std(exp.acc(c)[0])) + (f" (n={len(exp.acc(c)[0])})" if uneven else "")
                                         + (" *" if c is best else "") for c in here) or DASH)
                rows.append(row)
            ref = method_cells[0]
            label = exp.pair_label(ref)
            title = f"{label} ({ref['stem']} stem) · {kd}: α × {col_field}, {exp.rule.label} (%)"
            notes = _rule_notes(exp) + [
                STD_NOTE, "* best configuration: highest mean validation accuracy where runs have a validation "
                "split, else the selected accuracy, on the seeds every cell of this grid ran (a cell's further "
                "seeds do not enter the choice).", selection_seeds_note({kd: exp.selection_seeds(cells, kd)})]
            tables.append(Table(slug(f"grid__{label}__{kd}"), title,
                                ["alpha"] + [f"{col_field}={num(v)}" for v in cols], rows, notes))
    return tables


# ---------------------------------------------------------------- 4. significance of every Δ
def significance(exp: Experiment) -> Table | None:
    cells = [c for c in exp.of_kind("student") if exp.baseline_for(c) is not None]
    if not cells:
        return None
    fields, headers = _optional(cells, exp)
    columns = IDENTITY_HEADERS + headers + comparison_headers("Δ")
    rows = [_identity(c) + _values(c, fields) + comparison_values(exp.versus_baseline(c), ("KD", "baseline"))
            for c in cells]
    notes = _rule_notes(exp) + [
        f"Δ = KD − baseline ({exp.rule.label}), percentage points. " + COMPARISON_NOTE,
        "No correction for multiple comparisons: with a whole grid, about 1 in 20 configurations will "
        "look significant by chance."]
    return Table("significance", f"Significance of every Δ vs baseline: {exp.name}", columns, rows, notes)


# ---------------------------------------------------------------- 3. ablations
def temperature_sweep(exp: Experiment) -> Table | None:
    """Logit-KD at one α over several T (kd_grid=tsweep); full α×T grids are in the grid tables."""
    rows = []
    for cells in exp.pairs().values():
        logit = sorted((c for c in cells if c["kd"] == "logit"), key=lambda c: c["T"] or 0)
        if len({c["alpha"] for c in logit}) != 1 or len({c["T"] for c in logit}) < 2:
            continue
        for c in logit:
            rows.append([c.pair_name, str(c["stem"]), num(c["alpha"]), num(c["T"]), seeds_text(c.seeds),
                         stat_text(c, exp.rule.column)]
                        + comparison_values(exp.versus_baseline(c), ("KD", "baseline")))
    if not rows:
        return None
    return Table("ablation_temperature", f"Temperature sweep: {exp.name}",
                 ["Pair", "Stem", "alpha", "T", "Seeds", f"{exp.rule.label} (%)"]
                 + comparison_headers("Δ vs baseline"), rows, _rule_notes(exp) + [STD_NOTE, COMPARISON_NOTE])


def _ablation_groups(exp: Experiment, ignore: tuple[str, ...]) -> list[list[Cell]]:
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for c in exp.cells:
        groups[tuple(repr(v) for k, v in c.key.items() if k not in ignore)].append(c)
    return list(groups.values())


def stem_ablation(exp: Experiment) -> Table | None:
    """Same configuration with the CIFAR and the ImageNet stem; Δ against the CIFAR-stem cell."""
    rows = []
    for group in _ablation_groups(exp, ("stem", "teacher_stem")):
        if len({c["stem"] for c in group}) < 2:
            continue
        ref = next((c for c in group if c["stem"] == "cifar" and c["teacher_stem"] in (None, "cifar")), None)
        for c in sorted(group, key=lambda c: (c["stem"] != "cifar", c["stem"], c["teacher_stem"] or "")):
            comp = None
            if ref is not None and c is not ref:
                (a, sa), (b, sb) = exp.acc(c), exp.acc(ref)
                comp = compare(a, sa, b, sb) if a and b else None
            rows.append([str(c["kind"]), c.pair_name, str(c["kd"]), num(c["alpha"]), num(c["T"]),
                         str(c["stem"]), str(c["teacher_stem"] or DASH), seeds_text(c.seeds),
                         stat_text(c, exp.rule.column)] + comparison_values(comp, (str(c["stem"]), "cifar")))
    if not rows:
        return None
    return Table("ablation_stem", f"CIFAR vs ImageNet stem: {exp.name}",
                 ["Kind", "Pair / model", "KD", "alpha", "T", "Stem", "Teacher stem", "Seeds",
                  f"{exp.rule.label} (%)"] + comparison_headers("Δ vs CIFAR stem"), rows,
                 _rule_notes(exp) + [STD_NOTE, COMPARISON_NOTE])


def clip_ablation(exp: Experiment) -> Table | None:
    """Feature-KD with projections inside (fixed) vs outside (v1's bug) the gradient clipping."""
    rows = []
    for group in _ablation_groups(exp, ("kd",)):
        fixed = next((c for c in group if c["kd"] == "feature"), None)
        bugged = next((c for c in group if c["kd"] == "feature(bugged)"), None)
        if fixed is None or bugged is None:
            continue
        (a, sa), (b, sb) = exp.acc(bugged), exp.acc(fixed)
        comp = compare(a, sa, b, sb) if a and b else None
        for c, label in ((fixed, "true (fixed)"), (bugged, "false (bugged, v1)")):
            rows.append([c.pair_name, num(c["alpha"]), num(c["beta"]), label, seeds_text(c.seeds),
                         stat_text(c, exp.rule.column), _max_text(c, "grad_norm_max"),
                         _max_text(c, "proj_grad_norm_max"), _mean_pct(c, "clip_fraction"),
                         _mean_pct(c, "clipped_epoch_fraction")]
                        + comparison_values(comp if c is bugged else None, ("bugged", "fixed")))
    if not rows:
        return None
    return Table("ablation_clip", f"clip_projection true vs false: {exp.name}",
                 ["Pair", "alpha", "beta", "clip_projection", "Seeds", f"{exp.rule.label} (%)",
                  "Max pre-clip grad norm", "Max projection grad norm", "Clipped steps (%)",
                  "Epochs clipped (%)"] + comparison_headers("Δ bugged − fixed"), rows,
                 _rule_notes(exp) + [
                     STD_NOTE, COMPARISON_NOTE, "Gradient norms: the largest over all steps and seeds (pre-clip norm of "
                     "the clipped parameter set; projections alone). Clipped steps: mean over seeds of the "
                     "fraction of steps whose pre-clip norm exceeded the clip threshold (not logged by the "
                     "study: '-'); epochs clipped: fraction of epochs whose largest norm exceeded it."])


def fidelity(exp: Experiment) -> Table | None:
    cells = [c for c in exp.of_kind("student") if c.values("agreement")[0]]
    if not cells:
        return None
    rows = [_identity(c) + [seeds_text(c.seeds), stat_text(c, "agreement"), _mean_std_plain(c, "kl_t1"),
                            _mean_std_plain(c, "kl_t4"), stat_text(c, "teacher_test_acc")] for c in cells]
    return Table("fidelity", f"Teacher fidelity: {exp.name}",
                 IDENTITY_HEADERS + ["Seeds", "Agreement (%)", "KL T=1", "KL T=4", "Teacher test (%)"], rows,
                 _rule_notes(exp) + [STD_NOTE, "Agreement: teacher–student top-1 agreement on the test split; "
                                     "KL(teacher ‖ student) at T=1 and T=4 (nats, not %)."])


def compute(exp: Experiment) -> Table | None:
    """What the runs cost, per configuration and in all: device, precision, s/epoch, hours."""
    cells = [c for c in exp.cells if c.values("train_seconds")[0]]
    if not cells:
        return None
    rows = [[str(c["kind"])] + _identity(c) + [str(len(c.runs)), _distinct(c, "device"), _distinct(c, "precision"),
                                               _per_epoch_text(c), _mean_text(c, "images_per_s"),
                                               _hours(c.runs)] for c in cells]
    every_run = [r for c in cells for r in c.runs]
    rows.append(["Total", *[""] * len(IDENTITY_HEADERS), str(len(every_run)), "", "", "", "", _hours(every_run)])
    return Table("compute", f"Compute: {exp.name}",
                 ["Kind"] + IDENTITY_HEADERS + ["Runs", "Device", "Precision", "Train s/epoch", "Images/s",
                                                "Train hours"], rows,
                 _rule_notes(exp) + ["Train s/epoch: each run's training time (result.json train_seconds: the training steps of "
                  "every epoch, across resumes; evaluation excluded) over its epochs, mean ± sample std over "
                  "runs. Images/s: mean over runs. Train hours: the sum over runs. Device and precision: as "
                  "each run's result.json records them."])


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
    """The same configuration in several experiments side by side (e.g. kdexp's vs the study's)."""
    if len(experiments) < 2:
        return None
    found: dict[tuple, dict[str, Cell]] = defaultdict(dict)
    for exp in experiments:
        for c in exp.cells:
            found[tuple(repr(c[f]) for f in CELL_FIELDS)][exp.name] = c
    shared = [cells for cells in found.values() if len(cells) > 1]
    if not shared:
        return None
    rows = []
    for cells in sorted(shared, key=lambda cs: next(iter(cs.values())).sort_key):
        ref = next(iter(cells.values()))
        row = [str(ref["kind"])] + _identity(ref)
        for exp in experiments:
            c = cells.get(exp.name)
            row.append(f"{stat_text(c, exp.rule.column)} (n={len(exp.acc(c)[0])})" if c else DASH)
        rows.append(row)
    return Table("comparison", "The same configurations across experiments",
                 ["Kind"] + IDENTITY_HEADERS + [f"{e.name}: {e.rule.label} (%)" for e in experiments], rows,
                 [f"{e.name}: {e.rule_note}" for e in experiments]
                 + [STD_NOTE, "Each experiment under its own selection rule (in the header)."])


def experiment_tables(exp: Experiment, all_runs: list[dict[str, Any]]) -> list[Table]:
    """Every table of one experiment, in reading order; ablations only where their runs exist."""
    tables = key_results(exp)
    optional = [pair_summary(exp, all_runs), significance(exp)]
    tables += [t for t in optional if t is not None]
    tables += grids(exp)
    ablations = [temperature_sweep(exp), stem_ablation(exp),
                 clip_ablation(exp), fidelity(exp), compute(exp)]
    return tables + [t for t in ablations if t is not None]
