"""The study's own results.json files → its own aggregation, with the numbers exactly as it printed
them (one column per hyperparameter of the methods found: the study's alpha and T, and Feature-KD's beta)."""
from __future__ import annotations

from pathlib import Path


from analysis.collect import collect
from analysis.__main__ import main
from analysis.pipeline import analyse
from analysis.render import csv_text
from runtree import tree  # noqa: F401 (fixtures)

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "study-v2-sample"  # MIT, see its LICENSE
FIVE = (-1, -1, 0, 1, 1)  # mean 0, sample std exactly 1 (ddof=1) over seeds 0..4
THREE = (-1, 0, 1)        # the same over seeds 0..2


def spread(mean: float, std: float, pattern) -> list[float]:
    return [mean + std * d for d in pattern]


def write_group(tree, stage, val, best, final, seeds_pattern=FIVE, **kw):
    """One configuration over seeds, with (mean, std) of val, test@best and test@final."""
    vals, bests, finals = (spread(*v, seeds_pattern) for v in (val, best, final))
    for seed, (v, b, f) in enumerate(zip(vals, bests, finals)):
        tag = f"{kw.get('teacher', 'none')}_{kw.get('model', 'resnet18')}_{kw.get('kd_type', 'none')}"
        tree.study(test_best=b, val=v, final=f, seed=seed, path=f"runs/{stage}/{tag}/seed{seed}", **kw)


def build_v2(tree):
    # Rows of the study's results/final_results.csv and results/bug_ablation.csv (v2).
    write_group(tree, "final", (0.9537, 0.0018), (0.9486, 0.0014), (0.9482, 0.0016))
    write_group(tree, "final", (0.9550, 0.0015), (0.9491, 0.0008), (0.9494, 0.0009),
                teacher="resnet50", kd_type="logit", alpha=0.5, temperature=4.0)
    write_group(tree, "final", (0.9548, 0.0025), (0.9495, 0.0020), (0.9493, 0.0026),
                teacher="resnet50", kd_type="feature", alpha=0.7, temperature=4.0)
    write_group(tree, "bug_ablation", (0.9540, 0.0020), (0.9500, 0.0018), (0.9499, 0.0018),
                teacher="resnet50", kd_type="feature", alpha=0.7, no_proj_clip=True)
    # results/teachers.csv: 200 epochs, seeds 0..2.
    write_group(tree, "teachers", (0.9607, 0.0022), (0.9536, 0.0018), (0.9541, 0.0030), seeds_pattern=THREE,
                model="resnet50", epochs=200)


STUDY_CSV = """\
Teacher,Student,KD,alpha,beta,T,Stem,Seeds,Val acc (%),Test@best (%),Test@final (%)
-,resnet18,none,-,-,-,cifar,"5 [0, 1, 2, 3, 4]",95.37 ± 0.18,94.86 ± 0.14,94.82 ± 0.16
resnet50,resnet18,feature,0.7,0.5,-,cifar,"5 [0, 1, 2, 3, 4]",95.48 ± 0.25,94.95 ± 0.20,94.93 ± 0.26
resnet50,resnet18,feature(bugged),0.7,0.5,-,cifar,"5 [0, 1, 2, 3, 4]",95.40 ± 0.20,95.00 ± 0.18,94.99 ± 0.18
resnet50,resnet18,logit,0.5,-,4,cifar,"5 [0, 1, 2, 3, 4]",95.50 ± 0.15,94.91 ± 0.08,94.94 ± 0.09
"""
TEACHERS_CSV = """\
Teacher,Student,KD,Stem,Seeds,Val acc (%),Test@best (%),Test@final (%)
-,resnet50,none,cifar,"3 [0, 1, 2]",96.07 ± 0.22,95.36 ± 0.18,95.41 ± 0.30
"""


def tables(analysis):
    return {t.name: t for t in analysis.tables["study"]}


def test_key_results_reproduce_the_studys_csv(tree):
    build_v2(tree)
    analysis = analyse(collect(tree.root), select="val")
    assert csv_text(tables(analysis)["key_results"]) == STUDY_CSV
    assert csv_text(tables(analysis)["teachers"]) == TEACHERS_CSV


def test_pair_summary_and_the_bug_ablation_p_value(tree):
    build_v2(tree)
    t = tables(analyse(collect(tree.root), select="val"))
    pair = dict(zip(t["pairs"].columns, t["pairs"].rows[0]))
    assert pair["Teacher (%)"] == "95.18"  # the seed-0 teacher: 95.36 − 0.18
    assert (pair["Baseline (%)"], pair["Gap (pp)"]) == ("94.86 ± 0.14", "+0.32")
    assert pair["logit Δ (pp)"].startswith("+0.05") and pair["feature Δ (pp)"].startswith("+0.09")
    variants = t["ablation_variants"]
    fixed, bugged = (dict(zip(variants.columns, row)) for row in variants.rows)
    assert (fixed["KD"], bugged["KD"]) == ("feature", "feature(bugged)")
    # The study: bugged 95.00 ± 0.18 vs corrected 94.95 ± 0.20, Welch p = 0.69.
    assert bugged["Δ variant − plain (pp)"] == "+0.05" and bugged["p (Welch, for reference)"] == "0.689"
    assert bugged["Clipped steps (%)"] == "-"  # the study logs per-epoch maxima only
    assert bugged["Epochs clipped (%)"] == "50.0"  # the test trees alternate 5.0 / 0.5 per epoch


def test_cli_prints_the_study_table_for_the_real_sample(capsys):
    assert main([str(SAMPLE), "--select", "val"]) == 0
    out = capsys.readouterr().out
    assert "Key results: study" in out
    line = next(line for line in out.splitlines() if line.startswith("resnet50"))
    assert line.split() == ["resnet50", "resnet18", "logit", "0.5", "4", "cifar", "1", "[0]",
                            "95.50", "94.86", "94.89"]


def test_best_test_is_unavailable_for_the_study_and_said_so(tree):
    build_v2(tree)
    analysis = analyse(collect(tree.root), select="test")
    key = tables(analysis)["key_results"]
    assert key.columns[-1] == "Best test (%) (optimistic)" and {r[-1] for r in key.rows} == {"-"}
    reasons = {r[1] for r in analysis.problems.rows}
    assert reasons == {"best test unavailable: the study's history has no test accuracy "
                       "(not averaged under --select test)"}


def test_protocol_v2_seeds_are_expected(tree):
    build_v2(tree)
    victim = tree.root / "runs" / "final" / "resnet50_resnet18_logit" / "seed4"
    (victim / "results.json").unlink()
    analysis = analyse(collect(tree.root))
    assert [(c.family, c.cell, c.state) for c in analysis.cells] == [
        ("study protocol v2: student resnet50→resnet18 logit α=0.5, T=4 (cifar stem)", "seed=4", "missing")]
    assert not analysis.complete


def test_kdexps_numbers_beside_the_studys(tree):
    build_v2(tree)
    for seed, acc in enumerate((0.9480, 0.9490, 0.9500, 0.9510, 0.9520)):
        tree.kdexp(acc=acc, experiment="paper_v2", seed=seed, epochs=100)
    analysis = analyse(collect(tree.root), select="val")
    (comp,) = analysis.shared
    assert comp.columns[-2:] == ["paper_v2: test@best-val (%)", "study: test@best-val (%)"]
    assert comp.rows == [["baseline", "-", "resnet18", "none", "cifar", "95.00 ± 0.16 (n=5)",
                          "94.86 ± 0.14 (n=5)"]]

