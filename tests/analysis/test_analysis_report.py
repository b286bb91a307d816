"""python -m analysis --out: every table in every format, figures (PNG + PDF), and a
self-contained HTML report that renders in headless Chromium."""
from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import pytest

from analysis.__main__ import main
from helpers import run_process
from runtree import module_tree, tree  # noqa: F401 (fixtures)

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def build(tree):
    """One pair with a small logit grid, Feature-KD with and without the clip fix, a baseline and
    its teacher, over two seeds; plus one failed and one truncated run."""
    for seed in (0, 1):
        tree.kdexp(acc=0.9530 + seed * 0.001, experiment="quick", student="resnet34", kind="teacher", seed=seed,
                   epochs=6)
        tree.kdexp(acc=0.9470 + seed * 0.001, experiment="quick", seed=seed, epochs=6)
        for alpha in (0.3, 0.7):
            for T in (2.0, 4.0):
                tree.kdexp(acc=0.9480 + alpha / 100 + T / 1000 + seed * 0.0012, experiment="quick",
                           teacher="resnet34", method="logit", alpha=alpha, T=T, seed=seed, epochs=6,
                           fidelity={"agreement": 0.95, "kl_t1": 0.2, "kl_t4": 0.03, "teacher_test_acc": 0.953})
        for clip in (True, False):
            tree.kdexp(acc=0.9490 + seed * 0.0011 + (0 if clip else 0.0004), experiment="quick",
                       teacher="resnet34", method="feature", alpha=0.7, clip=clip, seed=seed, epochs=6,
                       grad_norm_max=2.0 if clip else 8.0, proj_grad_norm_max=0.2)
    tree.kdexp(acc=0.9, experiment="quick", seed=5, status="failed")
    truncated = tree.kdexp(acc=0.9, experiment="quick", seed=6, status=None)
    (truncated / "metrics.jsonl").write_text('{"epoch": 1, "val_acc": 0.5}\n{"epoch": 2, "val_')


@pytest.fixture(scope="module")
def report(module_tree):
    """Built once for the module: figures are the slow part."""
    build(module_tree)
    out = module_tree.root.parent / "report"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([str(module_tree.root), "--out", str(out)]) == 0
    return out, stdout.getvalue()


def test_terminal_output(report):
    _, stdout = report
    assert "Key results: quick" in stdout and "Per pair: quick" in stdout
    assert "-          resnet18   none" in stdout
    assert "Missing / failed / skipped runs: 2" in stdout
    assert "failed in epoch 2: RuntimeError: CUDA out of memory" in stdout
    assert "no result.json after 1 epoch(s) logged (running, or killed" in stdout


def test_every_table_in_every_format(report):
    out, _ = report
    for name in ("key_results", "teachers", "pairs", "significance", "grid__resnet34_to_resnet18__logit",
                 "ablation_variants", "fidelity", "teacher_vs_student", "cost", "problems", "missing_cells"):
        for ext in (".md", ".tex", ".csv"):
            assert (out / f"{name}{ext}").is_file(), f"{name}{ext}"
    tex = (out / "key_results.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex and r"$\pm$" in tex
    md = (out / "pairs.md").read_text()
    assert md.startswith("### Per pair: quick\n\n| Teacher") and "Selection rule `val`" in md
    assert "completed" in (out / "runs.csv").read_text()


def test_figures_png_and_pdf(report):
    out, _ = report
    names = {p.stem for p in (out / "figures").glob("*.png")}
    assert {p.stem for p in (out / "figures").glob("*.pdf")} == names
    kinds = {n.rsplit("__", 1)[-1] for n in names}
    assert kinds == {"heatmap", "curves", "grad_norms", "delta_bars"}
    assert all((out / "figures" / f"{n}.png").read_bytes()[:4] == b"\x89PNG" for n in names)


def test_report_is_self_contained(report):
    out, _ = report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert not re.search(r"""(src|href)=["'](https?:|//|file:)""", page)  # nothing to fetch
    for text in ("kdexp version", "0.1.0", "python -m analysis", "Selection rule `val`",
                 "Missing / failed / skipped", "CUDA out of memory", "Key results: quick"):
        assert text in page


def test_format_subset(tree, tmp_path):
    for seed in (0, 1):
        tree.kdexp(acc=0.95, seed=seed)
    out = tmp_path / "md-only"
    assert main([str(tree.root), "--out", str(out), "--format", "md"]) == 0
    assert (out / "key_results.md").exists()
    assert not list(out.glob("*.tex")) and not (out / "report.html").exists()
    assert [p.name for p in out.glob("*.csv")] == ["runs.csv"]  # the per-run record is always written


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    out, _ = report
    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--hide-scrollbars", "--window-size=1300,2400",
           f"--screenshot={shot}", (out / "report.html").as_uri()]
    run_process(cmd, check=True, errors="replace")
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1300, 2400)
    # A blank or failed page is one colour; a rendered report has text, tables and plots.
    histogram = image.histogram()
    assert sum(histogram[:128]) > 5_000 and len([h for h in histogram if h]) > 50


def test_pairs_differing_only_in_teacher_seed_get_their_own_grid_and_figures(tree, tmp_path):
    """Two pairs with the same teacher and student (teachers of seed 0 and 1) must not overwrite
    each other's grid table or figure files."""
    for teacher_seed in (0, 1):
        tree.kdexp(acc=0.947, seed=teacher_seed)
        for alpha in (0.3, 0.7):
            for T in (2.0, 4.0):
                tree.kdexp(acc=0.948 + alpha / 100 + teacher_seed / 100, teacher="resnet34", method="logit",
                           alpha=alpha, T=T, seed=0, teacher_seed=teacher_seed)
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        main([str(tree.root), "--out", str(out)])
    grids = sorted(p.name for p in out.glob("grid__*.csv"))
    assert grids == ["grid__resnet34_to_resnet18_2__logit.csv", "grid__resnet34_to_resnet18__logit.csv"]
    heatmaps = sorted(p.name for p in (out / "figures").glob("*__heatmap.png"))
    assert heatmaps == ["exp__resnet34_to_resnet18_2__logit__heatmap.png",
                        "exp__resnet34_to_resnet18__logit__heatmap.png"]
