"""python -m analysis ROOT... [--out DIR] [--format md,latex,csv,html] [--strict] [--select val|final|test]

Prints the key-results table (and the per-pair and teacher-vs-student summaries) and, with --out,
writes every table, figure and the HTML report there (whole, replacing an earlier report: output.py).
Exits 1 where no run completed, and with --strict when an expected cell is missing or failed.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn, Sequence

from .rules import RULES

FORMATS = ("md", "latex", "csv", "html")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, not argparse's usage block: the usage is one `--help` away."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m analysis",
                                description="Run directories (kdexp's or the study's) -> the paper's tables, "
                                            "figures and a self-contained HTML report.")
    p.add_argument("roots", nargs="+", type=Path, help="directories searched recursively for runs")
    p.add_argument("--out", type=Path, help="write tables, figures and report.html here")
    p.add_argument("--format", help=f"with --out: comma-separated subset of {','.join(FORMATS)} (default: all)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if an expected cell is missing, a configuration has only failed, corrupt or "
                        "unfinished runs, or an --experiment has no run")
    p.add_argument("--select", choices=sorted(RULES),
                   help="val: test@best-val; final: last epoch; test: best test (optimistic). "
                        "Default: val where runs have a validation split, else final")
    p.add_argument("--experiment", action="append", metavar="NAME",
                   help="only this experiment_name (repeatable); other runs are listed as skipped")
    args = p.parse_args(argv)
    if args.format is not None and args.out is None:
        p.error(f"--format {args.format!r} chooses what --out DIR gets; without --out nothing is written "
                "(add --out DIR, or drop --format)")
    chosen = ",".join(FORMATS) if args.format is None else args.format
    args.formats = [f.strip() for f in chosen.split(",") if f.strip()]
    unknown = set(args.formats) - set(FORMATS)
    if unknown or not args.formats:
        named = f"unknown format(s) {', '.join(sorted(unknown))}" if unknown else f"--format {args.format!r} names no format"
        p.error(f"{named}; choose from {', '.join(FORMATS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from .cli import run  # here: --help and a bad argument answer without loading pandas and torch
    return run(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
