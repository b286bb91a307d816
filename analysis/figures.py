"""Figures (PNG + PDF): α×T heatmaps, learning curves, Δ bars with CIs, clip-ablation grad norms."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .aggregate import Cell, Experiment
from .collect import load_history
from .stats import mean_std
from .tables import slug

# Figures are built with the object API on an Agg canvas: no pyplot state, no display needed.
DPI = 110
COLORS = {"none": "#555555", "logit": "#1f77b4", "feature": "#d62728", "feature(bugged)": "#ff7f0e"}


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
        figures += [f for f in (heatmap(exp, cells, out_dir), learning_curves(exp, cells, out_dir),
                                grad_norms(exp, cells, out_dir)) if f]
    bars = delta_bars(exp, out_dir)
    return figures + ([bars] if bars else [])


def _new(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[MplFigure, list[Axes]]:
    """A figure and its axes, row by row."""
    fig = MplFigure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, list(np.atleast_1d(fig.subplots(nrows, ncols)).ravel())


def _save(fig: MplFigure, out_dir: Path, name: str, title: str) -> Figure:
    png, pdf = out_dir / f"{name}.png", out_dir / f"{name}.pdf"
    fig.savefig(png, bbox_inches="tight")
    fig.savefig(pdf, bbox_inches="tight")
    return Figure(name, title, png, pdf)


def _pair_slug(exp: Experiment, ref: Cell) -> str:
    return slug(f"{exp.name}__{exp.pair_label(ref)}")


def heatmap(exp: Experiment, cells: list[Cell], out_dir: Path) -> Figure | None:
    logit = [c for c in cells if c["kd"] == "logit" and exp.acc(c)[0]]
    alphas = sorted({c["alpha"] for c in logit})
    temps = sorted({c["T"] for c in logit})
    if len(logit) < 2:
        return None
    grid = np.full((len(alphas), len(temps)), np.nan)
    stds = np.full_like(grid, np.nan)
    for c in logit:
        mean, std = mean_std(exp.acc(c)[0])
        grid[alphas.index(c["alpha"]), temps.index(c["T"])] = 100 * mean
        stds[alphas.index(c["alpha"]), temps.index(c["T"])] = 100 * std
    fig, (ax,) = _new(1.3 * len(temps) + 2.4, 1.0 * len(alphas) + 1.6)
    low, high, scale_note = colour_limits(grid, stds)
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=low, vmax=high)
    fig.colorbar(image, ax=ax, label=f"{exp.rule.label} (%)")
    ax.set_xticks(range(len(temps)), [f"{t:g}" for t in temps])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("α (weight of the KD term)")
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            text = f"{value:.2f}" + (f"\n±{stds[i, j]:.2f}" if np.isfinite(stds[i, j]) else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=9,  # dark text on viridis' light half
                    color="black" if (value - low) / (high - low) > 0.5 else "white")
    best = exp.best_config(logit, "logit")
    if best is not None:
        ax.add_patch(Rectangle((temps.index(best["T"]) - 0.5, alphas.index(best["alpha"]) - 0.5), 1, 1,
                                   fill=False, edgecolor="red", linewidth=2.5))
    seeds = exp.selection_seeds(logit, "logit")
    chosen_on = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" if seeds else "own seeds"
    title = f"{logit[0].pair_name}: Logit-KD α × T"
    ax.set_title(f"{title}\n(mean ± std over seeds; red box: best configuration, chosen on {chosen_on})\n"
                 f"{scale_note}", fontsize=9)
    return _save(fig, out_dir, f"{_pair_slug(exp, logit[0])}__heatmap", title)


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
    """Baseline vs the best Logit-/Feature-KD configuration: val and test accuracy per epoch."""
    shown = [("baseline", exp.baseline_for(cells[0]))]
    shown += [(f"{kd} (best: α={c['alpha']:g}" + (f", T={c['T']:g})" if c["T"] is not None else ")"), c)
              for kd in ("logit", "feature") if (c := exp.best_config(cells, kd)) is not None]
    shown = [(label, c) for label, c in shown if c is not None]
    if not shown:
        return None
    curves = {(label, key): _curve(c.runs, key) for label, c in shown for key in ("val_acc", "test_acc")}
    keys = [k for k in ("val_acc", "test_acc") if any(len(curves[(label, k)][0]) for label, _ in shown)]
    if not keys:
        return None
    fig, axes = _new(6.2 * len(keys), 7.6, len(keys), nrows=2)
    grid = np.array(axes, dtype=object).reshape(2, len(keys))
    for column, key in enumerate(keys):
        drawn = [curves[(label, key)] for label, _ in shown]
        for row, ax in enumerate(grid[:, column]):
            for label, c in shown:
                epochs, mean, std = curves[(label, key)]
                if not len(epochs):
                    continue
                color = COLORS.get(c["kd"], "#555555")
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
        for kd in ("logit", "feature"):
            best = exp.best_config(cells, kd)
            comp = exp.versus_baseline(best) if best is not None else None
            if comp is not None and not math.isnan(comp.delta):
                stem = "" if cells[0]["stem"] == "cifar" else f" ({cells[0]['stem']} stem)"
                bars.append((exp.pair_label(cells[0]) + stem, kd, comp))
    if not bars:
        return None
    pairs = sorted({p for p, _, _ in bars})
    methods = [kd for kd in ("logit", "feature") if any(k == kd for _, k, _ in bars)]
    width = 0.8 / len(methods)
    fig, (ax,) = _new(max(5.0, 1.9 * len(pairs) + 1.5), 4.2)
    for i, kd in enumerate(methods):
        here = [(pairs.index(p), comp) for p, k, comp in bars if k == kd]
        xs = np.array([x for x, _ in here]) + (i - (len(methods) - 1) / 2) * width
        deltas = np.array([100 * c.delta for _, c in here])
        low = np.array([100 * (c.delta - c.ci[0]) if not math.isnan(c.ci[0]) else 0 for _, c in here])
        high = np.array([100 * (c.ci[1] - c.delta) if not math.isnan(c.ci[1]) else 0 for _, c in here])
        ax.bar(xs, deltas, width, color=COLORS[kd], label=f"{kd}-KD", yerr=[low, high], capsize=4)
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
    """Per-epoch max pre-clip and projection-only gradient norms, clip_projection true vs false."""
    def twin_key(c: Cell) -> dict:
        return {k: v for k, v in c.key.items() if k != "kd"}
    bugged = [c for c in cells if c["kd"] == "feature(bugged)"]
    fixed = [c for c in cells if c["kd"] == "feature" and any(twin_key(c) == twin_key(b) for b in bugged)]
    bugged = [b for b in bugged if any(twin_key(f) == twin_key(b) for f in fixed)]
    if not fixed:
        return None
    alphas = sorted({c["alpha"] for c in fixed})
    styles = ["-", "--", ":", "-."]
    fig, axes = _new(11, 4.0, 2)
    for ax, key, what in ((axes[0], "grad_norm_max", "max pre-clip gradient norm"),
                          (axes[1], "proj_grad_norm_max", "max projection-only gradient norm")):
        drawn = []
        for cell in fixed + bugged:
            epochs, mean, std = _curve(cell.runs, key)
            if not len(epochs):
                continue
            clip = "true (fixed)" if cell["kd"] == "feature" else "false (bugged)"
            ax.plot(epochs, mean, color=COLORS[cell["kd"]], linestyle=styles[alphas.index(cell["alpha"]) % 4],
                    label=f"clip_projection={clip}, α={cell['alpha']:g}")
            ax.fill_between(epochs, mean - std, mean + std, color=COLORS[cell["kd"]], alpha=0.15, linewidth=0)
            drawn.append(mean)
        clip_norm = fixed[0].runs[0].get("clip_norm")
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
    title = f"{fixed[0].pair_name}: gradient norms, clip_projection true vs false"
    fig.suptitle(f"{title} (mean ± std over seeds)")
    return _save(fig, out_dir, f"{_pair_slug(exp, fixed[0])}__grad_norms", title)
