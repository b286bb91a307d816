"""The paper's tables from kdexp run dirs with known accuracies: exact strings, every rule."""
from __future__ import annotations

import math

import pytest
from scipy.stats import t as t_dist

from analysis.collect import collect
from analysis.pipeline import analyse
from analysis.stats import mean_std, paired_power
from runtree import tree  # noqa: F401 (fixtures)

SEEDS = (0, 1, 2)
# test@best-val per seed; val accuracies decide the best configuration, finals the `final` rule.
BASE = {"acc": (0.9470, 0.9480, 0.9490), "final": (0.9460, 0.9470, 0.9480), "val": 0.9550}
LOGIT_A5_T4 = {"acc": (0.9492, 0.9500, 0.9508), "final": (0.9490, 0.9500, 0.9510), "val": 0.9560}
# Higher test accuracy but lower val accuracy: never the selected configuration under `val`.
LOGIT_A9_T2 = {"acc": (0.9520, 0.9530, 0.9540), "final": (0.9400, 0.9410, 0.9420), "val": 0.9540}
FEATURE_A5 = {"acc": (0.9482, 0.9478, 0.9495), "final": (0.9482, 0.9478, 0.9495), "val": 0.9555}


def build(tree, val_size=5000):
    exp = "paper" if val_size else "paper_v1"
    for seed, acc in zip((0, 1), (0.9530, 0.9540)):  # teachers live in their own experiment
        tree.kdexp(acc=acc, final=acc, best_test=acc, experiment="teachers", student="resnet34", kind="teacher",
                   seed=seed, val_size=val_size)
    cells = [(dict(), BASE), (dict(teacher="resnet34", method="logit", alpha=0.5, T=4.0), LOGIT_A5_T4),
             (dict(teacher="resnet34", method="logit", alpha=0.9, T=2.0), LOGIT_A9_T2),
             (dict(teacher="resnet34", method="feature", alpha=0.5), FEATURE_A5)]
    for config, values in cells:
        for seed, acc, final in zip(SEEDS, values["acc"], values["final"]):
            tree.kdexp(acc=acc, final=final, best_test=max(acc, final) + 0.001, val=values["val"],
                       experiment=exp, seed=seed, val_size=val_size, **config)
    return exp


def table(analysis, exp, name):
    return next(t for t in analysis.tables[exp] if t.name == name)


def rows_by(tab, *lead):
    return [r for r in tab.rows if tuple(r[:len(lead)]) == lead]


def row_of(tab, *lead):
    (row,) = rows_by(tab, *lead)
    return dict(zip(tab.columns, row))


def paired_by_hand(kd, base):
    diffs = [a - b for a, b in zip(kd, base)]
    n = len(diffs)
    md = sum(diffs) / n
    se = math.sqrt(sum((d - md) ** 2 for d in diffs) / (n - 1) / n)
    half = t_dist.ppf(0.975, n - 1) * se
    return md, 2 * t_dist.sf(abs(md / se), n - 1), (md - half, md + half)


def welch_p_by_hand(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return 2 * t_dist.sf(abs(ma - mb) / math.sqrt(va + vb), df)


def test_key_results_table_exact(tree):
    exp = build(tree)
    analysis = analyse(collect(tree.root))
    tab = table(analysis, exp, "key_results")
    # One column per grid key of the methods found, in order of first appearance (the methods' classes
    # say which: feature's α, β and logit's α, T); '-' where a method has no such key.
    assert tab.columns == ["Teacher", "Student", "KD", "alpha", "beta", "T", "Stem", "Seeds", "Val acc (%)",
                           "Test@best (%)", "Test@final (%)"]
    assert tab.rows == [
        ["-", "resnet18", "none", "-", "-", "-", "cifar", "3 [0, 1, 2]", "95.50 ± 0.00", "94.80 ± 0.10",
         "94.70 ± 0.10"],
        ["resnet34", "resnet18", "feature", "0.5", "0.5", "-", "cifar", "3 [0, 1, 2]", "95.55 ± 0.00",
         "94.85 ± 0.09", "94.85 ± 0.09"],
        ["resnet34", "resnet18", "logit", "0.5", "-", "4", "cifar", "3 [0, 1, 2]", "95.60 ± 0.00", "95.00 ± 0.08",
         "95.00 ± 0.10"],
        ["resnet34", "resnet18", "logit", "0.9", "-", "2", "cifar", "3 [0, 1, 2]", "95.40 ± 0.00", "95.30 ± 0.10",
         "94.10 ± 0.10"],
    ]
    assert "Selection rule `val` (default for these runs)" in tab.notes[0]
    teachers = table(analysis, "teachers", "teachers")
    assert teachers.rows == [["-", "resnet34", "none", "cifar", "2 [0, 1]", "95.85 ± 0.07",
                              "95.35 ± 0.07", "95.35 ± 0.07"]]


def test_pair_summary_gap_deltas_and_best_configuration(tree):
    exp = build(tree)
    row = row_of(table(analyse(collect(tree.root)), exp, "pairs"), "resnet34", "resnet18")
    assert row["Teacher (%)"] == "95.30"         # the seed-0 teacher, the one distilled from
    assert row["Baseline (%)"] == "94.80 ± 0.10"
    assert row["Gap (pp)"] == "+0.50"
    assert row["logit best"] == "α=0.5, T=4 (n=3)"  # best on val, though α=0.9 has higher test acc
    assert row["logit Δ (pp)"] == "+0.20"
    assert row["feature best"] == "α=0.5, β=0.5 (n=3)"
    assert row["feature Δ (pp)"] == "+0.05 (within noise)"
    assert row["Best method"] == "logit"


def test_each_pair_says_whether_its_deltas_exceed_seed_noise_and_what_would_tell(tree):
    """The study's question, one line per pair: logit's +0.20 is beyond noise; feature's +0.05 is within
    it, with the Δ its 3 seeds detect and the seeds +0.05 would need (paired_power, checked against the
    noncentral t in test_analysis_stats)."""
    exp = build(tree)
    tab = table(analyse(collect(tree.root)), exp, "pairs")
    differences = [k - b for k, b in zip(FEATURE_A5["acc"], BASE["acc"])]
    power = paired_power(differences)
    row = row_of(tab, "resnet34", "resnet18")
    assert row["feature seeds for Δ"] == str(power.seeds_needed)
    (answer,) = [n for n in tab.notes if n.startswith("Beyond seed noise? resnet34→resnet18:")]
    assert "logit +0.20 pp exceeds seed noise (3 seeds)" in answer
    assert (f"feature +0.05 pp within noise (3 seeds detect ±{100 * power.detectable:.2f} pp; this Δ needs "
            f"{power.seeds_needed} seeds)") in answer


def test_significance_values_by_hand(tree):
    exp = build(tree)
    tab = table(analyse(collect(tree.root)), exp, "significance")
    logit = row_of(tab, "resnet34", "resnet18", "logit", "0.5")
    md, p, ci = paired_by_hand(LOGIT_A5_T4["acc"], BASE["acc"])
    assert md == pytest.approx(0.002)
    assert logit["Δ (pp)"] == "+0.20" and logit["Seeds not compared"] == "-"
    assert logit["95% CI (pp)"] == f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" == "[+0.15, +0.25]"
    assert logit["Test, seeds compared"] == "paired t, seeds 0, 1, 2"
    assert logit["p"] == f"{p:.3f}" == "0.003"
    assert logit["Verdict"] == "significant gain"
    # The study's test, labelled as not the verdict's.
    assert logit["p (Welch, for reference)"] == f"{welch_p_by_hand(LOGIT_A5_T4['acc'], BASE['acc']):.3f}" == "0.057"
    assert any("where the test is 'paired t' it is not the verdict's test" in n for n in tab.notes)
    feature = row_of(tab, "resnet34", "resnet18", "feature")
    md, p, ci = paired_by_hand(FEATURE_A5["acc"], BASE["acc"])
    assert feature["Δ (pp)"] == f"{100 * md:+.2f}" == "+0.05"
    assert feature["95% CI (pp)"] == f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"
    assert feature["Verdict"] == "within noise"


def test_unpaired_seeds_use_welch(tree):
    for seed, acc in zip((0, 1, 2), (0.9470, 0.9480, 0.9490)):
        tree.kdexp(acc=acc, seed=seed)
    for seed, acc in zip((3, 4, 5), (0.9500, 0.9510, 0.9520)):
        tree.kdexp(acc=acc, seed=seed, teacher="resnet34", method="logit")
    row = row_of(table(analyse(collect(tree.root)), "exp", "significance"), "resnet34")
    assert row["Test, seeds compared"] == "Welch, unpaired: no seed in common"
    assert row["p"] == row["p (Welch, for reference)"] == \
        f"{welch_p_by_hand([0.95, 0.951, 0.952], [0.947, 0.948, 0.949]):.3f}"


def test_selection_rules(tree):
    exp = build(tree)
    frame = collect(tree.root)
    final = analyse(frame, select="final")
    row = row_of(table(final, exp, "pairs"), "resnet34", "resnet18")
    assert (row["Baseline (%)"], row["logit Δ (pp)"]) == ("94.70 ± 0.10", "+0.30")
    assert "Selection rule `final` (chosen with --select)" in table(final, exp, "pairs").notes[0]
    optimistic = analyse(frame, select="test")
    key = table(optimistic, exp, "key_results")
    assert key.columns[-1] == "Best test (%) (optimistic)"
    assert key.rows[0][-1] == "94.90 ± 0.10"  # max(test@best-val, final) + 0.1 pp per seed
    for tab in optimistic.tables[exp]:
        assert any("OPTIMISTIC" in n for n in tab.notes), tab.name
    pairs = table(optimistic, exp, "pairs")
    assert "best test (optimistic)" in " ".join(pairs.notes)


def test_default_rule_without_a_val_split_is_final_and_val_is_refused(tree):
    exp = build(tree, val_size=0)
    frame = collect(tree.root)
    analysis = analyse(frame)
    assert analysis.experiments[0].rule.name == "final"
    assert row_of(table(analysis, exp, "pairs"), "resnet34", "resnet18")["Baseline (%)"] == "94.70 ± 0.10"
    key = table(analysis, exp, "key_results")
    assert key.rows[0][8:] == ["-", "-", "94.70 ± 0.10"]
    forced = analyse(frame, select="val")
    skipped = [r for r in forced.problems.rows if r[0] == "skipped"]
    assert len(skipped) == 14  # 12 students + 2 teachers: none has test@best-val
    assert skipped[0][1].startswith("no validation split: test@best-val unavailable")
    assert row_of(table(forced, exp, "pairs"), "resnet34", "resnet18")["Baseline (%)"] == "-"


def test_grid_marks_the_best_configuration(tree):
    exp = build(tree)
    analysis = analyse(collect(tree.root))
    grid = table(analysis, exp, "grid__resnet34_to_resnet18__logit")
    assert grid.columns == ["alpha", "T=2", "T=4"]
    assert grid.rows == [["0.5", "-", "95.00 ± 0.08 *"], ["0.9", "95.30 ± 0.10", "-"]]
    assert not [t for t in analysis.tables[exp] if t.name.endswith("__feature")]  # one cell: no grid


def test_teacher_accuracy_falls_back_to_fidelity_records(tree):
    tree.kdexp(acc=0.948, seed=0)
    tree.kdexp(acc=0.950, seed=0, teacher="resnet50", method="logit",
               fidelity={"agreement": 0.95, "kl_t1": 0.2, "kl_t4": 0.03, "teacher_test_acc": 0.9536})
    tab = table(analyse(collect(tree.root)), "exp", "pairs")
    assert tab.rows[0][3] == "95.36 †" and tab.rows[0][5] == "+0.56"
    assert any(n.startswith("† no teacher run found") for n in tab.notes)


def test_a_config_key_without_a_column_splits_cells(tree):
    for lr, accs in ((0.1, (0.95, 0.951)), (0.05, (0.93, 0.931))):
        for seed, acc in enumerate(accs):
            tree.kdexp(acc=acc, seed=seed, extra_config={"trainer.lr": lr})
    tab = table(analyse(collect(tree.root)), "exp", "key_results")
    assert tab.columns[4] == "trainer.lr"
    assert [(r[4], r[7]) for r in tab.rows] == [("0.05", "93.05 ± 0.07"), ("0.1", "95.05 ± 0.07")]


def test_experiments_get_their_own_tables_and_a_comparison(tree):
    for exp, accs in (("mine", (0.950, 0.952)), ("theirs", (0.940, 0.942))):
        for seed, acc in enumerate(accs):
            tree.kdexp(acc=acc, seed=seed, experiment=exp)
    analysis = analyse(collect(tree.root))
    assert [e.name for e in analysis.experiments] == ["mine", "theirs"]
    (comp,) = analysis.shared
    assert comp.columns[-2:] == ["mine: test@best-val (%)", "theirs: test@best-val (%)"]
    assert comp.rows == [["baseline", "-", "resnet18", "none", "cifar", "95.10 ± 0.14 (n=2)",
                          "94.10 ± 0.14 (n=2)"]]
    only = analyse(collect(tree.root), only=["mine"])
    assert [e.name for e in only.experiments] == ["mine"]
    assert {r[1] for r in only.problems.rows} == {"other experiment 'theirs' (not selected with --experiment)"}


def test_temperature_sweep_ablation(tree):
    for seed in (0, 1):
        tree.kdexp(acc=0.948 + seed * 0.001, seed=seed)
        for T, gain in ((1.0, -0.001), (4.0, 0.002), (16.0, 0.0)):
            tree.kdexp(acc=0.948 + seed * 0.001 + gain + seed * 0.0002, seed=seed, teacher="resnet50",
                       method="logit", alpha=0.5, T=T)
    tab = table(analyse(collect(tree.root)), "exp", "ablation_sweep")  # one grid key swept, the others fixed
    assert [r[4] for r in tab.rows] == ["T=1", "T=4", "T=16"]
    assert [r[7] for r in tab.rows] == ["-0.09", "+0.21", "+0.01"]
    assert tab.rows[1][:7] == ["resnet50→resnet18", "cifar", "logit", "α=0.5", "T=4", "2 [0, 1]", "95.06 ± 0.08"]
    assert tab.rows[1][9] == "paired t, seeds 0, 1"


def test_stem_ablation(tree):
    for seed in (0, 1, 2):
        tree.kdexp(acc=(0.9470, 0.9480, 0.9490)[seed], seed=seed)
        tree.kdexp(acc=(0.8760, 0.8771, 0.8782)[seed], seed=seed, stem="imagenet")
    tab = table(analyse(collect(tree.root)), "exp", "ablation_stem")
    assert [r[3] for r in tab.rows] == ["cifar", "imagenet"]
    imagenet = dict(zip(tab.columns, tab.rows[1]))
    assert (imagenet["test@best-val (%)"], imagenet["Δ vs CIFAR stem (pp)"]) == ("87.71 ± 0.11", "-7.09")
    assert imagenet["Test, seeds compared"] == "paired t, seeds 0, 1, 2"
    _, p, _ = paired_by_hand([0.876, 0.8771, 0.8782], [0.947, 0.948, 0.949])
    assert imagenet["p"] == f"{p:.3f}".replace("0.000", "<0.001") == "<0.001"


def test_an_ablation_row_shows_its_value_on_the_seeds_its_delta_compares(tree):
    """The study's stem ablation: the CIFAR stem ran 5 seeds, the ImageNet stem 3; Δ compares seeds
    0-2, so the CIFAR row's value is on those three (its 5-seed figure follows, kept visible) and Δ is
    the difference of the two values beside it."""
    cifar = (0.9470, 0.9480, 0.9490, 0.9600, 0.9610)
    for seed, acc in enumerate(cifar):
        tree.kdexp(acc=acc, seed=seed)
    for seed in (0, 1, 2):
        tree.kdexp(acc=(0.9460, 0.9472, 0.9480)[seed], seed=seed, stem="imagenet")
    rows = [dict(zip(r.columns, row)) for r in [table(analyse(collect(tree.root)), "exp", "ablation_stem")]
            for row in r.rows]
    on_three, on_five = mean_std(cifar[:3]), mean_std(cifar)
    assert rows[0]["test@best-val (%)"] == (f"{100 * on_three[0]:.2f} ± {100 * on_three[1]:.2f} (seeds 0, 1, 2; "
                                            f"all 5 seeds: {100 * on_five[0]:.2f} ± {100 * on_five[1]:.2f})")
    assert rows[1]["test@best-val (%)"] == "94.71 ± 0.10"  # all of its seeds are compared
    assert rows[1]["Δ vs CIFAR stem (pp)"] == f"{100 * (mean_std([0.9460, 0.9472, 0.9480])[0] - on_three[0]):+.2f}"


def test_clip_ablation_with_gradient_norms(tree):
    for seed in (0, 1):
        tree.kdexp(acc=(0.9495, 0.9505)[seed], seed=seed, teacher="resnet50", method="feature", alpha=0.7,
                   clip=True, grad_norm_max=(1.5, 2.0)[seed], proj_grad_norm_max=0.15, clip_fraction=0.6,
                   epochs=10)
        tree.kdexp(acc=(0.9500, 0.9512)[seed], seed=seed, teacher="resnet50", method="feature", alpha=0.7,
                   clip=False, grad_norm_max=(5.0, 16.0)[seed], proj_grad_norm_max=0.21,
                   clip_fraction=(0.96, 1.0)[seed], epochs=10)
    tab = table(analyse(collect(tree.root)), "exp", "ablation_variants")
    fixed, bugged = (dict(zip(tab.columns, r)) for r in tab.rows)
    assert (fixed["KD"], fixed["alpha"], bugged["KD"], bugged["alpha"]) == ("feature", "0.7", "feature(bugged)", "0.7")
    assert (fixed["Max pre-clip grad norm"], fixed["Max projection grad norm"], fixed["Clipped steps (%)"]) == \
        ("2.00", "0.15", "60.0")
    assert (bugged["Max pre-clip grad norm"], bugged["Max projection grad norm"], bugged["Clipped steps (%)"]) == \
        ("16.00", "0.21", "98.0")
    # Per-epoch max norm is grad_norm_max / epoch: above 1.0 only in epoch 1 of 10 (2.0 / 2 is not).
    assert fixed["Epochs clipped (%)"] == "10.0"
    assert bugged["Δ variant − plain (pp)"] == "+0.06" and fixed["Δ variant − plain (pp)"] == "-"
    assert bugged["Test, seeds compared"] == "paired t, seeds 0, 1"
    assert bugged["p"] == f"{paired_by_hand([0.95, 0.9512], [0.9495, 0.9505])[1]:.3f}"


def test_fidelity_table(tree):
    for seed, agreement in enumerate((0.9530, 0.9540)):
        tree.kdexp(acc=0.95, seed=seed, teacher="resnet50", method="logit",
                   fidelity={"agreement": agreement, "kl_t1": 0.24 + seed * 0.01, "kl_t4": 0.03,
                             "teacher_test_acc": 0.9536})
    tab = table(analyse(collect(tree.root)), "exp", "fidelity")
    assert tab.rows == [["resnet50", "resnet18", "logit", "0.5", "4", "cifar", "2 [0, 1]", "95.35 ± 0.07",
                         "0.2450 ± 0.0071", "0.0300 ± 0.0000", "95.36 ± 0.00"]]


def test_compute_table_sums_training_time_per_configuration_and_in_all(tree):
    for seed, seconds in enumerate((360.0, 420.0)):  # 4 epochs each: 90 and 105 s per epoch
        tree.kdexp(acc=0.95, seed=seed, teacher="resnet50", method="logit", train_seconds=seconds)
    tree.kdexp(acc=0.94, train_seconds=7200.0)
    tab = table(analyse(collect(tree.root)), "exp", "compute")
    assert row_of(tab, "student", "resnet50") == {
        "Kind": "student", "Teacher": "resnet50", "Student": "resnet18", "KD": "logit", "alpha": "0.5", "T": "4",
        "Stem": "cifar", "Runs": "2", "Device": "cpu", "Precision": "fp32", "Train s/epoch": "97.50 ± 10.61",
        "Train hours": "0.217"}
    assert row_of(tab, "baseline")["Train s/epoch"] == "1800.00"
    assert row_of(tab, "Total")["Runs"] == "3" and row_of(tab, "Total")["Train hours"] == f"{7980 / 3600:.3f}"


def test_every_table_of_results_states_its_selection_rule(tree):
    from test_analysis_report import build as build_everything

    build_everything(tree)  # teachers, baselines, a logit grid, Feature-KD with and without the clip fix
    tree.kdexp(acc=0.95, experiment="other", epochs=6)  # the baseline again: a comparison table
    analysis = analyse(collect(tree.root))
    tables = [t for exp in analysis.experiments for t in analysis.tables[exp.name]] + analysis.shared
    assert {t.name for t in tables} >= {"key_results", "teachers", "pairs", "significance", "ablation_variants",
                                        "fidelity", "cost", "teacher_vs_student", "compute", "comparison",
                                        "grid__resnet34_to_resnet18__logit"}
    for tab in tables:
        assert any("Selection rule `" in note for note in tab.notes), tab.name
