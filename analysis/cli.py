"""What `python -m analysis` does once its arguments parse (analysis/__main__.py): collect the runs,
print the summary, write the tables, figures and report."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from kdexp import __version__

from . import canary, output, render
from .aggregate import UNNAMED
from .collect import collect
from .figures import Figure, make_figures
from .tables import slug
from .pipeline import Analysis, analyse
from .report import write_report
from .tables import Table

_EXTENSIONS = {"md": (".md", render.markdown), "latex": (".tex", render.latex), "csv": (".csv", render.csv_text)}


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """The analysis `args` (parsed by analysis.__main__) ask for; its exit code."""
    missing_roots = [str(r) for r in args.roots if not r.is_dir()]
    if missing_roots:
        print(f"error: not a directory: {', '.join(missing_roots)}", file=sys.stderr)
        return 2
    if args.out:  # before anything is read or printed: the error is the only line
        try:
            output.check_out(args.out)
        except output.Refused as err:
            print(f"error: --out {args.out}: {err}", file=sys.stderr)
            return 2
        if problem := output.unwritable(args.out):
            print(f"error: --out {args.out}: {problem}; choose a writable directory", file=sys.stderr)
            return 1
    roots = ", ".join(map(str, args.roots))
    frame = collect(args.roots)
    if frame.empty:
        print(f"error: no runs found under {roots}", file=sys.stderr)
        return 1
    analysis = analyse(frame, args.select, args.experiment, canary.find(args.roots))
    if analysis.not_found:
        say_not_found(analysis, roots)
        if not analysis.experiments:  # nothing left to show
            return 1
    print(summary(analysis))
    if not analysis.experiments:  # every run found is unfinished, failed, ... (listed just above)
        of = f" of experiment {', '.join(args.experiment)}" if args.experiment else ""
        kept = f"; nothing written to {args.out}" if args.out else ""
        print(f"error: no completed run{of} under {roots}: {found_instead(analysis)} (listed above){kept}",
              file=sys.stderr)
        return 1
    if args.out:
        command = shlex.join(["python", "-m", "analysis", *(sys.argv[1:] if argv is None else argv)])
        try:
            written = write_outputs(analysis, args.out, args.formats, command)
        except (OSError, output.Refused) as err:
            why = (f"--out {args.out}: {err}" if isinstance(err, output.Refused)
                   else f"cannot write {err.filename or args.out} ({err.strerror or err})")
            print(f"error: {why}; no report written, {args.out} left as it was", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"interrupted: no report written, {args.out} left as it was", file=sys.stderr)
            return 130
        print(f"\nwrote {written} to {args.out}")
    if args.strict and not analysis.complete:
        print(f"--strict: {analysis.incomplete_text()}", file=sys.stderr)
        return 1
    return 0


def say_not_found(analysis: Analysis, roots: str) -> None:
    """An error where no selected experiment has a run, else a warning (--strict still fails)."""
    present = sorted({e or UNNAMED for e in analysis.frame["experiment"].replace({float("nan"): None})})
    print(f"{'warning' if analysis.experiments else 'error'}: --experiment {', '.join(analysis.not_found)}: "
          f"no run of it under {roots} (experiments there: {', '.join(present)})", file=sys.stderr)


def found_instead(analysis: Analysis) -> str:
    """`3 incomplete, 1 failed`: the runs found where none completed, by status."""
    counts = Counter(row[0] for row in analysis.problems.rows if row[0] != "note")
    return ", ".join(f"{n} {status}" for status, n in counts.most_common())


def summary(analysis: Analysis) -> str:
    """The terminal view: key results, per-pair and teacher-vs-student tables, then what was left out."""
    parts = []
    for exp in analysis.experiments:
        shown = [t for t in analysis.tables[exp.name]
                 if t.name in ("key_results", "teachers", "pairs", "teacher_vs_student")]
        parts += [render.terminal(t) for t in shown]
    parts += [render.terminal(t) for t in analysis.shared]
    if analysis.canaries:  # one line each; the full table is in canaries.* / report.html
        table = next(t for t in analysis.provenance if t.name == "canaries")
        lines = [f"  {c.line()}" for c in analysis.canaries] + [f"  {n}" for n in table.notes if n != canary.CANARY_NOTE]
        parts.append("\n".join([f"Canaries: {len(analysis.canaries)}"] + lines))
    n_problems = len(analysis.problems.rows)
    if n_problems:
        listed = analysis.problems.rows[:20]
        lines = [f"  {status}: {run_dir}: {reason}" for status, reason, _, run_dir in listed]
        more = ([f"  ... and {n_problems - len(listed)} more (see problems.* / report.html)"]
                if n_problems > len(listed) else [])
        parts.append("\n".join([f"Missing / failed / skipped runs: {n_problems}"] + lines + more))
    if analysis.cells:
        lines = [f"  {c.state}: [{c.experiment}] {c.family}: {c.cell}" for c in analysis.cells[:20]]
        parts.append("\n".join([f"Missing cells of the expected grid: {len(analysis.cells)}"] + lines))
    return "\n\n".join(parts)


def write_outputs(analysis: Analysis, out: Path, formats: list[str], command: str) -> str:
    """Every table in `formats`, every figure, runs.csv and (with html) report.html, replacing `out`
    whole (output.staged); says what it wrote."""
    with output.staged(out) as staging:
        _write_all(analysis, staging, formats, command)
    table_formats = [f for f in formats if f in _EXTENSIONS]
    written = ([f"tables ({', '.join(table_formats)})"] if table_formats else []) + ["figures", "runs.csv"]
    written += ["report.html"] if "html" in formats else []
    return ", ".join(written[:-1]) + " and " + written[-1]


def _write_all(analysis: Analysis, out: Path, formats: list[str], command: str) -> None:
    single = len(analysis.experiments) == 1
    figures: dict[str, list[Figure]] = {}
    for exp in analysis.experiments:
        exp_dir = out if single else out / slug(exp.name)
        _write_tables(analysis.tables[exp.name], exp_dir, formats)
        figures[exp.name] = make_figures(exp, out / "figures")
    _write_tables(analysis.shared + analysis.provenance + [analysis.problems, analysis.cells_table()], out, formats)
    as_json = {column: analysis.frame[column].map(lambda v: json.dumps(v, default=str, ensure_ascii=False))
               for column in ("hparams", "grid", "config")}
    runs = analysis.frame.assign(**as_json)
    output.write_text(out / "runs.csv", runs.to_csv(index=False))
    if "html" in formats:
        write_report(out / "report.html", analysis, figures, command, __version__)


def _write_tables(tables: list[Table], directory: Path, formats: list[str]) -> None:
    for table in tables:
        for fmt in formats:
            if fmt in _EXTENSIONS:
                ext, write = _EXTENSIONS[fmt]
                output.write_text(directory / f"{table.name}{ext}", write(table))
