"""`python -m kdexp.bench`: the reference loop against the fast path, in one process on one device.

Every case (a student, its teacher and method) is timed through the real training loop on
synthetic CIFAR-shaped data, with the trainer config the study uses except for:
  reference    data.loader=torch (PIL transforms in DataLoader workers), fp32, eager, default SGD
  fast         data.loader=tensor on the device, execution=fast (bf16; channels_last and fused SGD
               on CUDA) and, on CUDA, execution.compile=true unless --no-compile
  fast_cached  (logit cases) fast with execution.teacher_cache=true
A timing skips --warmup steps (compilation, CUDA-graph capture, worker start-up), times --steps
steps with their data loading, and extrapolates to an epoch of 50,000 images (evaluation is not
included). The cache's one-off build and the study's GPU-hours follow from the measurements.
Each row also gives the step's achieved TFLOP/s (its FLOPs counted by torch's FlopCounterMode)
against the device's bf16 matrix rate, measured in the same run. The JSON is rewritten after
every row ("complete": false until the last), so a run cut short keeps what it measured.

    python -m kdexp.bench --device cuda --out outputs/bench-h100.json
    python -m kdexp.bench --device cpu --width 4 --steps 2      # a smoke run
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from kdexp import teacher_cache
from kdexp.config import ConfigError, register_configs, validate
from kdexp.data import CIFAR10_LAYOUT, Splits
from kdexp.execution import Execution
from kdexp.job import build_loop, device_name, resolve_device, seed_everything
from kdexp.loop import Loop
from kdexp.models import build_model
from kdexp.records import atomic_write_json
from kdexp.teachers import FrozenTeacher
from kdexp.train import CONFIG_DIR

register_configs()  # the schemas compose() below needs

EPOCH_IMAGES = CIFAR10_LAYOUT.train_size
TEST_IMAGES = 256


@dataclass(frozen=True)
class Case:
    student: str
    teacher: str | None
    method: str  # ce | logit | feature


CASES = {
    "r18_ce": Case("resnet18", None, "ce"),
    "r34_ce": Case("resnet34", None, "ce"),
    "r50_ce": Case("resnet50", None, "ce"),
    "r34_r18_logit": Case("resnet18", "resnet34", "logit"),
    "r50_r18_logit": Case("resnet18", "resnet50", "logit"),
    "r50_r34_logit": Case("resnet34", "resnet50", "logit"),
    "r34_r18_feature": Case("resnet18", "resnet34", "feature"),
    "r50_r18_feature": Case("resnet18", "resnet50", "feature"),
    "r50_r34_feature": Case("resnet34", "resnet50", "feature"),
}
# The study, as (part, case, runs, epochs): teachers 2 x 200 epochs, baselines 2 x 3 seeds,
# Logit-KD 3 pairs x 9 cells x 3 seeds, Feature-KD 3 pairs x 3 cells x 3 seeds, 100 epochs each.
STUDY = [("teachers", "r34_ce", 1, 200), ("teachers", "r50_ce", 1, 200),
         ("baselines", "r18_ce", 3, 100), ("baselines", "r34_ce", 3, 100),
         *[("logit", f"{pair}_logit", 27, 100) for pair in ("r34_r18", "r50_r18", "r50_r34")],
         *[("feature", f"{pair}_feature", 9, 100) for pair in ("r34_r18", "r50_r18", "r50_r34")]]
VARIANTS = {
    "reference": ["data.loader=torch", "execution=reference", "execution.channels_last=false", "execution.fused=false",
                  "execution.teacher_cache=false"],
    "fast": ["data.loader=tensor", "execution=fast", "execution.teacher_cache=false"],
    "fast_cached": ["data.loader=tensor", "execution=fast", "execution.teacher_cache=true"],
}


class TimedBatches:
    """The loop's batches, timing the steps after the first `warmup` (their data loading included).
    `ready`, called once warm, may block: several processes then start timing together."""

    def __init__(self, batches, warmup: int, device: torch.device, ready: Callable[[], None]):
        self.batches, self.warmup, self.device, self.ready = batches, warmup, device, ready
        self.warmup_seconds = self.seconds = math.nan
        self.window: tuple[float, float] | None = None  # wall-clock start and end of the timed steps

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int):
        start = timed = time.perf_counter()
        wall = time.time()
        for i, batch in enumerate(self.batches.epoch(epoch)):
            if i == self.warmup:
                self.warmup_seconds = _now(self.device) - start
                self.ready()
                timed, wall = time.perf_counter(), time.time()
            yield batch
        self.seconds = _now(self.device) - timed
        self.window = (wall, wall + self.seconds)


def barrier(directory: Path, name: str, count: int, timeout: float = 900.0) -> None:
    """Wait until `count` processes have called this with the same directory and name (a file each)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.{os.getpid()}.ready").touch()
    deadline = time.monotonic() + timeout
    while len(list(directory.glob(f"{name}.*.ready"))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"--barrier {directory}: fewer than {count} processes reached {name} in {timeout:.0f} s")
        time.sleep(0.01)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = resolve_device(args.device)
        self.compile = self.device.type == "cuda" if args.compile is None else args.compile
        n = args.images or min(EPOCH_IMAGES, (args.warmup + args.steps) * args.batch_size)
        self.splits = Splits(*_synthetic(n, 0), *_synthetic(0, 1), *_synthetic(TEST_IMAGES, 2))
        self.caches: dict[str, torch.Tensor] = {}
        self.cache_build: dict[str, dict] = {}
        self.run_dir = Path(args.out).parent  # never written: only train_epoch runs
        self.peak_tflops = matmul_tflops(self.device, args.matmul_size or (8192 if self.device.type == "cuda" else 128))
        print(f"bf16 matrix rate: {self.peak_tflops:.1f} TFLOP/s", flush=True)

    def config(self, case: Case, variant: str):
        a = self.args
        teacher = [f"teacher={case.teacher}", f"teacher.width={a.width}"] if case.teacher else ["teacher=none"]
        overrides = [f"model={case.student}", f"model.width={a.width}", *teacher, f"method={case.method}",
                     "protocol=v1", f"trainer.device={self.device}", f"trainer.batch_size={a.batch_size}",
                     f"trainer.max_steps_per_epoch={a.warmup + a.steps}", "trainer.progress=false",
                     f"data.num_workers={a.workers}", *VARIANTS[variant]]
        if variant != "reference":
            overrides.append(f"execution.compile={self.compile}")
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=overrides)

    def measure(self, case: Case, variant: str) -> dict:
        cfg = self.config(case, variant)
        method = validate(cfg)
        execution = Execution.resolve(cfg.execution, self.device, method, cfg.data.loader)
        seed_everything(0, cfg.trainer.deterministic)
        teacher = self.teacher(case.teacher, execution) if case.teacher else None
        logits = self.cache(case.teacher, teacher, execution) if execution.teacher_cache else None
        loop = build_loop(cfg, method, execution, self.splits, teacher, self.device, self.run_dir, logits)
        flops = step_flops(loop, self.args.batch_size, cfg.model.num_classes, logits is not None)
        timer = loop.train = TimedBatches(loop.train, self.args.warmup, self.device, lambda: self.ready(case, variant))
        loop.train_epoch(1)
        images = self.args.steps * self.args.batch_size
        if self.compile:
            torch._dynamo.reset()  # frees this case's graphs before the next is captured
        tflops = flops * self.args.steps / timer.seconds / 1e12
        return {"s_per_epoch": timer.seconds * EPOCH_IMAGES / images, "images_per_s": images / timer.seconds,
                "warmup_s": timer.warmup_seconds, "step_gflop": flops / 1e9, "tflops": tflops,
                "fraction_of_peak": tflops / self.peak_tflops, "timed_window": timer.window}

    def ready(self, case: Case, variant: str) -> None:
        if self.args.barrier:
            barrier(Path(self.args.barrier), f"{case.student}-{case.teacher}-{case.method}-{variant}",
                    self.args.barrier_count)

    def teacher(self, arch: str, execution: Execution) -> FrozenTeacher:
        return execution.prepare(FrozenTeacher(build_model(arch, width=self.args.width)).to(self.device))

    def cache(self, arch: str, teacher: FrozenTeacher, execution: Execution) -> torch.Tensor:
        """The teacher's logit cache for the synthetic images, built (and timed) once per teacher."""
        if arch not in self.caches:
            start = _now(self.device)
            self.caches[arch] = teacher_cache.build(teacher, self.splits.train_x, execution)
            seconds = _now(self.device) - start
            n = len(self.splits.train_x)
            self.cache_build[arch] = {"seconds": seconds, "images": n, "seconds_per_50k": seconds * EPOCH_IMAGES / n}
            print(f"cache build {arch}: {seconds:.1f} s for {n} images x {teacher_cache.VIEWS} views "
                  f"(~{seconds * EPOCH_IMAGES / n:.0f} s for 50,000)", flush=True)
        return self.caches[arch]

    def run(self, write: Callable[[dict], None]) -> dict:
        """Measures every case and variant, calling `write` with the report so far after each."""
        rows: list[dict] = []
        for name in self.args.cases.split(","):
            case = CASES[name]
            reference = None
            for variant in self.variants(case):  # "reference" first: every ratio is against it
                row = {"case": name, "variant": variant, **self.measure(case, variant)}
                reference = reference or (row if variant == "reference" else None)
                row["speedup"] = reference["s_per_epoch"] / row["s_per_epoch"] if reference else None
                rows.append(row)
                speedup = f"  x{row['speedup']:.2f}" if reference else ""
                print(f"{name:16s} {variant:12s} {row['s_per_epoch']:9.2f} s/epoch {row['images_per_s']:9.0f} img/s "
                      f"{row['tflops']:7.2f} TFLOP/s{speedup}", flush=True)
                write(self.report(rows, complete=False))
        report = self.report(rows, complete=True)
        write(report)
        return report

    def variants(self, case: Case) -> list[str]:
        return [v for v in VARIANTS if v in self.args.variants.split(",") and (v != "fast_cached" or case.method == "logit")]

    def report(self, rows: list[dict], complete: bool) -> dict:
        a = self.args
        return {"device": device_name(self.device), "torch": torch.__version__, "width": a.width,
                "batch_size": a.batch_size, "steps": a.steps, "warmup": a.warmup, "images": len(self.splits.train_x),
                "compile": self.compile, "peak_bf16_tflops": self.peak_tflops, "complete": complete,
                "results": rows, "cache_build": self.cache_build, "study_gpu_hours": study_hours(rows, self.cache_build)}


def _synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 10, (n,), generator=g)


def step_flops(loop: Loop, batch_size: int, num_classes: int, cached: bool) -> int:
    """FLOPs of one training step (both networks' forward, the loss, the student's backward; not the
    optimiser's element-wise update), counted by FlopCounterMode on one eager step of random data."""
    device = next(loop.student.parameters()).device
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    teacher_logits = torch.randn(batch_size, num_classes, device=device) if cached else None
    with FlopCounterMode(display=False) as counter:
        parts, _ = loop.losses(x, y, teacher_logits)
        parts["loss"].backward()
    loop.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_tflops(device: torch.device, n: int, repeats: int = 5, products: int = 10) -> float:
    """The device's bf16 matrix rate: n x n x n products of random matrices (never zeros, which run
    faster), the median over `repeats` timings of `products` back-to-back products."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = _now(device)
        for _ in range(products):
            a @ b
        times.append(_now(device) - start)
    return 2 * n**3 * products / statistics.median(times) / 1e12


def study_hours(rows: list[dict], cache_build: dict[str, dict]) -> dict:
    """The whole study's device-hours from the measured s/epoch: reference, and fast (Logit-KD from
    the cache, plus one cache build per teacher). A part whose cases were not measured is null."""
    s = {(r["case"], r["variant"]): r["s_per_epoch"] for r in rows}
    out: dict = {"missing": sorted({case for _, case, _, _ in STUDY if (case, "reference") not in s})}
    for variant in ("reference", "fast"):
        hours: dict[str, list[float | None]] = {}
        for part, case, runs, epochs in STUDY:
            seconds = s.get((case, "fast_cached" if variant == "fast" and part == "logit" else variant))
            hours.setdefault(part, []).append(None if seconds is None else runs * epochs * seconds / 3600)
        if variant == "fast":
            builds = [cache_build.get(arch, {}).get("seconds_per_50k") for arch in ("resnet34", "resnet50")]
            hours["teacher_cache_builds"] = [None if b is None else b / 3600 for b in builds]
        parts = {part: _total(values) for part, values in hours.items()}
        out[variant] = {**parts, "total": _total(list(parts.values()))}
    return out


def _total(values: list[float | None]) -> float | None:
    return None if None in values else sum(values)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m kdexp.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--width", type=int, default=64, help="base width of every network (64 = the study's)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per case and variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, capture, workers)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the reference loop")
    p.add_argument("--images", type=int, default=None,
                   help="synthetic training images (default: just enough for the steps); the cache covers them all")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (fast_cached: logit cases only)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="n of the timed n x n x n bf16 products (default: 8192 on CUDA, 128 on the CPU)")
    p.add_argument("--barrier", default=None, metavar="DIR",
                   help="start each timing only when --barrier-count processes given this DIR are warm (packing runs)")
    p.add_argument("--barrier-count", type=int, default=1)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="execution.compile in the fast path (default: on CUDA only)")
    p.add_argument("--out", default="outputs/bench.json")
    args = p.parse_args(argv)
    for option, known in (("cases", CASES), ("variants", VARIANTS)):
        unknown = set(getattr(args, option).split(",")) - set(known)
        if unknown:
            p.error(f"unknown --{option} {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    logging.basicConfig(level=logging.WARNING)
    try:
        report = Bench(args).run(lambda report: atomic_write_json(Path(args.out), report))
    except ConfigError as err:  # a flag this machine cannot honour (--device cuda without a GPU, --compile on the CPU)
        p.exit(2, f"{p.prog}: error: {str(err).replace('trainer.device', '--device')}\n")
    hours = report["study_gpu_hours"]
    print(f"study device-hours: reference {_fmt(hours['reference']['total'])}, fast {_fmt(hours['fast']['total'])}"
          f"{'  (missing cases: ' + ', '.join(hours['missing']) + ')' if hours['missing'] else ''}; wrote {args.out}")
    return report


def _fmt(hours: float | None) -> str:
    return "n/a" if hours is None else f"{hours:.1f} h"


if __name__ == "__main__":
    main()
