"""The literature table (analysis/literature.py): kdexp's CIFAR-100 runs beside the published numbers,
with both selection rules named, from fabricated frames and from a run tree read by collect()."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis import literature
from analysis.collect import collect
from analysis.rules import RULES
from kdexp.config import method_classes
from kdexp.models import ARCHS
from runtree import RunTree, tree  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]


def run(**values) -> dict:
    """One completed CIFAR-100 run as a row of collect()'s frame (only the columns literature reads)."""
    row = {"status": "completed", "data": "cifar100", "kind": "student", "teacher": "resnet56",
           "student": "resnet20", "width": 16, "kd": "logit", "cell": "α=0.9, T=4", "seed": 0, "epochs": 240,
           "val_size": 0, "test_at_best_val": None, "test_final": 0.70, "best_test": 0.71, "numerics": "reference"}
    row.update(values)
    return row


def table_rows(frame_rows: list[dict], **kwargs) -> dict[str, list[str]]:
    tables = literature.literature_tables(pd.DataFrame(frame_rows), **kwargs)
    assert len(tables) == 1
    return {row[0]: row for row in tables[0].rows}


def test_kd_row_is_the_mean_over_seeds_beside_the_published_number():
    rows = table_rows([run(seed=0, test_final=0.700, best_test=0.712), run(seed=1, test_final=0.710, best_test=0.716)])
    kd = rows["KD"]
    # published resnet56 -> resnet20 KD: 70.66 (CRD Table 1)
    assert kd[1:6] == ["resnet20", "α=0.9, T=4", "240", "cifar100", "2"]
    assert kd[6] == "70.50 ± 0.71" and kd[7] == "70.66" and kd[8] == "-0.16"
    assert kd[9] == "71.40 ± 0.28" and kd[10] == "+0.74" and kd[11] == "crd, best test (optimistic)"


def test_teacher_and_student_rows_come_from_their_own_runs():
    rows = table_rows([run(kind="teacher", student="resnet56", teacher=None, kd="none", cell=None, test_final=0.72),
                       run(kind="baseline", teacher=None, kd="none", cell=None, test_final=0.69, best_test=0.695)])
    assert rows["teacher"][1] == "resnet56" and rows["teacher"][7] == "72.34" and rows["teacher"][8] == "-0.34"
    assert rows["student alone (CE)"][8] == "-0.06" and rows["student alone (CE)"][10] == "+0.44"


def test_published_methods_without_kdexp_runs_show_the_published_number_alone():
    rows = table_rows([run()])
    assert rows["CRD"][5:9] == ["0", "-", "71.16", "-"] and rows["DKD"][7] == "71.97"
    assert rows["teacher"][6] == "-"


def test_fast_and_reference_runs_are_rows_of_their_own():
    """bf16 / compiled runs (numerics `fast`) are never averaged with the study's fp32 numerics."""
    tables = literature.literature_tables(pd.DataFrame([run(seed=0), run(seed=0, test_final=0.72, numerics="fast")]))
    kd = [r for r in tables[0].rows if r[0] == "KD"]
    assert [(r[1], r[6]) for r in kd] == [("resnet20 (fast)", "72.00"), ("resnet20", "70.00")]
    assert any(n.startswith("Numerics MIXED") for n in tables[0].notes)


def test_each_cell_of_a_grid_is_its_own_row():
    tables = literature.literature_tables(pd.DataFrame([run(cell="α=0.9, T=4"), run(cell="α=0.5, T=4")]))
    kd_rows = [r for r in tables[0].rows if r[0] == "KD"]
    assert [r[2] for r in kd_rows] == ["α=0.5, T=4", "α=0.9, T=4"]


def test_only_completed_cifar100_runs_of_a_published_pair_count():
    frame = [run(status="failed", test_final=0.1), run(data="cifar10", test_final=0.2),
             run(teacher="resnet110", test_final=0.3),  # resnet110 -> resnet20: not one of kdexp's pairs
             run(kind="baseline", teacher=None, student="resnet18", kd="none", cell=None)]
    assert literature.literature_tables(pd.DataFrame(frame)) == []
    rows = table_rows(frame + [run(seed=3, test_final=0.69)])
    assert rows["KD"][5:7] == ["1", "69.00"]


def test_the_selection_rules_are_named_and_val_is_the_default_with_a_split():
    rows_val = [run(val_size=5000, test_at_best_val=0.705, test_final=0.70)]
    table = literature.literature_tables(pd.DataFrame(rows_val))[0]
    assert table.columns[6] == "kdexp test@best-val" and table.columns[9] == "kdexp best test (optimistic)"
    assert next(r for r in table.rows if r[0] == "KD")[6] == "70.50"
    notes = " ".join(table.notes)
    assert "selection rule `val`" in notes and "the published numbers' own rule" in notes
    assert "Tian, Krishnan, Isola" in notes and "best_acc" in notes and "Selection rule `test`" in notes
    final = literature.literature_tables(pd.DataFrame(rows_val), rule=RULES["final"])[0]
    assert final.columns[6] == "kdexp test@final"
    assert next(r for r in final.rows if r[0] == "KD")[6] == "70.00"


def test_generated_data_is_shown_and_said_to_mean_nothing():
    table = literature.literature_tables(pd.DataFrame([run(data="fake_cifar100", width=4, epochs=2)]))[0]
    kd = next(r for r in table.rows if r[0] == "KD")
    assert kd[1] == "resnet20(w4)" and kd[3:5] == ["2", "fake_cifar100"]
    assert any("generated data" in n for n in table.notes)


def test_the_published_file_covers_the_benchmark_pairs_with_sources_and_rules():
    published = literature.load_published()
    pairs = {(p.teacher, p.student) for p in published}
    assert pairs == {("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
                     ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"),
                     ("vgg13", "mobilenetv2"), ("resnet32x4", "shufflenetv2")}
    for pair in published:
        assert pair.teacher in ARCHS and pair.student in ARCHS
        assert set(pair.accuracy) - {"reviewkd"} == {"teacher", "student", "kd", "crd", "dkd", "ctkd", "mlkd",
                                                     "logit(std)", "ctkd(std)", "dkd(std)", "mlkd(std)"}
        assert all(0 < value < 100 and source.selection is RULES["test"] for value, source in pair.accuracy.values())
    # A pair preset runs each published pair.
    presets = {p.read_text() for p in (REPO / "conf" / "pair").glob("*.yaml")}
    for teacher, student in pairs:
        assert any(f"override /teacher: {teacher}\n" in text and f"override /model: {student}\n" in text
                   for text in presets), (teacher, student)


def test_the_published_figures_are_the_ones_read_from_the_sources():
    """Golden values as read (RepDistiller README; mdistiller README), so an edit cannot slip in."""
    first = ("teacher", "student", "kd", "crd", "dkd")
    by_pair = {(p.teacher, p.student): {k: v for k, (v, _) in p.accuracy.items() if k in first}
               for p in literature.load_published()}
    assert by_pair[("resnet32x4", "resnet8x4")] == {"teacher": 79.42, "student": 72.50, "kd": 73.33, "crd": 75.51,
                                                     "dkd": 76.32}
    assert by_pair[("vgg13", "mobilenetv2")] == {"teacher": 74.64, "student": 64.60, "kd": 67.37, "crd": 69.73,
                                                  "dkd": 69.71}
    assert by_pair[("wrn_40_2", "wrn_16_2")]["dkd"] == 76.23 and by_pair[("resnet32x4", "shufflenetv2")]["dkd"] == 77.07


def test_the_later_methods_figures_are_the_ones_read_from_their_sources():
    """Golden values as read: CTKD's README (its five pairs), Sun et al.'s LS README (CTKD's other three,
    MLKD, and the four methods with logit standardisation), ReviewKD's two pairs (Papers with Code)."""
    by_pair = {(p.teacher, p.student): {k: (v, s.key) for k, (v, s) in p.accuracy.items()}
               for p in literature.load_published()}
    later = ["ctkd", "mlkd", "logit(std)", "ctkd(std)", "dkd(std)", "mlkd(std)"]
    assert [by_pair[("resnet32x4", "resnet8x4")][k] for k in later] == [
        (73.39, "ctkd"), (77.08, "mlkd"), (76.62, "ls"), (76.67, "ls"), (77.01, "ls"), (78.28, "ls")]
    assert [by_pair[("vgg13", "mobilenetv2")][k][0] for k in later] == [68.50, 70.57, 68.61, 68.98, 69.98, 70.94]
    assert [by_pair[("resnet56", "resnet20")][k][0] for k in later] == [71.19, 72.19, 71.43, 71.34, 72.32, 72.33]
    assert [by_pair[("resnet32x4", "shufflenetv2")][k][0] for k in later] == [75.37, 78.44, 75.56, 76.18, 77.37,
                                                                              78.76]
    assert by_pair[("resnet32x4", "resnet8x4")]["reviewkd"] == (75.63, "reviewkd")
    assert by_pair[("vgg13", "vgg8")]["reviewkd"] == (74.84, "reviewkd")
    assert "reviewkd" not in by_pair[("resnet56", "resnet20")]  # no readable source for its other pairs: left out


def test_a_standardized_run_is_the_ls_row_not_the_plain_methods():
    rows = table_rows([run(kd="logit(std)", cell="kd=9, ce=0.1, T=2", test_final=0.714), run(kd="dkd", cell="β=2, T=4"),
                       run(kd="dkd(std)", cell="β=36, T=3", test_final=0.72)])
    assert rows["KD+LS"][2] == "kd=9, ce=0.1, T=2" and rows["KD+LS"][6:9] == ["71.40", "71.43", "-0.03"]
    assert rows["KD+LS"][11] == "ls, best test (optimistic)"
    assert rows["DKD+LS"][6:9] == ["72.00", "72.32", "-0.32"] and rows["DKD"][2] == "β=2, T=4"
    assert rows["KD"][5] == "0" and rows["MLKD"][7] == "72.19" and rows["CTKD+LS"][5] == "0"


def test_a_run_tree_appears_in_the_table(tree: RunTree):
    for seed, acc in ((0, 0.70), (1, 0.72)):
        tree.kdexp(acc=acc, final=acc, best_test=acc + 0.01, data="cifar100", val_size=0, teacher="resnet56",
                   student="resnet20", width=16, teacher_width=16, method="logit", alpha=0.9, T=4.0, seed=seed)
    tree.kdexp(acc=0.69, final=0.69, data="cifar100", val_size=0, student="resnet20", width=16, method="ce")
    tree.kdexp(acc=0.5, final=0.5, data="cifar10", val_size=0, teacher="resnet56", student="resnet20", width=16,
               method="logit")  # CIFAR-10: not beside CIFAR-100's numbers
    tables = literature.literature_tables(collect(tree.root))
    assert [t.name for t in tables] == ["literature_resnet56_to_resnet20"]
    rows = {r[0]: r for r in tables[0].rows}
    assert rows["KD"][5:9] == ["2", "71.00 ± 1.41", "70.66", "+0.34"] and rows["KD"][9] == "72.00 ± 1.41"
    assert rows["student alone (CE)"][5:9] == ["1", "69.00", "69.06", "-0.06"]


def test_each_published_method_is_the_label_of_a_kdexp_method():
    """A published key is the KD column of the runs it is set beside (`kd` excepted: kdexp's `logit`), so
    each must be a label a kdexp method gives its runs. MLKD+LS has none: kdexp's mlkd has no
    standardize switch, so its row shows the published figure alone (drop it from here once it has)."""
    classes = {cls.name: cls for cls in method_classes()}
    keys = {k for p in literature.load_published() for k in p.accuracy} - set(literature.OWN_RUNS) - {"kd"}
    for key in keys - {"mlkd(std)"}:
        name, std = key.removesuffix("(std)"), key.endswith("(std)")
        assert classes[name].label({"standardize": True} if std else {}) == key, key
    assert classes["mlkd"].label({"standardize": True}) != "mlkd(std)"
