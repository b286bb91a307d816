"""The safety net of the run-record redesign (issue 19): every table analysis writes, and the columns
of runs.csv, are byte for byte what they were before it, on a fixture tree holding the study's
published files and kdexp's own run dirs. Today's (v1) result files are read as they are; the same
runs written as v2 records (kdexp.run_record) give the same tables.

The golden files in golden/ were written by the analysis before the redesign (and checked equal to its
output at that commit, 91786b3), then written again once for an intended change: the power columns of
every table with a Δ and the ablations' values on the seeds their Δ compares (issue 21), which changed
those 16 files and the ablations' notes, and nothing else. To write them again (only
for an intended change of a table): KDEXP_WRITE_GOLDEN=1 pytest tests/analysis/test_record_tables_unchanged.py
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from analysis.__main__ import main
from analysis.collect import resolve_interpolations
from analysis.schema import COLUMNS, method_of
from kdexp import records
from kdexp.run_record import RunRecord
from runtree import RunTree

GOLDEN = Path(__file__).with_name("golden")
SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "study-v2-sample"  # MIT, see its LICENSE
# The column that holds the file's clock (the runs' order is kept), not the analysis's.
UNSTABLE_COLUMNS = ("finished_at",)


def build(root: Path) -> None:
    """The study's sample and runs in its schema, and kdexp runs of every kind: teachers, baselines,
    logit and feature grids, an ImageNet-initialised teacher beside a scratch one, a reference and a
    fast run, a varying extra key, CIFAR-100 runs of a published pair, a failed, a truncated and an
    unknown-method run."""
    shutil.copytree(SAMPLE, root / "sample")
    tree = RunTree(root / "runs")
    for seed in (0, 1):
        tree.study(test_best=0.95 + seed / 1000, model="resnet34", seed=seed, epochs=200)
        tree.study(test_best=0.94 + seed / 1000, seed=seed)
        tree.study(test_best=0.945 + seed / 1000, teacher="resnet34", kd_type="logit", seed=seed,
                   fidelity={"top1_agreement": 0.96, "kl_t1": 0.1, "kl_t4": 0.02, "teacher_test_acc": 0.95})
        tree.study(test_best=0.946, teacher="resnet34", kd_type="feature", seed=seed, no_proj_clip=True, proj_norm=3.0)
        tree.kdexp(acc=0.953 + seed / 1000, experiment="quick", student="resnet34", kind="teacher", seed=seed, epochs=6)
        tree.kdexp(acc=0.947 + seed / 1000, experiment="quick", seed=seed, epochs=6)
        for alpha in (0.3, 0.7):
            tree.kdexp(acc=0.948 + alpha / 100 + seed / 900, experiment="quick", teacher="resnet34", method="logit",
                       alpha=alpha, seed=seed, epochs=6, profile="reference",
                       fidelity={"agreement": 0.95, "kl_t1": 0.2, "kl_t4": 0.03, "teacher_test_acc": 0.953})
        tree.kdexp(acc=0.951, experiment="quick", teacher="resnet34", method="logit", seed=seed, epochs=6,
                   profile="fast")
        for clip in (True, False):
            tree.kdexp(acc=0.949 + seed / 1000, experiment="quick", teacher="resnet34", method="feature", clip=clip,
                       seed=seed, epochs=6, proj_grad_norm_max=0.2, extra_config={"trainer.lr": 0.1 if clip else 0.05})
        tree.kdexp(acc=0.955, experiment="quick", student="resnet34", kind="teacher", seed=seed, epochs=6,
                   extra_config={"model.init": "imagenet"})
        tree.kdexp(acc=0.952, experiment="quick", teacher="resnet34", method="logit", seed=seed, epochs=6,
                   extra_config={"teacher.init": "imagenet"})
        tree.kdexp(acc=0.72 + seed / 100, experiment="c100", data="cifar100", student="resnet56", kind="teacher",
                   seed=seed, val_size=0, width=16)
        tree.kdexp(acc=0.69, experiment="c100", data="cifar100", student="resnet20", seed=seed, val_size=0, width=16)
        tree.kdexp(acc=0.705, experiment="c100", data="cifar100", student="resnet20", teacher="resnet56", width=16,
                   teacher_width=16, method="logit", seed=seed, val_size=0)
    tree.kdexp(acc=0.9, experiment="quick", seed=5, status="failed")
    tree.kdexp(acc=0.9, experiment="quick", seed=6, status=None)
    tree.kdexp(acc=0.9, experiment="quick", seed=7, method_config={"_target_": "nowhere.Method"})


def as_v2(root: Path) -> None:
    """Rewrite every kdexp run's completed v1 result.json as the v2 record the job writes now (with the
    resolved config and the method's identity), keeping its mtime. Failures stay v1, as the job writes
    them, and so does the run of an unknown method (a job always knows the class it ran)."""
    for path in sorted(root.rglob(records.RESULT_FILE)):
        run_dir, stat, result = path.parent, path.stat(), records.read_result(path.parent)
        config = resolve_interpolations(records.read_config(run_dir))
        method = method_of(config["method"])[0]
        if result["status"] != "completed" or method is None:
            continue
        records.write_record(run_dir, RunRecord.from_v1(config, result, method))
        os.utime(path, (stat.st_atime, stat.st_mtime))


def outputs(root: Path, out: Path) -> dict[str, str]:
    """Every table (md and csv) and runs.csv without its unstable columns, by file name. Analysed from
    the tree's parent under the tree's name, so run dirs read alike wherever the tree is."""
    with contextlib.chdir(root.parent), contextlib.redirect_stdout(io.StringIO()):
        assert main([root.name, "--out", str(out), "--format", "md,csv"]) == 0
    texts = {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*")) if p.suffix in (".md", ".csv")}
    texts["runs.csv"] = stable_runs(texts["runs.csv"])
    return texts


def stable_runs(text: str) -> str:
    """runs.csv's columns of before the record (the golden file's: a newer record adds its own, and
    runs.csv orders them as the record does), its rows sorted by run dir, without its unstable
    columns, one value a line."""
    rows = sorted(csv.DictReader(io.StringIO(text)), key=lambda r: r["run_dir"])
    golden = GOLDEN / "runs.csv"
    kept = (list(json.loads(golden.read_text())[0]) if golden.exists() and not os.environ.get("KDEXP_WRITE_GOLDEN")
            else ["run_dir"] + [c for c in COLUMNS if c not in UNSTABLE_COLUMNS])
    return json.dumps([{c: row[c] for c in kept} for row in rows], indent=0, ensure_ascii=False)


@pytest.fixture(scope="module")
def tree_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("golden") / "runs"
    build(root)
    return root


def check_against_golden(texts: dict[str, str]) -> None:
    if os.environ.get("KDEXP_WRITE_GOLDEN"):
        shutil.rmtree(GOLDEN, ignore_errors=True)
        for name, text in texts.items():
            (GOLDEN / name).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / name).write_text(text)
    golden = {str(p.relative_to(GOLDEN)): p.read_text() for p in sorted(GOLDEN.rglob("*")) if p.is_file()}
    assert sorted(texts) == sorted(golden)
    for name, text in golden.items():
        assert texts[name] == text, name


def test_every_table_of_v1_run_files_and_the_study_files_is_unchanged(tree_root, tmp_path):
    check_against_golden(outputs(tree_root, tmp_path / "out"))


def test_the_same_runs_as_v2_records_give_the_same_tables(tree_root, tmp_path):
    v2 = tmp_path / "runs"
    shutil.copytree(tree_root, v2)
    as_v2(v2)
    assert json.loads(next(v2.rglob(records.RESULT_FILE)).read_text())["schema_version"] == 2
    texts = outputs(v2, tmp_path / "out")
    golden = {str(p.relative_to(GOLDEN)): p.read_text() for p in sorted(GOLDEN.rglob("*")) if p.is_file()}
    assert texts == golden
