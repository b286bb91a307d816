"""Expected cells from each job's Hydra sweep; missing and failed cells; --strict."""
from __future__ import annotations

import pytest
import yaml

from analysis.collect import collect
from analysis.__main__ import main
from analysis.expected import expand, normalise, problem_cells
from helpers import run_train
from runtree import tree  # noqa: F401 (fixtures)

SWEEP = {"method.alpha": "0.3,0.7", "seed": "range(0,2)"}


def job(tree, alpha, seed, status="completed", **kw):
    overrides = ["pair=r50_to_r18", "kd_grid=smoke", f"method.alpha={alpha}", f"seed={seed}"]
    return tree.kdexp(acc=0.95, teacher="resnet50", method="logit", alpha=alpha, seed=seed, status=status,
                      sweep=SWEEP, overrides=overrides, **kw)


def test_missing_failed_and_unfinished_cells(tree):
    job(tree, 0.3, 0)
    failed = job(tree, 0.3, 1, status="failed")
    running = job(tree, 0.7, 0, status=None)
    cells = problem_cells(collect(tree.root))
    assert [(c.experiment, c.family, c.cell, c.state, c.run_dirs) for c in cells] == [
        ("exp", "kd_grid=smoke pair=r50_to_r18", "method.alpha=0.3 seed=1", "failed", (str(failed),)),
        ("exp", "kd_grid=smoke pair=r50_to_r18", "method.alpha=0.7 seed=0", "incomplete", (str(running),)),
        ("exp", "kd_grid=smoke pair=r50_to_r18", "method.alpha=0.7 seed=1", "missing", ()),
    ]


def test_a_rerun_that_completed_covers_the_failed_cell(tree):
    for alpha in (0.3, 0.7):
        for seed in (0, 1):
            job(tree, alpha, seed)
    job(tree, 0.7, 1, status="failed", path="exp/old-attempt")
    frame = collect(tree.root)
    assert problem_cells(frame) == []


def test_corrupt_runs_still_place_their_cell(tree):
    for alpha, seed in ((0.3, 0), (0.3, 1), (0.7, 0)):
        job(tree, alpha, seed)
    broken = job(tree, 0.7, 1)
    (broken / "result.json").write_text("{")
    (cell,) = problem_cells(collect(tree.root))
    assert (cell.cell, cell.state) == ("method.alpha=0.7 seed=1", "corrupt")


def test_a_command_line_value_outside_the_sweep_is_fixed(tree):
    # `-m kd_grid=smoke method.alpha=0.5`: the command line overrides the swept alpha.
    for seed in (0, 1):
        tree.kdexp(acc=0.95, teacher="resnet50", method="logit", alpha=0.5, seed=seed, sweep=SWEEP,
                   overrides=["kd_grid=smoke", "method.alpha=0.5", f"seed={seed}"])
    assert problem_cells(collect(tree.root)) == []


def test_single_runs_have_no_expected_grid(tree):
    tree.kdexp(acc=0.95, overrides=["seed=3"])
    assert problem_cells(collect(tree.root)) == []


@pytest.mark.parametrize("spec, values", [
    ("0.3,0.5,0.7", ["0.3", "0.5", "0.7"]), ("range(0,5)", ["0", "1", "2", "3", "4"]),
    ("range(1, 10, 4)", ["1", "5", "9"]), ("choice(logit, feature)", ["logit", "feature"]),
    ("4", ["4"]), (4, ["4"]), ([2, 3.0], ["2", "3"]), ("glob(*)", []), ("interval(0, 1)", []),
])
def test_sweep_syntax(spec, values):
    assert expand(spec) == values


def test_one_spelling_per_value():
    assert normalise("4") == normalise("4.0") == normalise(4.0) == "4"
    assert normalise("0.30") == normalise(" 0.3 ") == "0.3"
    assert normalise("True") == "true" and normalise("'r50_to_r18'") == "r50_to_r18"


def test_strict_exit_code(tree, capsys):
    for alpha, seed in ((0.3, 0), (0.3, 1), (0.7, 0)):
        job(tree, alpha, seed)
    assert main([str(tree.root)]) == 0
    assert main([str(tree.root), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "--strict: 1 expected cell(s) missing or failed" in err
    job(tree, 0.7, 1)
    assert main([str(tree.root), "--strict"]) == 0


def test_strict_fails_on_a_run_that_only_failed(tree):
    tree.kdexp(acc=0.95, seed=0)
    tree.kdexp(acc=0.95, seed=1, status="failed")
    assert main([str(tree.root), "--strict"]) == 1


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "no runs found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty"), "--format", "md,docx"])


def test_strict_judges_only_the_selected_experiments(tree):
    tree.kdexp(acc=0.95, experiment="done", seed=0)
    tree.kdexp(acc=0.95, experiment="broken", seed=0, status="failed")
    assert main([str(tree.root), "--strict"]) == 1
    assert main([str(tree.root), "--strict", "--experiment", "done"]) == 0


def write_multirun_yaml(sweep_dir, task, params=SWEEP):
    """What Hydra writes in the sweep dir of every multirun: its command line and sweep."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"sweeper": {"params": params}, "overrides": {"task": task}}}))


def pinned_seed_job(tree, alpha, status="completed"):
    # `-m pair=r50_to_r18 kd_grid=smoke seed=0`: the job's overrides read as seed 0 of the sweep.
    overrides = [f"method.alpha={alpha}", "seed=0", "pair=r50_to_r18", "kd_grid=smoke"]
    return tree.kdexp(acc=0.95, teacher="resnet50", method="logit", alpha=alpha, seed=0, status=status,
                      sweep=SWEEP, overrides=overrides)


def test_a_seed_pinned_on_the_command_line_is_not_a_missing_seed(tree):
    for alpha in (0.3, 0.7):
        pinned_seed_job(tree, alpha)
    write_multirun_yaml(tree.root / "exp", ["pair=r50_to_r18", "kd_grid=smoke", "seed=0"])
    assert problem_cells(collect(tree.root)) == []


def test_a_multirun_yaml_of_another_multirun_says_nothing_about_this_one(tree):
    for alpha in (0.3, 0.7):
        pinned_seed_job(tree, alpha)
    # The sweep dir's multirun.yaml is the latest multirun's: here one that ran seed 1.
    write_multirun_yaml(tree.root / "exp", ["pair=r50_to_r18", "kd_grid=smoke", "seed=1"])
    assert [c.cell for c in problem_cells(collect(tree.root))] == ["method.alpha=0.3 seed=1",
                                                                  "method.alpha=0.7 seed=1"]


def test_cells_of_a_full_sweep_run_in_a_pinned_one_are_found(tree):
    # An earlier full multirun ran seed 1; the latest pinned seed 0, and its jobs filled seed 0.
    for alpha in (0.3, 0.7):
        job(tree, alpha, 1)
        pinned_seed_job(tree, alpha)
    write_multirun_yaml(tree.root / "exp", ["pair=r50_to_r18", "kd_grid=smoke", "seed=0"])
    assert problem_cells(collect(tree.root)) == []


def test_a_resubmission_with_retry_failed_is_the_same_cell(tree):
    for alpha, seed in ((0.3, 0), (0.3, 1), (0.7, 0)):
        job(tree, alpha, seed)
    overrides = ["pair=r50_to_r18", "kd_grid=smoke", "method.alpha=0.7", "seed=1", "retry_failed=true"]
    tree.kdexp(acc=0.95, teacher="resnet50", method="logit", alpha=0.7, seed=1, sweep=SWEEP, overrides=overrides)
    assert problem_cells(collect(tree.root)) == []


def test_a_failed_job_with_every_swept_key_pinned_names_its_cell_and_experiment(tree, capsys):
    tree.kdexp(acc=0.95, seed=1, path="unnamed/run")  # a completed run, so there is something to show
    failed = tree.kdexp(acc=0.95, teacher="resnet50", method="logit", alpha=0.3, seed=0, status="failed",
                        experiment="", path="unnamed/failed", sweep=SWEEP,
                        overrides=["method.alpha=0.3", "seed=0", "kd_grid=smoke"])
    write_multirun_yaml(failed.parent, ["kd_grid=smoke", "method.alpha=0.3", "seed=0"])
    (cell,) = problem_cells(collect(tree.root))
    assert (cell.experiment, cell.family, cell.cell, cell.state) == (
        "(unnamed)", "kd_grid=smoke method.alpha=0.3 seed=0",
        "(its only cell: every swept key was set on the command line)", "failed")
    main([str(tree.root)])
    assert ("  failed: [(unnamed)] kd_grid=smoke method.alpha=0.3 seed=0: (its only cell: every swept key was "
            "set on the command line)") in capsys.readouterr().out


@pytest.mark.e2e
def test_a_real_multirun_with_a_pinned_seed(tmp_path):
    # The quickstart grid sweeps seed 0,1; `seed=0` on the command line pins it. Both jobs fail at once
    # for want of their teacher (no training), leaving two job dirs.
    run_train("-m", "protocol=quickstart", "experiment=quickstart", "seed=0", f"paths.output_dir={tmp_path}")
    assert len(list((tmp_path / "quickstart").glob("*/*/seed0/.hydra/hydra.yaml"))) == 2
    cells = problem_cells(collect(tmp_path / "quickstart"))
    assert [(c.cell, c.state) for c in cells] == [("method.T=4 method.alpha=0.3", "failed"),
                                                  ("method.T=4 method.alpha=0.7", "failed")]
