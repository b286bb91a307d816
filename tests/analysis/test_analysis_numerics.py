"""Reference (fp32) and fast (bf16 / compiled) runs: a `numerics` column per run, never duplicates of
each other nor averaged together, and every table whose runs are not all reference says so."""
from __future__ import annotations

import pandas as pd

from analysis.collect import collect
from analysis.expected import problem_cells
from analysis.pipeline import analyse
from runtree import tree  # noqa: F401 (fixtures)

MIXED = "Numerics MIXED"
FAST_ONLY = "Numerics: fast"


def table(analysis, exp, name):
    return next(t for t in analysis.tables[exp] if t.name == name)


def rows_of(tab) -> list[dict[str, str]]:
    return [dict(zip(tab.columns, row)) for row in tab.rows]


def numerics_notes(tab) -> list[str]:
    return [n for n in tab.notes if n.startswith("Numerics")]


def test_numerics_recorded_or_derived_from_precision_and_compile(tree):
    runs = {
        "fast": tree.kdexp(acc=0.95, seed=0, profile="fast"),
        "reference": tree.kdexp(acc=0.95, seed=1, profile="reference"),
        # result.json from before kdexp recorded numerics: derived the same way
        "old bf16": tree.kdexp(acc=0.95, seed=2, execution={"precision": "bfloat16"}),
        "old compiled": tree.kdexp(acc=0.95, seed=3, execution={"compile": True}),
        "old fp32": tree.kdexp(acc=0.95, seed=4),
        "no record": tree.kdexp(acc=0.95, seed=5, execution={"precision": None}),
    }
    study = tree.study(test_best=0.95)
    frame = collect(tree.root).set_index("run_dir")
    got = {name: frame.loc[str(path), "numerics"] for name, path in runs.items()}
    assert got.pop("no record") is None or pd.isna(frame.loc[str(runs["no record"]), "numerics"])
    assert got == {"fast": "fast", "reference": "reference", "old bf16": "fast", "old compiled": "fast",
                   "old fp32": "reference"}
    assert frame.loc[str(study), "numerics"] == "reference"  # the study defines the reference
    assert (frame.loc[str(runs["fast"]), "precision"], frame.loc[str(runs["fast"]), "torch"]) == ("bfloat16", "2.14.1")


def test_speed_settings_alone_make_no_new_configuration(tree):
    """Two reference runs differing only in how they executed (channels_last, fused, an old
    trainer.* key) are one configuration: the newer is kept."""
    older = tree.kdexp(acc=0.95, profile="reference")
    newer = tree.kdexp(acc=0.96, profile="reference",
                       extra_config={"execution.channels_last": True, "trainer.fused": True, "trainer.amp": "none"})
    frame = collect(tree.root).set_index("run_dir")
    assert frame.loc[str(newer), "status"] == "completed"
    assert frame.loc[str(older), "status"] == "duplicate"
    assert frame.loc[str(older), "config_hash"] == frame.loc[str(newer), "config_hash"]


def build_both(tree):
    """A baseline and a logit grid (α 0.5, 0.9) in reference numerics, the grid rerun fast on the same seeds."""
    for seed in (0, 1):
        tree.kdexp(acc=0.9470 + seed / 1000, seed=seed, profile="reference")
        for alpha, gain in ((0.5, 0.003), (0.9, 0.001)):
            for profile, shift in (("reference", 0.0), ("fast", 0.01)):
                tree.kdexp(acc=0.9470 + gain + shift + seed / 1000, teacher="resnet34", method="logit", alpha=alpha,
                           seed=seed, profile=profile)


def test_a_fast_rerun_is_its_own_row_not_a_duplicate(tree):
    build_both(tree)
    frame = collect(tree.root)
    assert set(frame["status"]) == {"completed"}  # neither kind dropped as the other's duplicate
    analysis = analyse(frame)
    key = rows_of(table(analysis, "exp", "key_results"))
    logit = {r["Numerics"]: r["Test@best (%)"] for r in key if r["KD"] == "logit" and r["alpha"] == "0.5"}
    assert logit == {"reference": "95.05 ± 0.07", "fast": "96.05 ± 0.07"}  # never one mean over both
    assert [r["Numerics"] for r in key if r["KD"] == "none"] == ["reference"]
    # Like with like: the fast cell has no fast baseline, so no Δ; the reference cell's Δ is pure.
    sig = table(analysis, "exp", "significance")
    assert [(r["alpha"], r["Δ (pp)"]) for r in rows_of(sig)] == [("0.5", "+0.30"), ("0.9", "+0.10")]
    assert numerics_notes(sig) == []
    (note,) = numerics_notes(table(analysis, "exp", "key_results"))
    assert note.startswith(f"{MIXED}: 6 reference (fp32, no compile: the study's numerics), "
                           "4 fast (bf16 autocast and/or torch.compile) run(s).")
    assert "includes a precision change" in note
    cost = rows_of(table(analysis, "exp", "cost"))
    assert sorted(r["Numerics"] for r in cost) == ["fast"] * 2 + ["reference"] * 3
    # A grid per numerics, each saying which (the pair's name alone would not).
    titles = sorted(t.title for t in analysis.tables["exp"] if t.name.startswith("grid__"))
    assert [t.split(" · ")[0] for t in titles] == ["resnet34→resnet18 #2 (cifar stem, numerics=reference)",
                                                   "resnet34→resnet18 (cifar stem, numerics=fast)"]
    pairs = rows_of(table(analysis, "exp", "pairs"))
    assert [(r["Numerics"], r["Baseline (%)"], r["logit Δ (pp)"]) for r in pairs] == [
        ("fast", "-", "-"), ("reference", "94.75 ± 0.07", "+0.30 (within noise)")]


def test_a_fast_cell_against_a_reference_baseline_is_flagged(tree):
    for seed in (0, 1):
        tree.kdexp(acc=0.9470 + seed / 1000, seed=seed, profile="reference")
        tree.kdexp(acc=0.9500 + seed / 1000, teacher="resnet34", method="logit", seed=seed, profile="fast")
    analysis = analyse(collect(tree.root))
    pairs = table(analysis, "exp", "pairs")
    assert rows_of(pairs)[0]["logit Δ (pp)"] == "+0.30 (within noise)"  # compared, and said so:
    (note,) = numerics_notes(pairs)
    assert note.startswith(f"{MIXED}: 2 reference") and "2 fast" in note
    sig = table(analysis, "exp", "significance")  # the fast cell and its reference baseline
    assert [n.split(":")[0] for n in numerics_notes(sig)] == [MIXED]
    key = rows_of(table(analysis, "exp", "key_results"))
    assert [(r["KD"], r["Numerics"]) for r in key] == [("none", "reference"), ("logit", "fast")]


def test_only_fast_says_so_only_reference_says_nothing(tree):
    for seed in (0, 1):
        tree.kdexp(acc=0.947, seed=seed, experiment="quick", profile="fast")
        tree.kdexp(acc=0.950, teacher="resnet34", method="logit", seed=seed, experiment="quick", profile="fast")
        tree.kdexp(acc=0.947, seed=seed, experiment="study", profile="reference")
        tree.kdexp(acc=0.950, teacher="resnet34", method="logit", seed=seed, experiment="study")
    analysis = analyse(collect(tree.root))
    for tab in analysis.tables["quick"]:
        assert [n.split(" (")[0] for n in numerics_notes(tab)] == [FAST_ONLY], tab.name
    for tab in analysis.tables["study"]:
        assert numerics_notes(tab) == [], tab.name
    assert analysis.shared == []  # no configuration of like numerics in both experiments


def test_the_same_configuration_across_experiments_pairs_like_numerics(tree):
    for exp, profile in (("kdexp", "fast"), ("kdexp", "reference"), ("rerun", "fast")):
        tree.kdexp(acc=0.95 if profile == "reference" else 0.97, experiment=exp, profile=profile)
    analysis = analyse(collect(tree.root))
    (across,) = [t for t in analysis.shared if t.name == "comparison"]
    assert [r[-2:] for r in across.rows] == [["97.00 (n=1)", "97.00 (n=1)"]]  # the reference 95.00 is no side
    assert any(n.startswith(FAST_ONLY) for n in across.notes)  # its rows are fast


def test_an_execution_override_is_no_sweep_family(tree):
    """`execution=fast` on the command line says how jobs ran, not which cells they are: a sweep
    half run with it is still one family, complete."""
    sweep = {"seed": "0,1"}
    tree.kdexp(acc=0.95, seed=0, sweep=sweep, overrides=["seed=0"], profile="reference")
    tree.kdexp(acc=0.95, seed=1, sweep=sweep, overrides=["execution=fast", "seed=1"], profile="fast")
    assert problem_cells(collect(tree.root)) == []
