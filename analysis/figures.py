"""Figures (PNG + PDF): grid heatmaps (α × T, ...), learning curves, Δ bars with CIs, variant grad norms.

Every method an experiment ran gets its figures: its KD label and grid come from the runs (the
method's class), its colour from its place among the experiment's labels."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from . import output
from .aggregate import Cell, Experiment, kd_labels, sortable
from .collect import load_history
from .stats import mean_std
from .tables import slug

# Figures are built with the object API on an Agg canvas: no pyplot state, no display needed.
DPI = 110
BASELINE_COLOR = "#555555"
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def colors(exp: Experiment) -> dict[str, str]:
    """One colour per KD label of the experiment (alphabetical order), grey for the baseline: the same
    method has the same colour in every figure of an experiment."""
    labels = kd_labels(exp.cells)
    return {kd: PALETTE[i % len(PALETTE)] for i, kd in enumerate(labels)}


@dataclass(frozen=True)
class Figure:
    name: str
    title: str
    png: Path
    pdf: Path


def make_figures(exp: Experiment, out_dir: Path) -> list[Figure]:
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for cells in exp.pairs().values():
        figures += [f for kd in kd_labels(cells) if (f := heatmap(exp, cells, kd, out_dir))]
        figures += [f for f in (learning_curves(exp, cells, out_dir), grad_norms(exp, cells, out_dir)) if f]
    bars = delta_bars(exp, out_dir)
    return figures + ([bars] if bars else [])


def _new(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[MplFigure, list[Axes]]:
    """A figure and its axes, row by row."""
    fig = MplFigure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, list(np.atleast_1d(fig.subplots(nrows, ncols)).ravel())


def _save(fig: MplFigure, out_dir: Path, name: str, title: str) -> Figure:
    png, pdf = out_dir / f"{name}.png", out_dir / f"{name}.pdf"
    for path in (png, pdf):  # rendered in memory, written atomically: never a 0-byte or cut-off file
        buffer = io.BytesIO()
        fig.savefig(buffer, format=path.suffix[1:], bbox_inches="tight")
        output.write_bytes(path, buffer.getvalue())
    return Figure(name, title, png, pdf)


def _pair_slug(exp: Experiment, ref: Cell) -> str:
    return slug(f"{exp.name}__{exp.pair_label(ref)}")


def heatmap(exp: Experiment, cells: list[Cell], kd: str, out_dir: Path) -> Figure | None:
    """One method's two-key grid (rows its first key, columns its second), where it has two cells."""
    here = [c for c in cells if c["kd"] == kd and exp.acc(c)[0]]
    if len(here) < 2 or len(here[0].grid) != 2:
        return None
    (row_key, row_symbol), (col_key, col_symbol) = here[0].grid.items()
    rows = sorted({c.hparams.get(row_key) for c in here}, key=sortable)
    cols = sorted({c.hparams.get(col_key) for c in here}, key=sortable)
    grid = np.full((len(rows), len(cols)), np.nan)
    stds = np.full_like(grid, np.nan)
    for c in here:
        mean, std = mean_std(exp.acc(c)[0])
        at = rows.index(c.hparams.get(row_key)), cols.index(c.hparams.get(col_key))
        grid[at], stds[at] = 100 * mean, 100 * std
    fig, (ax,) = _new(1.3 * len(cols) + 2.4, 1.0 * len(rows) + 1.6)
    low, high, scale_note = colour_limits(grid, stds)
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=low, vmax=high)
    fig.colorbar(image, ax=ax, label=f"{exp.rule.label} (%)")
    ax.set_xticks(range(len(cols)), [_tick(v) for v in cols])
    ax.set_yticks(range(len(rows)), [_tick(v) for v in rows])
    ax.set_xlabel(_axis_label(col_key, col_symbol))
    ax.set_ylabel(_axis_label(row_key, row_symbol))
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            text = f"{value:.2f}" + (f"\n±{stds[i, j]:.2f}" if np.isfinite(stds[i, j]) else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=9,  # dark text on viridis' light half
                    color="black" if (value - low) / (high - low) > 0.5 else "white")
    best = exp.best_config(here, kd)
    if best is not None:
        ax.add_patch(Rectangle((cols.index(best.hparams.get(col_key)) - 0.5, rows.index(best.hparams.get(row_key)) - 0.5),
                               1, 1, fill=False, edgecolor="red", linewidth=2.5))
    seeds = exp.selection_seeds(here, kd)
    chosen_on = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" if seeds else "own seeds"
    title = f"{here[0].pair_name}: {kd} {row_symbol} × {col_symbol}"
    ax.set_title(f"{title}\n(mean ± std over seeds; red box: best configuration, chosen on {chosen_on})\n"
                 f"{scale_note}", fontsize=9)
    return _save(fig, out_dir, f"{_pair_slug(exp, here[0])}__{slug(kd)}__heatmap", title)


def _tick(value: object) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _axis_label(key: str, symbol: str) -> str:
    """`α (alpha)`, or the key alone where it is its own symbol (`T`)."""
    return symbol if symbol == key else f"{symbol} ({key})"


def colour_limits(means: np.ndarray, stds: np.ndarray) -> tuple[float, float, str]:
    """(vmin, vmax, what the scale means) for a heatmap of means (%) with their seed stds (%).

    Stretched over min..max alone, two cells a tenth of a point apart, well within seed noise,
    would take the two ends of the colour map. The range is therefore at least ±2 typical seed
    std (the median of the cells' stds) around the grid's centre, so cells within noise of each
    other differ in colour by at most half the map; with one seed per cell there is no noise
    estimate, and the figure says so.
    """
    finite = means[np.isfinite(means)]
    centre, half = (finite.min() + finite.max()) / 2, (finite.max() - finite.min()) / 2
    spread = stds[np.isfinite(stds)]
    if not len(spread):
        half = max(half, 0.005)  # a flat grid still gets a colour range
        return (centre - half, centre + half,
                "colours span the means' range; one seed per cell: no noise estimate, colour differences may be seed noise")
    noise = float(np.median(spread))
    half = max(half, 2 * noise, 0.005)
    return (centre - half, centre + half,
            f"colour range ≥ ±2 seed std ({noise:.2f} pp) around the centre: cells within noise get close colours")


def _curve(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and std over seeds of one history key (epochs where some seed logged it)."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for h in load_history(run["run_dir"], run["source"]):
            if isinstance(h.get(key), (int, float)) and isinstance(h.get("epoch"), int):
                by_epoch.setdefault(h["epoch"], []).append(float(h[key]))
    epochs = sorted(by_epoch)
    means = np.array([np.mean(by_epoch[e]) for e in epochs])
    stds = np.array([np.std(by_epoch[e], ddof=1) if len(by_epoch[e]) > 1 else 0.0 for e in epochs])
    return np.array(epochs), means, stds


def learning_curves(exp: Experiment, cells: list[Cell], out_dir: Path) -> Figure | None:
    """Baseline vs each method's best configuration: val and test accuracy per epoch."""
    shown = [("baseline", exp.baseline_for(cells[0]))]
    shown += [(f"{kd} (best: {c.cell_label})" if c.cell_label else kd, c)
              for kd in kd_labels(cells) if (c := exp.best_config(cells, kd)) is not None]
    shown = [(label, c) for label, c in shown if c is not None]
    if not shown:
        return None
    curves = {(label, key): _curve(c.runs, key) for label, c in shown for key in ("val_acc", "test_acc")}
    keys = [k for k in ("val_acc", "test_acc") if any(len(curves[(label, k)][0]) for label, _ in shown)]
    if not keys:
        return None
    palette = colors(exp)
    fig, axes = _new(6.2 * len(keys), 7.6, len(keys), nrows=2)
    grid = np.array(axes, dtype=object).reshape(2, len(keys))
    for column, key in enumerate(keys):
        drawn = [curves[(label, key)] for label, _ in shown]
        for row, ax in enumerate(grid[:, column]):
            for label, c in shown:
                epochs, mean, std = curves[(label, key)]
                if not len(epochs):
                    continue
                color = palette.get(c["kd"], BASELINE_COLOR)
                ax.plot(epochs, 100 * mean, color=color, label=f"{label}, n={len(c.runs)}")
                ax.fill_between(epochs, 100 * (mean - std), 100 * (mean + std), color=color, alpha=0.2, linewidth=0)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            what = f"{'validation' if key == 'val_acc' else 'test'} accuracy (%)"
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_ylabel(what)
                ax.legend(fontsize=8, loc="lower right")
            else:  # differences of tenths of a point are invisible on the full axis
                x0, x1, y0, y1 = plateau_window(drawn)
                ax.set_xlim(x0, x1)
                ax.set_ylim(y0, y1)
                ax.set_ylabel(f"{what}, epochs {x0:g}–{x1:g}")
    title = f"{cells[0].pair_name}: learning curves"
    fig.suptitle(f"{title} (mean ± std band over seeds; below: the second half of training, zoomed)")
    return _save(fig, out_dir, f"{_pair_slug(exp, cells[0])}__curves", title)


def plateau_window(curves: list[tuple]) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) of the zoomed panel: the second half of the epochs, and a y range holding
    every mean and std band drawn there (in %), so the zoom cuts nothing off inside its epochs."""
    drawn = [(e, m, s) for e, m, s in curves if len(e)]
    last = max(float(e[-1]) for e, _, _ in drawn)
    first = min(float(e[0]) for e, _, _ in drawn)
    x0 = first + (last - first) // 2
    if x0 == last:  # a single epoch: nothing to zoom into along x
        x0, last = x0 - 0.5, last + 0.5
    inside = [(m[e >= x0], s[e >= x0]) for e, m, s in drawn]
    low = min(float(np.min(100 * (m - s))) for m, s in inside if len(m))
    high = max(float(np.max(100 * (m + s))) for m, s in inside if len(m))
    margin = max(0.05 * (high - low), 0.1)
    return x0, last, low - margin, high + margin


def delta_bars(exp: Experiment, out_dir: Path) -> Figure | None:
    """Δ vs baseline of each pair's best configuration per method, with its 95% CI."""
    bars = []
    for cells in exp.pairs().values():
        for kd in kd_labels(cells):
            best = exp.best_config(cells, kd)
            comp = exp.versus_baseline(best) if best is not None else None
            if comp is not None and not math.isnan(comp.delta):
                stem = "" if cells[0]["stem"] == "cifar" else f" ({cells[0]['stem']} stem)"
                bars.append((exp.pair_label(cells[0]) + stem, kd, comp))
    if not bars:
        return None
    pairs = sorted({p for p, _, _ in bars})
    methods = sorted({k for _, k, _ in bars})
    palette = colors(exp)
    width = 0.8 / len(methods)
    fig, (ax,) = _new(max(5.0, 1.9 * len(pairs) + 1.5), 4.2)
    for i, kd in enumerate(methods):
        here = [(pairs.index(p), comp) for p, k, comp in bars if k == kd]
        xs = np.array([x for x, _ in here]) + (i - (len(methods) - 1) / 2) * width
        deltas = np.array([100 * c.delta for _, c in here])
        low = np.array([100 * (c.delta - c.ci[0]) if not math.isnan(c.ci[0]) else 0 for _, c in here])
        high = np.array([100 * (c.ci[1] - c.delta) if not math.isnan(c.ci[1]) else 0 for _, c in here])
        ax.bar(xs, deltas, width, color=palette[kd], label=kd, yerr=[low, high], capsize=4)
        for x, (_, c) in zip(xs, here):
            mark = {True: "n.s.", False: "*", None: "n<2"}[c.within_noise]
            top = 100 * (c.ci[1] if not math.isnan(c.ci[1]) else c.delta)
            ax.annotate(mark, (x, max(top, 0)), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top + 0.12 * (top - bottom))  # room for the marks above the bars
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(pairs)), pairs)
    ax.set_ylabel(f"Δ vs baseline (pp, {exp.rule.label})")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    title = f"{exp.name}: KD gain over the baseline, best configuration per pair"
    ax.set_title(f"{title}\n(error bars: 95% CI; n.s. = within noise, * = CI excludes 0)")
    return _save(fig, out_dir, slug(f"{exp.name}__delta_bars"), title)


def grad_norms(exp: Experiment, cells: list[Cell], out_dir: Path) -> Figure | None:
    """Per-epoch max pre-clip and method-only (projection) gradient norms of a method's variants
    beside the plain method in the same cell (`feature(bugged)`: clip_projection=false, vs `feature`)."""
    def twin_key(c: Cell) -> dict:
        return {k: v for k, v in c.key.items() if k != "kd"}
    plain = [c for c in cells if c["kd"] == c.method]
    variants = [c for c in cells if c["kd"] != c.method
                and any(p.method == c.method and twin_key(p) == twin_key(c) for p in plain)]
    plain = [p for p in plain if any(v.method == p.method and twin_key(p) == twin_key(v) for v in variants)]
    if not plain:
        return None
    shown = plain + variants
    labels = list(dict.fromkeys(c.cell_label for c in shown))
    styles = ["-", "--", ":", "-."]
    palette = colors(exp)
    fig, axes = _new(11, 4.0, 2)
    for ax, key, what in ((axes[0], "grad_norm_max", "max pre-clip gradient norm"),
                          (axes[1], "proj_grad_norm_max", "max gradient norm of the method's own parameters")):
        drawn = []
        for cell in shown:
            epochs, mean, std = _curve(cell.runs, key)
            if not len(epochs):
                continue
            color = palette[cell["kd"]]
            ax.plot(epochs, mean, color=color, linestyle=styles[labels.index(cell.cell_label) % 4],
                    label=", ".join(x for x in (cell["kd"], cell.cell_label) if x))
            ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
            drawn.append(mean)
        clip_norm = plain[0].runs[0].get("clip_norm")
        if key == "grad_norm_max" and clip_norm:
            ax.axhline(clip_norm, color="black", linewidth=0.8, linestyle=":",
                       label=f"clip threshold {clip_norm:g}")
        values = np.concatenate(drawn) if drawn else np.array([])
        positive = values[values > 0]
        if len(positive) and positive.max() / positive.min() > 10:  # log only where it spans decades
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(what)
        ax.grid(alpha=0.3, which="both")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    title = f"{plain[0].pair_name}: gradient norms, {' / '.join(sorted({c['kd'] for c in shown}))}"
    fig.suptitle(f"{title} (mean ± std over seeds)")
    return _save(fig, out_dir, f"{_pair_slug(exp, plain[0])}__grad_norms", title)
