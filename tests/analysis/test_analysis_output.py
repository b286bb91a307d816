"""`--out` as a user meets it on a shared cluster: a full disk, Ctrl-C, a run dir or a folder of
their own named by mistake, an earlier report, a tree where nothing finished. In-process through
`main`; the full disk is simulated at `open` (every file analysis or a library writes goes
through it), so the same test fails on the old, non-atomic writes."""
from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import pytest

from analysis import output
from analysis.__main__ import main
from analysis.collect import collect
from analysis.figures import make_figures
from analysis.pipeline import analyse
from runtree import RunTree, tree  # noqa: F401 (fixtures)
from test_analysis_cli import analysis, one_line  # noqa: F401 (fixtures)


class FullDisk:
    """Files opened for writing under `root` share `free` bytes: the write that does not fit writes
    what does and raises ENOSPC, as on a full disk."""

    def __init__(self, root: Path, free: int):
        self.root, self.free = root.resolve(), free

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open = io.open

        def capped_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.path.abspath(file)
            on_disk = Path(path).is_relative_to(self.root)
            return Capped(f, self) if on_disk and any(c in mode for c in "wax+") else f

        monkeypatch.setattr(builtins, "open", capped_open)
        monkeypatch.setattr(io, "open", capped_open)  # os.fdopen's and pathlib's


class Capped:
    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, data):
        fits = data[:self._disk.free]
        self._f.write(fits)
        self._disk.free -= len(fits)
        if len(fits) < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def small(tree: RunTree, experiment: str = "exp") -> None:
    """A baseline and one distilled student: every kind of file, figures included, quickly."""
    tree.kdexp(acc=0.95, experiment=experiment)
    tree.kdexp(acc=0.951, experiment=experiment, teacher="resnet34", method="logit")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def earlier_report(analysis, tree: RunTree, out: Path) -> dict[str, bytes]:
    small(tree)
    assert analysis(tree.root, "--out", out, "--format", "md,html").returncode == 0
    return snapshot(out)


def beside(out: Path) -> list[str]:
    """What lies beside `out`: the runs tree and the report, nothing half-written or left over."""
    return sorted(p.name for p in out.parent.iterdir())


@pytest.mark.parametrize("formats, free, fails_on", [
    ("md", 0, ".md"),           # the first table
    ("html", 1000, ".png"),     # inside the first figure (matplotlib: an AttributeError before)
])
def test_a_full_disk_is_one_line_and_leaves_the_earlier_report_whole(analysis, tree, tmp_path, monkeypatch,
                                                                     formats, free, fails_on):
    out = tmp_path / "report"
    before = earlier_report(analysis, tree, out)
    FullDisk(tmp_path, free).install(monkeypatch)
    proc = analysis(tree.root, "--out", out, "--format", formats)
    assert proc.returncode == 1
    line = one_line(proc)
    assert line.startswith(f"error: cannot write {out}/") and line.endswith(
        f"{fails_on} (No space left on device); no report written, {out} left as it was"), line
    assert snapshot(out) == before and beside(out) == ["report", "runs"]


def test_figures_are_written_whole_or_not_at_all(tree, tmp_path, monkeypatch):
    small(tree)
    exp = analyse(collect(tree.root)).experiments[0]
    first = make_figures(exp, tmp_path / "roomy")[0]
    figures = tmp_path / "full"
    FullDisk(figures, first.png.stat().st_size + 100).install(monkeypatch)  # room for one PNG, not its PDF
    with pytest.raises(OSError) as err:
        make_figures(exp, figures)
    assert [p.name for p in figures.iterdir()] == [first.png.name]  # no cut-off PDF, no temp file
    assert (figures / first.png.name).read_bytes() == first.png.read_bytes()
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(figures / first.pdf.name)


def test_ctrl_c_while_writing_leaves_the_earlier_report_whole(analysis, tree, tmp_path, monkeypatch):
    out = tmp_path / "report"
    before = earlier_report(analysis, tree, out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("analysis.cli.write_report", interrupted)  # after every table and figure
    proc = analysis(tree.root, "--out", out)
    assert proc.returncode == 130
    assert one_line(proc) == f"interrupted: no report written, {out} left as it was"
    assert snapshot(out) == before and beside(out) == ["report", "runs"]


def test_an_earlier_report_is_replaced_not_merged(analysis, tree, tmp_path):
    small(tree, "a")
    small(tree, "b")
    out = tmp_path / "report"
    assert analysis(tree.root, "--out", out, "--format", "md").returncode == 0
    assert (out / "a" / "key_results.md").is_file() and (out / "b" / "key_results.md").is_file()
    assert analysis(tree.root, "--out", out, "--format", "csv", "--experiment", "a").returncode == 0
    assert not (out / "a").exists() and not (out / "b").exists() and not list(out.rglob("*.md"))
    assert (out / "key_results.csv").is_file() and beside(out) == ["report", "runs"]
    assert output._manifest(out) == set(snapshot(out)) - {output.MANIFEST}


def test_out_in_or_inside_a_run_dir_is_refused(analysis, tree):
    run_dir = tree.kdexp(acc=0.95)
    before = snapshot(run_dir)
    for out, where in ((run_dir, "is a run dir"), (run_dir / "report", f"is inside the run dir {run_dir}")):
        proc = analysis(tree.root, "--out", out)
        assert proc.returncode == 2 and proc.stdout == ""
        assert one_line(proc) == (f"error: --out {out}: {where}: a report there would mix with its files; "
                                  "choose a folder outside every run dir")
    assert snapshot(run_dir) == before


def test_a_folder_analysis_did_not_write_is_refused_and_kept(analysis, tree, tmp_path):
    small(tree)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    proc = analysis(tree.root, "--out", mine)
    assert proc.returncode == 2 and one_line(proc) == (
        f"error: --out {mine}: holds 1 file(s) and no earlier report of analysis (no .analysis-report.json), "
        "and analysis replaces only its own reports; choose a new or empty folder")
    out = tmp_path / "report"
    assert analysis(tree.root, "--out", out, "--format", "md").returncode == 0
    (out / "figures" / "my_plot.svg").write_text("mine")  # a file of the user's in a report
    proc = analysis(tree.root, "--out", out, "--format", "md")
    assert proc.returncode == 2 and one_line(proc) == (
        f"error: --out {out}: holds 1 file(s) its earlier report did not write (figures/my_plot.svg), and "
        "analysis replaces the report whole; move them out or choose another folder")
    assert (mine / "notes.txt").read_text() == (out / "figures" / "my_plot.svg").read_text() == "mine"


def test_an_empty_folder_is_written_into(analysis, tree, tmp_path):
    small(tree)
    (tmp_path / "report").mkdir()
    assert analysis(tree.root, "--out", tmp_path / "report", "--format", "md").returncode == 0
    assert (tmp_path / "report" / "key_results.md").is_file()


def test_a_tree_where_no_run_finished_is_an_error_after_the_listing(analysis, tree, tmp_path):
    out = tmp_path / "report"
    before = earlier_report(analysis, RunTree(tmp_path / "done"), out)
    failed = tree.kdexp(acc=0.9, seed=0, status="failed", experiment="broken")
    running = tree.kdexp(acc=0.9, seed=1, status=None, experiment="broken")
    proc = analysis(tree.root, "--out", out)
    assert proc.returncode == 1
    assert f"  failed: {failed}: failed in epoch 2" in proc.stdout and f"  incomplete: {running}: " in proc.stdout
    assert one_line(proc) == (f"error: no completed run under {tree.root}: 1 failed, 1 incomplete (listed above); "
                              f"nothing written to {out}")
    assert snapshot(out) == before
    done = tmp_path / "done"  # completed runs of another experiment: skipped, and said so
    only = analysis(done, tree.root, "--experiment", "broken")
    assert only.returncode == 1 and one_line(only) == (
        f"error: no completed run of experiment broken under {done}, {tree.root}: 2 skipped, 1 failed, "
        "1 incomplete (listed above)")
