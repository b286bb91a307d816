"""analysis.collect: one row per run, from the run's own files; problems kept with a reason."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from analysis.collect import collect
from analysis.schema import COLUMNS, STATUSES
from runtree import tree  # noqa: F401 (fixtures)

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "study-v2-sample"  # MIT, see its LICENSE


def one(frame, run_dir):
    rows = frame[frame["run_dir"] == str(run_dir)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_columns_come_from_the_files_not_the_path(tree):
    # The directory name says resnet99/seed7; the files say otherwise and win.
    run = tree.kdexp(acc=0.9512, final=0.9490, best_test=0.9530, val=0.9601, experiment="paper_v2",
                     teacher="resnet50", student="resnet18", method="logit", alpha=0.3, T=2.0, seed=3,
                     epochs=100, fidelity={"agreement": 0.953, "kl_t1": 0.24, "kl_t4": 0.03,
                                           "teacher_test_acc": 0.9536},
                     grad_norm_max=7.5, clip_fraction=0.97, path="resnet99-to-resnet99/feature/seed7")
    frame = collect(tree.root)
    assert list(frame.columns) == COLUMNS
    row = one(frame, run)
    assert (row.source, row.status, row.experiment, row.protocol, row.kind) == \
        ("kdexp", "completed", "paper_v2", "paper_v2", "student")
    assert (row.teacher, row.student, row.pair, row.method, row.kd) == \
        ("resnet50", "resnet18", "resnet50→resnet18", "logit", "logit")
    assert (row.hparams, row.cell, row.seed, row.epochs, row.val_size, row.width, row.stem) == \
        ({"alpha": 0.3, "T": 2.0}, "α=0.3, T=2", 3, 100, 5000, 64, "cifar")
    assert (row.teacher_stem, row.teacher_width, row.teacher_seed, row.data) == ("cifar", 64, 0, "cifar10")
    assert (row.best_val_acc, row.test_at_best_val, row.test_final, row.best_test) == (0.9601, 0.9512, 0.9490, 0.9530)
    assert (row.agreement, row.kl_t1, row.kl_t4, row.teacher_test_acc) == (0.953, 0.24, 0.03, 0.9536)
    assert (row.grad_norm_max, row.clip_fraction, row.wall_seconds, row.images_per_s) == (7.5, 0.97, 12.5, 1000.0)
    assert (row.params_student, row.params_teacher, row.kdexp_version) == (11_173_962, 21_282_122, "0.1.0")
    assert (row.gflops_student, row.gflops_teacher) == (0.557, 1.16)
    # grad_norm_max per epoch is 7.5 / epoch: above the 1.0 threshold in epochs 1..7 of 100.
    assert row.clipped_epoch_fraction == pytest.approx(0.07)


def test_hyperparameters_only_where_they_mean_something(tree):
    feature = tree.kdexp(acc=0.95, teacher="resnet34", method="feature", alpha=0.7, beta=0.5, clip=False)
    baseline = tree.kdexp(acc=0.94, method="ce")
    frame = collect(tree.root)
    f, b = one(frame, feature), one(frame, baseline)
    # The method's class says which keys make its grid cell and which switch makes a variant.
    assert (f.method, f.kd, f.hparams, f.cell) == ("feature", "feature(bugged)", {"alpha": 0.7, "beta": 0.5},
                                                   "α=0.7, β=0.5")
    assert (b.method, b.kd, b.kind, b.hparams, b.cell) == ("ce", "none", "baseline", {}, "")
    assert pd.isna(b.pair)


def test_unfinished_failed_and_corrupt_runs_are_kept_with_a_reason(tree):
    running = tree.kdexp(acc=0.9, seed=1, status=None)
    failed = tree.kdexp(acc=0.9, seed=2, status="failed")
    bad_json = tree.kdexp(acc=0.9, seed=3)
    (bad_json / "result.json").write_text('{"status": "completed", "test_acc_fi')
    bad_yaml = tree.kdexp(acc=0.9, seed=4)
    (bad_yaml / ".hydra" / "config.yaml").write_text("model: [unclosed\n")
    no_config = tree.kdexp(acc=0.9, seed=5)
    (no_config / ".hydra" / "config.yaml").unlink()
    not_object = tree.kdexp(acc=0.9, seed=6)
    (not_object / "result.json").write_text("[1, 2]")
    bad_value = tree.kdexp(acc=0.9, seed=7)
    result = json.loads((bad_value / "result.json").read_text())
    (bad_value / "result.json").write_text(json.dumps({**result, "test_acc_final": "n/a"}))
    old_schema = tree.kdexp(acc=0.9, seed=8)
    (old_schema / "result.json").write_text(json.dumps({**result, "schema_version": 0}))
    frame = collect(tree.root)
    assert set(frame["status"]) <= set(STATUSES)
    expect = {
        running: ("incomplete", "no result.json after 4 epoch(s) logged (running, or killed: rerun the same command to resume)"),
        failed: ("failed", "failed in epoch 2: RuntimeError: CUDA out of memory"),
        bad_yaml: ("corrupt", ".hydra/config.yaml is not valid YAML"),
        no_config: ("corrupt", "no .hydra/config.yaml: the configuration is unknown"),
        not_object: ("corrupt", "result.json is not a JSON object"),
        bad_value: ("corrupt", "result.json has no valid test_acc_final"),
        old_schema: ("corrupt", "unsupported result.json schema_version 0"),
        bad_json: ("corrupt", "result.json is not valid JSON"),
    }
    for run, (status, reason) in expect.items():
        row = one(frame, run)
        assert row.status == status
        assert reason in row.reason
    assert one(frame, failed).failed_epoch == 2


def test_truncated_metrics_keep_the_run_and_say_so(tree):
    run = tree.kdexp(acc=0.95, epochs=5)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3] + [lines[3][:20]]) + "\n")
    row = one(collect(tree.root), run)
    assert row.status == "completed" and row.test_at_best_val == 0.95
    assert row.notes == "metrics.jsonl line 4 is not valid JSON (truncated?); curves use the 3 epochs before it"
    assert row.epochs_completed == 5  # from result.json; the log's readable part had 3


def test_duplicates_keep_the_newest_completed_run(tree):
    old = tree.kdexp(acc=0.90, seed=0)
    new = tree.kdexp(acc=0.91, seed=0, extra_config={"trainer.device": "cuda", "data.root": "/scratch"})
    other_seed = tree.kdexp(acc=0.92, seed=1)
    frame = collect(tree.root)
    assert one(frame, new).status == "completed" and one(frame, other_seed).status == "completed"
    assert one(frame, old).status == "duplicate"
    assert one(frame, old).reason == f"same configuration and seed as the newer {new}"


def test_a_real_config_difference_is_not_a_duplicate(tree):
    a = tree.kdexp(acc=0.90, seed=0)
    b = tree.kdexp(acc=0.91, seed=0, extra_config={"trainer.lr": 0.05})
    frame = collect(tree.root)
    assert {one(frame, a).status, one(frame, b).status} == {"completed"}


def test_nested_run_dirs_and_hidden_dirs(tree):
    outer = tree.kdexp(acc=0.9, path="exp/resnet18/ce/seed0")
    inner = tree.kdexp(acc=0.8, path="exp/resnet18/ce/seed0/trainer.lr=0.05", extra_config={"trainer.lr": 0.05})
    tree.kdexp(acc=0.7, path="exp/.submitit/ignored")
    frame = collect(tree.root)
    assert sorted(frame["run_dir"]) == sorted([str(outer), str(inner)])


def test_several_roots_and_an_empty_root(tree, tmp_path):
    a = tree.kdexp(acc=0.9, path="a/run")
    b = tree.kdexp(acc=0.9, path="b/run", seed=1)
    assert sorted(collect([a.parent, b.parent])["run_dir"]) == [str(a), str(b)]
    (tmp_path / "empty").mkdir()
    frame = collect(tmp_path / "empty")
    assert frame.empty and list(frame.columns) == COLUMNS


def test_the_studys_real_sample():
    row = collect(SAMPLE).iloc[0]
    assert (row.source, row.status, row.experiment, row.protocol, row.kind) == \
        ("study", "completed", "study", "v2", "student")
    assert (row.teacher, row.student, row.kd, row.hparams, row.stem, row.seed, row.epochs) == \
        ("resnet50", "resnet18", "logit", {"alpha": 0.5, "T": 4.0}, "cifar", 0, 100)
    assert (row.best_val_acc, row.best_val_epoch, row.test_at_best_val, row.test_final) == (0.955, 99, 0.9486, 0.9489)
    assert math.isnan(row.best_test)  # the study's history has no test accuracy
    assert (row.agreement, row.teacher_test_acc) == (0.9524, 0.9536)
    assert row.kl_t1 == pytest.approx(0.24153002467718906)
    assert row.grad_norm_max == pytest.approx(25.657209396362305)
    assert math.isnan(row.proj_grad_norm_max)  # logged as 0.0 for Logit-KD, where it means nothing
    assert (row.epochs_completed, row.val_size, row.teacher_seed) == (100, 5000, 0)
    assert (row.width, row.teacher_width) == (64, 64)  # torchvision's ResNets


def test_study_files_defaults_and_corruption(tree):
    legacy = tree.study(test_best=0.95, teacher="resnet34", kd_type="feature", stem=None, no_proj_clip=None)
    bugged = tree.study(test_best=0.95, teacher="resnet34", kd_type="feature", no_proj_clip=True, seed=1,
                        proj_norm=0.21)
    broken = tree.study(test_best=0.95, seed=2)
    (broken / "results.json").write_text('{"model": "resnet18", "hist')
    lacking = tree.study(test_best=0.95, seed=3)
    data = json.loads((lacking / "results.json").read_text())
    del data["test_acc_final"]
    (lacking / "results.json").write_text(json.dumps(data))
    frame = collect(tree.root)
    row = one(frame, legacy)
    assert (row.stem, row.kd, row.hparams) == ("cifar", "feature", {"alpha": 0.5, "beta": 0.5})  # no T: meaningless here
    row = one(frame, bugged)
    assert (row.kd, row.proj_grad_norm_max) == ("feature(bugged)", 0.21)
    assert one(frame, broken).status == "corrupt" and "is not valid JSON" in one(frame, broken).reason
    assert one(frame, lacking).reason.endswith("lacks test_acc_final")


def test_study_teachers_are_told_from_baselines_by_their_longer_training(tree):
    teacher = tree.study(test_best=0.953, model="resnet34", epochs=200)
    baseline = tree.study(test_best=0.950, model="resnet34", epochs=100)
    tree.study(test_best=0.951, model="resnet18", teacher="resnet34", kd_type="logit", epochs=100)
    frame = collect(tree.root)
    assert one(frame, teacher).kind == "teacher" and one(frame, baseline).kind == "baseline"


def test_study_best_test_from_history_when_it_has_test(tree):
    history = [{"epoch": e, "val_acc": 0.9, "test_acc": t, "grad_norm_max": 0.5}
               for e, t in [(1, 0.91), (2, 0.94), (3, 0.94), (4, 0.93)]]
    run = tree.study(test_best=0.93, history=history, epochs=4)
    row = one(collect(tree.root), run)
    assert (row.best_test, row.best_test_epoch, row.clipped_epoch_fraction) == (0.94, 2, 0.0)


def test_hydras_unresolved_config_is_resolved():
    from analysis.collect import resolve_interpolations

    cfg = {"recipe_epochs": {"student": 100}, "model": {"stem": "imagenet"},
           "teacher": {"stem": "${model.stem}"}, "trainer": {"epochs": "${recipe_epochs.student}"},
           "paths": {"output_dir": "out", "teachers_dir": "${.output_dir}/teachers", "up": "${..model.stem}"},
           "data": {"root": "${oc.env:KDEXP_DATA,data}/fake", "gone": "${no.such.key}"}}
    resolved = resolve_interpolations(cfg)
    assert resolved["teacher"]["stem"] == "imagenet"
    assert resolved["trainer"]["epochs"] == 100  # a whole-value reference keeps the target's type
    assert resolved["paths"] == {"output_dir": "out", "teachers_dir": "out/teachers", "up": "imagenet"}
    assert resolved["data"] == cfg["data"]  # resolvers and unknown keys stay as written
