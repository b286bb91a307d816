"""Time `analysis.collect` (and the expected-grid check) on N synthetic kdexp run dirs.

    .venv/bin/python tests/analysis/bench_collect.py [N=5000] [DIR]

Not a test (it takes a while to write the tree); run it by hand after changing collect.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from runtree import RunTree  # noqa: E402

from analysis.collect import collect  # noqa: E402
from analysis.expected import problem_cells  # noqa: E402


def build(root: Path, n: int) -> None:
    tree = RunTree(root)
    sweep = {"method.alpha": "0.3,0.5,0.7", "method.T": "2,3,4", "seed": "0,1,2,3,4"}
    for i in range(n):
        alpha, T, seed = (0.3, 0.5, 0.7)[i % 3], (2, 3, 4)[i // 3 % 3], i // 9 % 5
        tree.kdexp(acc=0.95, experiment=f"exp{i // 45}", teacher="resnet50", method="logit", alpha=alpha,
                   T=T, seed=seed, epochs=100, sweep=sweep,
                   overrides=[f"method.alpha={alpha}", f"method.T={T}", f"seed={seed}"])


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tmp)
        if not any(root.iterdir()):
            start = time.perf_counter()
            build(root, n)
            print(f"wrote {n} run dirs (100 epochs of metrics each) in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        frame = collect(root)
        print(f"collect: {len(frame)} runs in {time.perf_counter() - start:.2f} s")
        start = time.perf_counter()
        cells = problem_cells(frame)
        print(f"expected grid: {len(cells)} problem cells in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
