"""python -m analysis ROOT... [--out DIR] [--format md,latex,csv,html] [--strict] [--select val|final|test]

Prints the key-results table (and the per-pair summary) and, with --out, writes every table,
figure and the HTML report there. --strict exits 1 when an expected cell is missing or failed.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

from kdexp import __version__

from . import render
from .collect import collect
from .figures import Figure, make_figures
from .tables import slug
from .pipeline import Analysis, analyse
from .report import write_report
from .rules import RULES
from .tables import Table

FORMATS = ("md", "latex", "csv", "html")
_EXTENSIONS = {"md": (".md", render.markdown), "latex": (".tex", render.latex), "csv": (".csv", render.csv_text)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis",
                                description="Run directories (kdexp's or the study's) -> the paper's tables, "
                                            "figures and a self-contained HTML report.")
    p.add_argument("roots", nargs="+", type=Path, help="directories searched recursively for runs")
    p.add_argument("--out", type=Path, help="write tables, figures and report.html here")
    p.add_argument("--format", default=",".join(FORMATS),
                   help=f"comma-separated subset of {','.join(FORMATS)} (default: all)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if an expected cell is missing or only failed / unfinished runs")
    p.add_argument("--select", choices=sorted(RULES),
                   help="val: test@best-val; final: last epoch; test: best test (optimistic). "
                        "Default: val where runs have a validation split, else final")
    p.add_argument("--experiment", action="append", metavar="NAME",
                   help="only this experiment_name (repeatable); other runs are listed as skipped")
    args = p.parse_args(argv)
    args.formats = [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = set(args.formats) - set(FORMATS)
    if unknown:
        p.error(f"unknown format(s) {', '.join(sorted(unknown))}; choose from {', '.join(FORMATS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing_roots = [str(r) for r in args.roots if not r.is_dir()]
    if missing_roots:
        print(f"error: not a directory: {', '.join(missing_roots)}", file=sys.stderr)
        return 2
    frame = collect(args.roots)
    if frame.empty:
        print(f"error: no runs found under {', '.join(map(str, args.roots))}", file=sys.stderr)
        return 1
    analysis = analyse(frame, args.select, args.experiment)
    print(summary(analysis))
    if args.out:
        command = shlex.join(["python", "-m", "analysis", *(sys.argv[1:] if argv is None else argv)])
        write_outputs(analysis, args.out, args.formats, command)
        print(f"\nwrote tables, figures{' and report.html' if 'html' in args.formats else ''} to {args.out}")
    if args.strict and not analysis.complete:
        print(f"--strict: {len(analysis.cells)} expected cell(s) missing or failed, "
              f"{analysis.unfinished} failed / unfinished run(s) of configurations that never completed", file=sys.stderr)
        return 1
    return 0


def summary(analysis: Analysis) -> str:
    """The terminal view: key results and per-pair tables, then what was left out."""
    parts = []
    for exp in analysis.experiments:
        shown = [t for t in analysis.tables[exp.name] if t.name in ("key_results", "teachers", "pairs")]
        parts += [render.terminal(t) for t in shown]
    parts += [render.terminal(t) for t in analysis.shared]
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


def write_outputs(analysis: Analysis, out: Path, formats: list[str], command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    single = len(analysis.experiments) == 1
    figures: dict[str, list[Figure]] = {}
    for exp in analysis.experiments:
        exp_dir = out if single else out / slug(exp.name)
        _write_tables(analysis.tables[exp.name], exp_dir, formats)
        figures[exp.name] = make_figures(exp, out / "figures")
    _write_tables(analysis.shared + [analysis.problems, analysis.cells_table()], out, formats)
    runs = analysis.frame.assign(config=analysis.frame["config"].map(lambda c: json.dumps(c, default=str)))
    runs.to_csv(out / "runs.csv", index=False)
    if "html" in formats:
        write_report(out / "report.html", analysis, figures, command, __version__)


def _write_tables(tables: list[Table], directory: Path, formats: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for table in tables:
        for fmt in formats:
            if fmt in _EXTENSIONS:
                ext, write = _EXTENSIONS[fmt]
                (directory / f"{table.name}{ext}").write_text(write(table), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
