"""`python -m analysis` as a user runs it: what it says, what it writes, its exit code. In-process
through `main` (a real process for the read-only case, where a traceback must not reach the terminal)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from analysis.__main__ import main
from helpers import run_process
from runtree import tree  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def analysis(capsys):
    def run(*args) -> Result:
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's errors
            rc = exit_.code
        out, err = capsys.readouterr()
        return Result(rc, out, err)
    return run


def one_line(proc) -> str:
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    return line


def test_an_experiment_no_run_has_is_an_error(analysis, tree):
    tree.kdexp(acc=0.95, experiment="paper")
    proc = analysis(tree.root, "--experiment", "NOPE")
    assert proc.returncode == 1 and proc.stdout == ""
    assert one_line(proc) == f"error: --experiment NOPE: no run of it under {tree.root} (experiments there: paper)"


def test_an_experiment_no_run_has_beside_one_found_fails_only_under_strict(analysis, tree):
    tree.kdexp(acc=0.95, experiment="paper")
    proc = analysis(tree.root, "--experiment", "paper", "--experiment", "NOPE")
    assert proc.returncode == 0 and "Key results: paper" in proc.stdout
    assert one_line(proc).startswith("warning: --experiment NOPE: no run of it under")
    strict = analysis(tree.root, "--experiment", "paper", "--experiment", "NOPE", "--strict")
    assert strict.returncode == 1
    assert strict.stderr.strip().splitlines()[-1] == (
        "--strict: 0 expected cell(s) missing or failed; runs of configurations that never completed: none; "
        "no run of experiment NOPE")


@pytest.mark.parametrize("args, message", [
    (["--format", ""], "--format '' names no format; choose from md, latex, csv, html"),
    (["--format", " , "], "--format ' , ' names no format; choose from md, latex, csv, html"),
    (["--format", "md,docx"], "unknown format(s) docx; choose from md, latex, csv, html"),
])
def test_a_format_list_naming_nothing_writable_is_refused(analysis, tree, tmp_path, args, message):
    tree.kdexp(acc=0.95)
    proc = analysis(tree.root, "--out", tmp_path / "out", *args)
    assert proc.returncode == 2 and "wrote" not in proc.stdout
    assert one_line(proc) == f"python -m analysis: error: {message} (see --help)"
    assert not (tmp_path / "out").exists()


def test_format_without_out_is_refused_not_ignored(analysis, tree):
    tree.kdexp(acc=0.95)
    proc = analysis(tree.root, "--format", "md")
    assert proc.returncode == 2 and proc.stdout == ""
    assert one_line(proc) == ("python -m analysis: error: --format 'md' chooses what --out DIR gets; without --out "
                              "nothing is written (add --out DIR, or drop --format) (see --help)")


def test_the_wrote_line_names_what_was_written(analysis, tree, tmp_path):
    tree.kdexp(acc=0.95)
    out = tmp_path / "out"
    proc = analysis(tree.root, "--out", out, "--format", "md")
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines()[-1] == f"wrote tables (md), figures and runs.csv to {out}"
    assert (out / "key_results.md").is_file() and not (out / "report.html").exists()
    html = analysis(tree.root, "--out", tmp_path / "html", "--format", "html")
    assert html.stdout.strip().splitlines()[-1] == f"wrote figures, runs.csv and report.html to {tmp_path / 'html'}"
    assert not list((tmp_path / "html").glob("*.md"))


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write in: read-only by mode, or (as root, whom modes do not
    stop) one in sysfs, where nobody can create a directory."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked / "report" if not os.access(locked, os.W_OK) else Path("/sys/kdexp-analysis-test/report")


def test_out_in_a_read_only_dir_is_one_line(tree, tmp_path):
    tree.kdexp(acc=0.95)
    out = unwritable_dir(tmp_path)
    proc = run_process([sys.executable, "-m", "analysis", str(tree.root), "--out", str(out)], cwd=REPO)
    assert proc.returncode == 1 and proc.stdout == ""  # checked before any table is printed
    line = one_line(proc)
    assert line.startswith(f"error: --out {out}: ") and line.endswith("); choose a writable directory")
    assert " is not writable (" in line  # names the folder it cannot write in
    assert not out.exists()


def test_strict_counts_corrupt_runs_as_corrupt(analysis, tree):
    tree.kdexp(acc=0.95, seed=0, experiment="paper")
    (tree.kdexp(acc=0.95, seed=1, experiment="paper") / "result.json").write_text("{")
    (tree.kdexp(acc=0.95, seed=2, experiment="paper") / ".hydra" / "config.yaml").unlink()
    tree.kdexp(acc=0.95, seed=3, experiment="paper", status="failed")
    tree.kdexp(acc=0.95, seed=4, experiment="paper", status=None)
    expected = ("--strict: 0 expected cell(s) missing or failed; runs of configurations that never completed: "
                "1 failed, 2 corrupt, 1 incomplete")
    proc = analysis(tree.root, "--strict")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == expected
    # The run whose config is unreadable may be one of paper's: --experiment does not drop it.
    only = analysis(tree.root, "--strict", "--experiment", "paper")
    assert only.returncode == 1 and only.stderr.strip().splitlines()[-1] == expected


def test_a_run_that_never_logged_an_epoch_is_not_called_killed(analysis, tree):
    tree.kdexp(acc=0.95, seed=0)
    never = tree.kdexp(acc=0.95, seed=1, status=None, history=[])
    proc = analysis(tree.root)
    assert (f"  incomplete: {never}: no result.json and no epoch logged (running, or stopped before its first "
            "epoch: see its train.log)") in proc.stdout
