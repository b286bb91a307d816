"""Methods as plugins in analysis: a run's KD column, grid cell and symbols come from the class its
config names, so methods outside kdexp are collected, tabulated and drawn with no change here; a
class that cannot be imported is reported with the fix. And the cost columns: parameters, GFLOPs,
images/s, the student/teacher ratios and the fraction of the teacher's accuracy a student keeps."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import textwrap

import pytest

from analysis.collect import collect
from analysis.__main__ import main
from analysis.figures import make_figures
from analysis.pipeline import analyse
from analysis.render import latex
from runtree import tree  # noqa: F401 (fixtures)

TOY_MODULE = '''
from kdexp.methods.base import DistillationMethod


class ToyKD(DistillationMethod):
    """A two-key grid (gamma x rho) and a switch that makes a variant."""
    name = "toy"
    grid = {"gamma": "γ", "rho": "ρ"}

    def __init__(self, gamma: float = 1.0, rho: float = 2.0, sharpen: bool = False):
        super().__init__()

    @classmethod
    def variant(cls, cfg):
        return "sharp" if cfg.get("sharpen") else None


class KnobKD(DistillationMethod):
    """A one-key grid."""
    name = "knob"
    grid = {"w": "w"}

    def __init__(self, w: float = 1.0):
        super().__init__()
'''


@pytest.fixture
def toy_module(tmp_path, monkeypatch, request):
    """A module of methods outside the kdexp package, importable as a user's would be (on PYTHONPATH)."""
    name = f"toy_methods_{request.node.name}"
    (tmp_path / "user_methods").mkdir()
    (tmp_path / "user_methods" / f"{name}.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path / "user_methods"))
    return name


def toy_run(tree, module, cls, acc, seed, **arguments):
    return tree.kdexp(acc=acc, seed=seed, teacher="resnet34", method_config={"_target_": f"{module}.{cls}",
                                                                              **arguments})


def build_toys(tree, module):
    for seed in (0, 1, 2):
        tree.kdexp(acc=0.9470 + seed * 0.001, seed=seed)
        for gamma in (0.5, 1.0):
            for rho in (2.0, 4.0):
                toy_run(tree, module, "ToyKD", 0.9480 + gamma / 100 + rho / 1000 + seed * 0.0011, seed,
                        gamma=gamma, rho=rho, sharpen=False)
        toy_run(tree, module, "ToyKD", 0.9660 + seed * 0.0012, seed, gamma=1.0, rho=2.0, sharpen=True)
        for w in (1, 2):
            toy_run(tree, module, "KnobKD", 0.9470 + w / 1000 + seed * 0.0013, seed, w=w)


def tables_of(analysis, exp="exp"):
    return {t.name: t for t in analysis.tables[exp]}


def as_dict(tab, row):
    return dict(zip(tab.columns, row))


def test_a_method_outside_kdexp_is_collected_tabulated_and_drawn(tree, toy_module, tmp_path):
    build_toys(tree, toy_module)
    frame = collect(tree.root)
    assert set(frame["status"]) == {"completed"}
    toy = frame[frame["kd"] == "toy(sharp)"].iloc[0]
    assert (toy.method, toy.hparams, toy.cell, toy.grid) == ("toy", {"gamma": 1.0, "rho": 2.0}, "γ=1, ρ=2",
                                                             {"gamma": "γ", "rho": "ρ"})
    analysis = analyse(frame)
    t = tables_of(analysis)

    key = t["key_results"]  # one column per grid key, in order of first appearance (knob < toy)
    assert key.columns[:7] == ["Teacher", "Student", "KD", "w", "gamma", "rho", "Stem"]
    assert [r[2:6] for r in key.rows] == [
        ["none", "-", "-", "-"], ["knob", "1", "-", "-"], ["knob", "2", "-", "-"],
        ["toy", "-", "0.5", "2"], ["toy", "-", "0.5", "4"], ["toy", "-", "1", "2"], ["toy", "-", "1", "4"],
        ["toy(sharp)", "-", "1", "2"]]

    pairs = as_dict(t["pairs"], t["pairs"].rows[0])  # every KD label found, alphabetically
    assert [c for c in t["pairs"].columns if c.endswith(" best")] == ["knob best", "toy best", "toy(sharp) best"]
    assert (pairs["toy best"], pairs["knob best"], pairs["toy(sharp) best"]) == \
        ("γ=1, ρ=4 (n=3)", "w=2 (n=3)", "γ=1, ρ=2 (n=3)")
    assert pairs["toy(sharp) Δ (pp)"] == "+1.92" and pairs["Best method"] == "toy(sharp)"

    grid = t["grid__resnet34_to_resnet18__toy"]  # rows the first grid key, columns the second
    assert grid.columns == ["gamma", "ρ=2", "ρ=4"] and "toy: γ × ρ" in grid.title
    assert [r[0] for r in grid.rows] == ["0.5", "1"] and grid.rows[1][2].endswith(" *")
    knob = t["grid__resnet34_to_resnet18__knob"]  # a one-key grid: one column
    assert knob.columns == ["w", "test@best-val (%)"] and [r[0] for r in knob.rows] == ["1", "2"]

    sig = t["significance"]
    assert sorted({r[2] for r in sig.rows}) == ["knob", "toy", "toy(sharp)"]
    variants = t["ablation_variants"]  # the variant beside the plain method's same cell
    assert [r[:4] for r in variants.rows] == [["resnet34→resnet18", "toy", "1", "2"],
                                              ["resnet34→resnet18", "toy(sharp)", "1", "2"]]
    assert as_dict(variants, variants.rows[1])["Δ variant − plain (pp)"] == "+0.61"
    for tab in t.values():
        assert any("Selection rule `" in n for n in tab.notes), tab.name
        assert latex(tab).isascii(), tab.name  # any grid symbol (γ, ρ) in math mode: pdflatex takes it
    assert r"$\rho$=2" in latex(grid)

    figures = {f.name for f in make_figures(analysis.experiments[0], tmp_path / "figures")}
    assert figures == {"exp__resnet34_to_resnet18__toy__heatmap", "exp__resnet34_to_resnet18__curves",
                       "exp__resnet34_to_resnet18__grad_norms", "exp__delta_bars"}  # knob: one key, no heatmap


def test_an_unimportable_method_is_reported_with_the_fix(tree, capsys):
    tree.kdexp(acc=0.95, seed=0)
    absent = tree.kdexp(acc=0.95, seed=0, teacher="resnet34",
                        method_config={"_target_": "my_lab_methods.ToyKD", "gamma": 1.0})
    renamed = tree.kdexp(acc=0.95, seed=0, teacher="resnet34",
                         method_config={"_target_": "kdexp.methods.logit.LogitKDv0", "alpha": 0.5})
    not_a_method = tree.kdexp(acc=0.95, seed=0, teacher="resnet34",
                              method_config={"_target_": "collections.OrderedDict"})
    frame = collect(tree.root)
    reason = dict(zip(frame["run_dir"], zip(frame["status"], frame["reason"])))
    assert reason[str(absent)] == (
        "unknown method", "method._target_ my_lab_methods.ToyKD cannot be imported (no module named "
        "'my_lab_methods'): put the directory holding its module on PYTHONPATH (PYTHONPATH=/path/to/dir "
        "python -m analysis ...) or install its package, then rerun")
    assert reason[str(renamed)] == ("unknown method", "method._target_ kdexp.methods.logit.LogitKDv0: module "
                                    "kdexp.methods.logit has no class LogitKDv0 (renamed or removed since the run?)")
    assert reason[str(not_a_method)] == ("unknown method", "method._target_ collections.OrderedDict is not a "
                                         "kdexp DistillationMethod subclass")
    # Not averaged into any table, listed with the reason, and --strict fails on it.
    assert main([str(tree.root), "--strict"]) == 1
    captured = capsys.readouterr()
    assert f"unknown method: {absent}: method._target_ my_lab_methods.ToyKD cannot be imported" in captured.out
    assert "3 unknown method" in captured.err
    assert "Per pair" not in captured.out  # three students, none usable: no pair to show


def test_the_studys_unknown_kd_type_is_corrupt(tree):
    run = tree.study(test_best=0.95, teacher="resnet34", kd_type="crd")
    row = collect(tree.root).iloc[0]
    assert (row.status, row.reason) == ("corrupt", f"{run / 'results.json'}: unknown kd_type 'crd' (the study has "
                                                   "none, logit, feature)")


TEACHER = {"params": {"student": 21_282_122, "method": 0, "teacher": None}, "gflops": {"student": 1.16, "teacher": None}}
STUDENT = {"params": {"student": 11_173_962, "method": 0, "teacher": 21_282_122},
           "gflops": {"student": 0.557, "teacher": 1.16}}


REPORT = {"data.image_size": 224}  # every network of the report's protocol sees 224-pixel inputs


def build_report(tree):
    """The report's protocol in one experiment: a ResNet-34 teacher fine-tuned from ImageNet weights, a
    ResNet-18 from scratch and with KD from it; beside it, a ResNet-34 trained from scratch (another
    teacher: its accuracy must not be the report teacher's)."""
    tree.kdexp(acc=0.9000, seed=0, experiment="scratch", student="resnet34", kind="teacher",
               extra_config=REPORT, **TEACHER)
    for seed, acc in enumerate((0.9530, 0.9550)):
        tree.kdexp(acc=acc, seed=seed, experiment="report", student="resnet34", kind="teacher",
                   images_per_s=900.0, extra_config={**REPORT, "model.init": "imagenet"}, **TEACHER)
    for seed, acc in enumerate((0.9470, 0.9480)):
        tree.kdexp(acc=acc, seed=seed, experiment="report", images_per_s=2000.0, extra_config=REPORT,
                   params=dict(STUDENT["params"], teacher=None), gflops=dict(STUDENT["gflops"], teacher=None))
    for seed, acc in enumerate((0.9500, 0.9520)):
        tree.kdexp(acc=acc, seed=seed, experiment="report", teacher="resnet34", method="logit",
                   images_per_s=1500.0, extra_config={**REPORT, "teacher.init": "imagenet"}, **STUDENT)


def test_teacher_vs_student_accuracy_retained_and_cost_ratios(tree):
    build_report(tree)
    t = tables_of(analyse(collect(tree.root)), "report")
    tvs = t["teacher_vs_student"]
    base, logit = (as_dict(tvs, r) for r in tvs.rows)
    assert (base["Student"], logit["Student"]) == ("baseline", "logit (best: α=0.5, T=4)")
    # The seed-0 ImageNet-initialised teacher (teacher.seed=0, teacher.init=imagenet): 95.30, not the
    # scratch one's 90.00; students 94.75 and 95.10 on average.
    assert (logit["Teacher (%)"], logit["Student (%)"]) == ("95.30", "95.10 ± 0.14")
    assert (base["Retained (%)"], logit["Retained (%)"]) == (f"{100 * 0.9475 / 0.9530:.2f}", "99.79")
    assert (logit["Teacher params (M)"], logit["Student params (M)"], logit["Params S/T"]) == ("21.3", "11.2", "0.525")
    assert (logit["Teacher GFLOPs/image"], logit["Student GFLOPs/image"], logit["GFLOPs S/T"]) == ("1.16", "0.557", "0.48")
    assert base["Params S/T"] == "0.525"  # the teacher's cost as the pair's students recorded it
    assert any("Retained: the student's mean accuracy ÷ the teacher's" in n for n in tvs.notes)

    cost = t["cost"]
    rows = {(r[0], r[3]): as_dict(cost, r) for r in cost.rows}  # (kind, KD)
    teacher, logit = rows[("teacher", "none")], rows[("student", "logit")]
    assert (teacher["Params (M)"], teacher["GFLOPs/image"], teacher["Train images/s"]) == ("21.3", "1.16", "900")
    assert (teacher["Teacher params (M)"], teacher["Params S/T"]) == ("-", "-")
    assert (logit["test@best-val (%)"], logit["Params (M)"], logit["GFLOPs/image"], logit["Train images/s"]) == \
        ("95.10 ± 0.14", "11.2", "0.557", "1500")
    assert (logit["Teacher GFLOPs/image"], logit["Params S/T"], logit["GFLOPs S/T"]) == ("1.16", "0.525", "0.48")
    assert rows[("baseline", "none")]["GFLOPs S/T"] == "-"  # trained without a teacher


def test_cost_columns_reach_runs_csv(tree, tmp_path):
    build_report(tree)
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([str(tree.root), "--out", str(out), "--format", "csv"]) == 0
    import csv

    rows = list(csv.DictReader((out / "runs.csv").open()))
    logit = next(r for r in rows if r["kd"] == "logit")
    assert (logit["gflops_student"], logit["gflops_teacher"]) == ("0.557", "1.16")
    assert json.loads(logit["hparams"]) == {"alpha": 0.5, "T": 4.0} and logit["cell"] == "α=0.5, T=4"
    assert (out / "report" / "teacher_vs_student.csv").is_file() and (out / "report" / "cost.csv").is_file()


def packaged_methods_with_a_grid():
    from kdexp.config import method_classes

    return sorted((cls for cls in method_classes() if cls.needs_teacher and cls.grid), key=lambda cls: cls.name)


def test_every_packaged_method_appears_in_every_table_and_figure(tree, tmp_path):
    """Each distillation method of kdexp/methods/ (DKD, DIST, ... as they are added), run at two cells
    of its grid from its defaults: its label reaches every per-method table and figure."""
    from analysis.tables import slug

    methods = packaged_methods_with_a_grid()
    defaults = {}
    for i, cls in enumerate(methods):
        defaults[cls] = {f.name: f.default for f in dataclasses.fields(cls.Config)}
        first = next(iter(cls.grid))
        for step, seed in itertools.product((0, 1), (0, 1)):
            config = dict(defaults[cls], **{first: defaults[cls][first] + step / 4})
            tree.kdexp(acc=0.950 + i / 1000 + step / 2000 + seed / 10000, seed=seed, teacher="resnet34",
                       method_config=config)
    for seed in (0, 1):
        tree.kdexp(acc=0.940 + seed / 10000, seed=seed)
    frame = collect(tree.root)
    assert set(frame["status"]) == {"completed"}
    analysis = analyse(frame)
    t = tables_of(analysis)
    figures = {f.name for f in make_figures(analysis.experiments[0], tmp_path / "figures")}
    for cls in methods:
        kd = cls.label(defaults[cls])
        assert kd in {r[2] for r in t["key_results"].rows}, kd
        assert kd in {r[2] for r in t["significance"].rows}, kd
        assert t["pairs"].rows[0][t["pairs"].columns.index(f"{kd} best")] != "-", kd
        grid = t[f"grid__resnet34_to_resnet18__{slug(kd)}"]
        assert grid.columns[0] == next(iter(cls.grid)) and len(grid.rows) == 2, kd
        assert (f"exp__resnet34_to_resnet18__{slug(kd)}__heatmap" in figures) == (len(cls.grid) == 2), kd
    assert {"exp__delta_bars", "exp__resnet34_to_resnet18__curves"} <= figures


def test_label_smoothed_and_plain_teachers_are_separate_pairs_with_their_own_teacher(tree):
    """trainer.label_smoothing on a teacher makes another teacher (kdexp.teachers' identity): students
    distilled from each are their own pair, each beside the teacher it distilled from and the same baseline."""
    for seed in (0, 1):
        tree.kdexp(acc=0.9470 + seed / 1000, seed=seed)
    tree.kdexp(acc=0.9530, seed=0, experiment="teachers", student="resnet34", kind="teacher")
    tree.kdexp(acc=0.9560, seed=0, experiment="teachers", student="resnet34", kind="teacher",
               extra_config={"trainer.label_smoothing": 0.1})
    for smoothing, gain in ((0.0, 0.002), (0.1, 0.004)):
        for seed in (0, 1):
            tree.kdexp(acc=0.9470 + seed / 1000 + gain + seed * 0.0002, seed=seed, teacher="resnet34", method="logit",
                       extra_config={"teacher.label_smoothing": smoothing})
    pairs = tables_of(analyse(collect(tree.root)))["pairs"]
    rows = [as_dict(pairs, r) for r in pairs.rows]
    assert [(r["Teacher label smoothing"], r["Teacher (%)"], r["Baseline (%)"], r["logit Δ (pp)"]) for r in rows] == [
        ("0", "95.30", "94.75 ± 0.07", "+0.21"), ("0.1", "95.60", "94.75 ± 0.07", "+0.41")]
