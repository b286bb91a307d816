"""The v2 study's selection step (stage 3 of `python -m launch.study --protocol v2`).

    python -m launch.select pick MANIFEST --out selected.json
    python -m launch.select cell selected.json PAIR GRID

`pick` reads the selection runs listed in MANIFEST ({pair: {grid: [run dir, ...]}}, written
by launch.study) and keeps, per pair and grid, the run with the highest `best_val_acc` from
its result.json. Ties keep the first in ascending order of the hyperparameters of the method's
grid, in the order the method class declares them (logit: alpha, then T; dkd: beta, then T), then
any other overridden method.* key by name. The selected cell is that run's `method.*` overrides, verbatim from
its .hydra/overrides.yaml (values ordered via .hydra/config.yaml), so the finals compose exactly
the selected config. Every listed run must have completed with a validation accuracy: a grid
with holes is refused rather than selected from.
`cell` prints one selected cell's overrides for the finals' Hydra command line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from hydra.utils import get_class
from omegaconf import OmegaConf

from kdexp.records import atomic_write_json, read_result

RULE = "max best_val_acc; ties keep the smallest values of the method's grid hyperparameters, in its order"


class SelectionError(RuntimeError):
    pass


def method_overrides(run_dir: Path) -> list[str]:
    """The run's `method.<key>=<value>` overrides, as its command line had them."""
    overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    return [o for o in overrides if o.split("=", 1)[0].startswith("method.")]


def _candidate(run_dir: Path) -> dict:
    result = read_result(run_dir)
    if result is None or result["status"] != "completed" or result["best_val_acc"] is None:
        state = "missing" if result is None else result["status"]
        raise SelectionError(f"{run_dir}: {state} (a selection run must complete with a validation split)")
    overrides = method_overrides(run_dir)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    tie_order = [f"method.{key}" for key in get_class(cfg.method._target_).grid]
    keys = sorted((o.split("=", 1)[0] for o in overrides),
                  key=lambda k: (tie_order.index(k) if k in tie_order else len(tie_order), k))
    order = tuple(OmegaConf.select(cfg, k) for k in keys)
    return {"overrides": overrides, "order": order, "best_val_acc": result["best_val_acc"], "run_dir": str(run_dir)}


def pick_cell(run_dirs: Sequence[str]) -> dict:
    candidates = sorted((_candidate(Path(d)) for d in run_dirs), key=lambda c: c["order"])
    best = max(candidates, key=lambda c: c["best_val_acc"])  # max keeps the first of equal values
    return {"overrides": best["overrides"], "best_val_acc": best["best_val_acc"], "run_dir": best["run_dir"],
            "candidates": len(candidates)}


def pick(manifest: dict[str, dict[str, list[str]]]) -> dict:
    problems, selected = [], {}
    for pair, grids in manifest.items():
        for grid, run_dirs in grids.items():
            try:
                selected.setdefault(pair, {})[grid] = pick_cell(run_dirs)
            except SelectionError as err:
                problems.append(str(err))
    if problems:
        raise SelectionError("cannot select from an incomplete grid:\n  " + "\n  ".join(problems))
    return {"rule": RULE, "selected": selected}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.select", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pick", help="select the best cell per pair and grid")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("cell", help="print a selected cell's overrides")
    c.add_argument("selected", type=Path)
    c.add_argument("pair")
    c.add_argument("grid")
    args = parser.parse_args(argv)
    if args.command == "cell":
        print(" ".join(json.loads(args.selected.read_text())["selected"][args.pair][args.grid]["overrides"]))
        return 0
    try:
        selection = pick(json.loads(args.manifest.read_text()))
    except SelectionError as err:
        print(f"launch.select: {err}", file=sys.stderr)
        return 1
    atomic_write_json(args.out, selection)
    for pair, grids in selection["selected"].items():
        for grid, cell in grids.items():
            print(f"{pair} {grid}: {' '.join(cell['overrides'])} (val {cell['best_val_acc']:.4f}, "
                  f"best of {cell['candidates']})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
