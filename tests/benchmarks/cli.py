"""`make bench-cli`: how long the commands a user types many times a day take, each beside its
floor or target (issue 19 §3). A benchmark, not a test: numbers depend on the machine and its load,
so it reports them and passes no judgement beyond printing each target.

- the 81-job v1 dry run (`-m experiment=paper_v1 dry_run=true data=fake`), beside Hydra's own cost
  for the same 81 jobs (tests/benchmarks/noop_train.py: kdexp's config tree, a task doing nothing);
  target ≤ 1.5 × that floor;
- `launch.study --protocol v1 --dry-run data=fake` (133 configs composed; on generated data, which
  is always there, so the dry run does not stop at missing CIFAR-10); target ≤ 15 s;
- `python -m analysis` on a generated tree of 10,000 runs; target ≤ 30 s;
- `--help` of kdexp.train and of analysis; target ≤ 2 s each.

Usage: python tests/benchmarks/cli.py [--runs 10000] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "analysis")]
GRID = ("-m", "experiment=paper_v1", "dry_run=true", "data=fake")


def timed(*command: str) -> float:
    """Wall seconds of `command` (a fresh Python process, as a user starts it); its exit code is
    not judged (a dry run that finds the teachers missing exits 2, as it should)."""
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 2):
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds


def write_tree(root: Path, runs: int) -> None:
    from runtree import RunTree

    tree = RunTree(root)
    for i in range(runs):
        tree.kdexp(acc=0.80 + (i % 97) / 1000, teacher="resnet50", method="logit", alpha=(0.3, 0.5, 0.7)[i % 3],
                   T=(2, 3, 4)[(i // 3) % 3], seed=i // 9, experiment=f"exp{i % 4}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    py = sys.executable
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        figures["help: kdexp.train"] = (timed(py, "-m", "kdexp.train", "--help"), "≤ 2 s")
        figures["help: analysis"] = (timed(py, "-m", "analysis", "--help"), "≤ 2 s")
        floor = timed(py, str(REPO / "tests" / "benchmarks" / "noop_train.py"), *GRID, f"paths.output_dir={out / 'noop'}")
        figures["81-job dry run: Hydra's no-op floor"] = (floor, "the floor")
        dry = timed(py, "-m", "kdexp.train", *GRID, f"paths.output_dir={out / 'dry'}")
        figures["81-job dry run: kdexp"] = (dry, f"≤ 1.5 × floor = {1.5 * floor:.1f} s ({dry / floor:.2f} × now)")
        figures["launch.study --protocol v1 --dry-run data=fake"] = (
            timed(py, "-m", "launch.study", "--cluster", "slurm_a100", "--protocol", "v1", "--dry-run", "--output-dir", str(out / "study"),
                  "data=fake"), "≤ 15 s")
        start = time.perf_counter()
        write_tree(out / "tree", args.runs)
        print(f"(wrote {args.runs} runs in {time.perf_counter() - start:.0f} s; not counted)", flush=True)
        figures[f"analysis of {args.runs} runs"] = (
            timed(py, "-m", "analysis", str(out / "tree"), "--out", str(out / "report")), "≤ 30 s")
    load = os.getloadavg()[0]
    print(f"\n{'command':<42} {'seconds':>8}  target   (load average {load:.1f}, {os.cpu_count()} cores)")
    for name, (seconds, target) in figures.items():
        print(f"{name:<42} {seconds:8.1f}  {target}")
    if args.json:
        args.json.write_text(json.dumps({"load": load, **{k: v[0] for k, v in figures.items()}}, indent=2))


if __name__ == "__main__":
    main()
