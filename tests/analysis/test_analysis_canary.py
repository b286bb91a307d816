"""Provenance: the canaries (kdexp.check's check.json under <experiment>/canary/<job id>/) beside the
runs they guarded; a canary dir is never a run, an unreadable check.json one line, never a crash."""
from __future__ import annotations

import contextlib
import io

from analysis import canary
from analysis.collect import collect
from analysis.__main__ import main
from analysis.pipeline import analyse
from runtree import tree  # noqa: F401 (fixtures)


def provenance(tree):
    analysis = analyse(collect(tree.root), canaries=canary.find(tree.root))
    return {t.name: t for t in analysis.provenance}


def test_a_canary_dir_is_never_a_run(tree):
    run = tree.kdexp(acc=0.95)
    job_dir = tree.canary(job=101)
    # Whatever the check left beside its record (a scratch run of its own) is no run either.
    scratch = tree.kdexp(acc=0.5, path=str((job_dir / "scratch").relative_to(tree.root)))
    (job_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    tree.canary(job=102, text="{not json")
    frame = collect(tree.root)
    assert list(frame["run_dir"]) == [str(run)]
    assert str(scratch).startswith(str(job_dir))
    assert [c.path.parent.name for c in canary.find(tree.root)] == ["101", "102"]


def test_verdicts_and_unreadable_files_are_one_line_each(tree):
    tree.kdexp(acc=0.95)
    tree.canary(job=1, ok=True)
    tree.canary(job=2, ok=False, failed=("fast.bf16", "fast.compile"))
    tree.canary(job=3, text="{truncated")
    tree.canary(job=4, text="[1, 2]")
    tree.canary(job=5, text='{"schema_version": 9, "ok": true}')
    tree.canary(job=6, text='{"schema_version": 1, "ok": "yes", "environment": 3}')
    tree.canary(job=7, text='{"schema_version": 1, "ok": false, "failed": 5, "environment": []}')
    verdicts = [c.verdict for c in canary.find(tree.root)]
    assert verdicts[:2] == ["passed", "FAILED: fast.bf16, fast.compile"]
    assert verdicts[2].startswith("unreadable: check.json is not valid JSON (")
    assert verdicts[3:] == ["unreadable: check.json is not a JSON object",
                            "unreadable: unsupported check.json schema_version 9",
                            "unreadable: check.json has no verdict (`ok` is 'yes')", "FAILED"]
    rows = {r[0].rsplit("/", 1)[-1]: r for r in provenance(tree)["canaries"].rows}
    assert rows["1"][1:10] == ["2026-12-01T10:04", "passed", "reference, full", "NVIDIA A100-SXM4-80GB (79 GiB)",
                               "550.54.15", "torch 2.14.1, CUDA 12.4, cuDNN 90100", "abc123", "gpu17", "1"]
    assert rows["7"][3:8] == ["-, -", "-", "-", "-", "-"]  # a record without its fields: dashes
    assert rows["3"][-2:] == ["1", "-"]  # an unreadable canary vouches for no code


def test_runs_no_canary_vouches_for_are_named(tree):
    vouched = tree.kdexp(acc=0.95, seed=0, git_commit="abc123def456", torch="2.14.1")
    other_code = tree.kdexp(acc=0.95, seed=1, git_commit="fff999", torch="2.14.1")
    other_torch = tree.kdexp(acc=0.95, seed=2, torch="2.15.0")
    fast = tree.kdexp(acc=0.95, seed=3, profile="fast")
    unguarded = tree.kdexp(acc=0.95, seed=4, experiment="by_hand")
    tree.canary(job=1, git_commit="abc123def456")  # a short commit matches its full hash
    tree.canary(job=2, ok=False, failed=("fast.bf16",), execution="fast", git_commit="abc123")
    table = provenance(tree)["canaries"]
    assert [r[-2:] for r in table.rows] == [["4", "2"], ["4", "2"]]  # beside it; on its code and torch
    notes = " ".join(table.notes)
    assert f"{tree.root / 'exp'}: 3 of 4 completed run(s) beside its canaries are vouched for by none. " in notes
    assert (f"2: their git commit or torch differs from every passing canary's, e.g. {other_code} (git fff999, "
            f"torch 2.14.1, reference) and {other_torch} (git abc123, torch 2.15.0, reference).") in notes
    assert ("1: they ran fast numerics (bf16/compile) and no passing canary on their code checked the fast "
            f"profile, e.g. {fast} (git abc123, torch 2.14.1, fast).") in notes
    assert str(vouched) + " " not in notes
    assert f"1 completed run(s) are under no canary's directory (trained without one: by hand, or with " \
           f"--skip-check), e.g. {unguarded}." in notes


def test_the_report_and_terminal_show_each_canary_and_the_runs_provenance(tree, tmp_path):
    for seed in (0, 1):
        tree.kdexp(acc=0.95, seed=seed, profile="fast")
    tree.canary(job=77, ok=False, failed=("fast.bf16",), execution="fast")
    tree.canary(job=78, text="")
    out = tmp_path / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([str(tree.root), "--out", str(out), "--format", "md,html"]) == 0
    text = stdout.getvalue()
    assert ("Canaries: 2\n  FAILED: fast.bf16: " f"{tree.root / 'exp' / 'canary' / '77'} (2026-12-01T10:04, "
            "NVIDIA A100-SXM4-80GB (79 GiB), driver 550.54.15, torch 2.14.1, CUDA 12.4, cuDNN 90100, git abc123, "
            "fast profile)\n  unreadable: check.json is not valid JSON") in text
    assert "2 of 2 completed run(s) beside its canaries are vouched for by none. 2: no canary beside them passed" in text
    page = (out / "report.html").read_text()
    assert '<h2 id="provenance">Provenance</h2>' in page and "550.54.15" in page
    assert '<span class="bad">2: 1 FAILED, 1 unreadable</span>' in page
    assert "Numerics: fast" in page  # the experiment's heading says so too
    runs = (out / "provenance.md").read_text()
    assert "| abc123       | 2.14.1  | -      | NVIDIA A100-SXM4-80GB | fast       | 2      | exp " in runs
    assert (out / "canaries.md").is_file()


def test_no_canary_no_table_and_the_report_says_none_was_found(tree, tmp_path):
    tree.kdexp(acc=0.95)
    tables = provenance(tree)
    assert list(tables) == ["provenance"]
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert main([str(tree.root), "--out", str(out), "--format", "html"]) == 0
    assert "Canaries" not in stdout.getvalue()
    assert "none found under the roots" in (out / "report.html").read_text()
