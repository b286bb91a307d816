"""`python -m kdexp.check`: kdexp's self-test on the device it is started on, before a study spends it.

    python -m kdexp.check [--device auto] [--execution reference|fast] [--size tiny|full] [--out DIR]

One process, on generated data, through the real training loop (kdexp.job.build_loop):
  environment     torch, CUDA, cuDNN, GPU, memory, driver, CPUs, kdexp's git commit (recorded)
  reference       a small ResNet-18 trained twice on the reference path (fp32, eager, no cache) in
                  deterministic mode: identical per-step losses and accuracy, all finite
  <setting>       each speed setting the execution profile switches on for this device, alone,
                  against the reference on the same steps: its loss trajectory and final accuracy
                  within the size's tolerances; under compile, graph breaks and recompiles after
                  the first epoch counted (none allowed)
  teacher_cache   cached teacher logits equal the live teacher's on the same views; Logit-KD from
                  the cache against Logit-KD from the live teacher (the reference run as teacher)
  profile         every switched-on setting together (what the study will run) against the reference
  throughput      kdexp.bench: reference and fast for R18 CE and R50->R18 Logit-KD from the cache,
                  and (full size) the study's GPU-hours from the measured rates beside the model's
Settings: `reference` switches on what equals fp32 by construction (channels_last and compile need
CUDA; the fused optimiser and the teacher cache are checked on the CPU too); `fast` adds bf16 and
compile. Writes DIR/check.json and DIR/check.log; prints one line per verdict and a last line
`check: OK ...` or `check: FAILED: names`. Exit 0 when every verdict passed, 1 when one failed,
2 on bad arguments. `--size full` (default on CUDA) is meant to take minutes on one GPU (not yet timed on one); `tiny` (default
on the CPU) well under a minute.

Test switch: KDEXP_CHECK_BREAK=<verdict> adds a 50 % error to that verdict's candidate (its recorded
losses; for teacher_cache, its cached logits), as a broken setting would, so the check must fail it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from hydra import compose, initialize_config_dir

from kdexp import teacher_cache
from kdexp.config import ConfigError, register_configs, validate
from kdexp.data import load_data
from kdexp.execution import Execution
from kdexp.job import git_commit, build_loop, device_name, resolve_device, seed_everything
from kdexp.records import CHECK_FILE, CHECK_LOG, atomic_write_json
from kdexp.teachers import FrozenTeacher
from kdexp.train import CONFIG_DIR

register_configs()  # the schemas compose() below needs
log = logging.getLogger("kdexp.check")
BREAK_VARIABLE = "KDEXP_CHECK_BREAK"
BREAK_FACTOR = 1.5
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Size:
    """How big the check runs, and the tolerances its verdicts are held to."""
    name: str
    width: int  # ResNet-18 base width of the trained networks
    steps: int  # per epoch; every run trains 2 epochs (evaluation, lr step and checkpoint between)
    batch_size: int
    train_images: int
    test_images: int
    early_steps: int  # steps before training's chaos amplifies rounding: compared step by step
    bench: tuple[str, ...]  # kdexp.bench options, its --cases among them
    # The tolerances catch a broken path (a wrong layout, a lost update, a diverging loss), not drift:
    # |relative loss difference| in the early steps, for exact settings (TF32 convolutions in other
    # kernels may round differently) and for bf16 / compile
    exact_loss_rtol: float = 5e-3
    fast_loss_rtol: float = 5e-2
    late_loss_rtol: float = 0.15  # mean loss of the last epoch
    accuracy_pp: float = 5.0  # final test accuracy, percentage points (two seeds of such a run differ by ~2)
    logit_atol: float = 1e-3  # cached vs live teacher logits (fp32), relative to their scale


SIZES = {
    "full": Size("full", width=16, steps=150, batch_size=128, train_images=19200, test_images=2000, early_steps=10,
                 bench=("--steps", "30", "--warmup", "5", "--cases", "r18_ce,r50_r18_logit")),
    # The CPU proves the plumbing: R18 alone (a ResNet-50's bf16 cache build takes minutes on a CPU)
    "tiny": Size("tiny", width=4, steps=4, batch_size=8, train_images=32, test_images=200, early_steps=3,
                 bench=("--width", "4", "--steps", "1", "--warmup", "1", "--batch-size", "2", "--workers", "0",
                        "--cases", "r18_ce"),
                 accuracy_pp=15.0),
}


@dataclass(frozen=True)
class Setting:
    name: str
    change: dict  # Execution fields
    exact: bool  # equals fp32 by construction
    cuda_only: bool = False


SETTINGS = (Setting("channels_last", {"channels_last": True}, exact=True, cuda_only=True),
            Setting("fused", {"fused": True}, exact=True),
            Setting("bf16", {"amp": torch.bfloat16}, exact=False),
            Setting("compile", {"compile": True}, exact=False, cuda_only=True))


@dataclass
class Run:
    """What one training run of the check produced."""
    losses: list[float]
    test_acc: float
    student: torch.nn.Module
    graph_breaks: int = 0
    recompiles_after_warmup: int = 0

    def late_loss(self, steps: int) -> float:
        return sum(self.losses[-steps:]) / steps


@dataclass
class Verdict:
    name: str
    ok: bool
    detail: str
    numbers: dict = field(default_factory=dict)
    seconds: float | None = None

    def line(self) -> str:
        return f"check: {self.name}: {'PASS' if self.ok else 'FAIL'} {self.detail}"


def switched_on(execution: str, device: torch.device) -> list[Setting]:
    """The settings the profile uses on this device: exact ones always (where the device has them),
    bf16 and compile with `fast`."""
    return [s for s in SETTINGS if (s.exact or execution == "fast") and (not s.cuda_only or device.type == "cuda")]


def environment(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "gpu": device_name(device) if gpu else None,
            "gpu_memory_gib": round(gpu.total_memory / 2**30, 1) if gpu else None,
            "driver": _driver_version() if gpu else None, "cpu_count": os.cpu_count(),
            "git_commit": git_commit(), "hostname": socket.gethostname(), "python": platform.python_version()}


def _describe(env: dict) -> str:
    gpu = f"{env['gpu']} ({env['gpu_memory_gib']} GiB, driver {env['driver']})" if env["gpu"] else "no GPU"
    return (f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, {gpu}, {env['cpu_count']} CPUs, "
            f"kdexp {env['git_commit'] or 'outside a git checkout'}")


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


class Check:
    def __init__(self, device: torch.device, execution: str, size: Size, work: Path):
        self.device, self.execution, self.size, self.work = device, execution, size, work
        self.broken = os.environ.get(BREAK_VARIABLE, "")
        self.splits = None
        self.reference: Run | None = None  # the reference CE run: every setting is held against it
        self.kd_live: Run | None = None  # Logit-KD from the live teacher: the cache and profile against it
        self.teacher: FrozenTeacher | None = None  # the reference run's trained student
        self.caches: dict[tuple, torch.Tensor] = {}

    # --- building and running one training run --------------------------------------------------

    def config(self, method: str = "ce", cached: bool = False):
        s = self.size
        teacher = ["teacher=resnet18", f"teacher.width={s.width}"] if method != "ce" else []
        overrides = ["protocol=quickstart", f"trainer.device={self.device}", f"model.width={s.width}",
                     f"method={method}", *teacher, "trainer.epochs=2", f"trainer.max_steps_per_epoch={s.steps}",
                     f"trainer.batch_size={s.batch_size}", "trainer.progress=false", "data.val_size=0",
                     f"data.fake_train_size={s.train_images}", f"data.fake_test_size={s.test_images}",
                     f"paths.data_dir={self.work / 'data'}", f"paths.output_dir={self.work / 'runs'}",
                     f"execution.teacher_cache={cached}"]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=overrides)

    def train(self, name: str, execution: Execution, method: str = "ce", logits: torch.Tensor | None = None) -> Run:
        cfg = self.config(method, cached=logits is not None)
        kd = validate(cfg)
        if self.splits is None:
            self.splits = load_data(cfg.data)
        seed_everything(cfg.seed, cfg.trainer.deterministic)
        teacher = execution.prepare(copy.deepcopy(self.teacher)) if kd.needs_teacher else None
        loop = build_loop(cfg, kd, execution, self.splits, teacher, self.device, self.work / "runs" / name, logits)
        with _dynamo_counts() as counts:
            losses, warm = _record_steps(loop, self.size.steps, counts, BREAK_FACTOR if self.broken == name else 1.0)
            state = loop.fit()  # 2 epochs: evaluation, checkpoint and the lr step between them
            final = counts()
        torch._dynamo.reset()  # each run compiles its own graphs
        values = [float(v) for v in torch.stack(losses).float().cpu()]
        return Run(values, state.history[-1]["test_acc"], loop.student, final["graph_breaks"],
                   final["graphs"] - warm["graphs"])

    # --- the verdicts ---------------------------------------------------------------------------

    def check_reference(self) -> Verdict:
        first = self.train("reference", Execution())
        second = self.train("reference_again", Execution())
        self.reference = first
        finite = all(math.isfinite(v) for v in first.losses)
        same = first.losses == second.losses and first.test_acc == second.test_acc
        detail = (f"{len(first.losses)} steps, loss {first.losses[0]:.3f} -> {first.late_loss(self.size.steps):.3f}, "
                  f"test acc {100 * first.test_acc:.1f} %; a second run "
                  f"{'identical' if same else 'DIFFERS (deterministic mode does not hold)'}"
                  f"{'' if finite else '; NON-FINITE loss'}")
        return Verdict("reference", finite and same, detail,
                       {"test_acc": first.test_acc, "first_loss": first.losses[0], "repeat_identical": same})

    def check_setting(self, setting: Setting) -> Verdict:
        run = self.train(setting.name, dataclasses.replace(Execution(), **setting.change))
        verdict = self.compare(setting.name, run, self.reference, setting.exact)
        if setting.name == "compile":
            clean = run.graph_breaks == 0 and run.recompiles_after_warmup == 0
            verdict.ok = verdict.ok and clean
            verdict.detail += f"; {run.graph_breaks} graph breaks, {run.recompiles_after_warmup} recompiles after epoch 1"
            verdict.numbers.update(graph_breaks=run.graph_breaks, recompiles_after_warmup=run.recompiles_after_warmup)
        return verdict

    def compare(self, name: str, run: Run, reference: Run, exact: bool) -> Verdict:
        s = self.size
        rtol = s.exact_loss_rtol if exact else s.fast_loss_rtol
        early = max(abs(a - b) / max(abs(b), 1e-12) for a, b in
                    zip(run.losses[:s.early_steps], reference.losses[:s.early_steps]))
        late = abs(run.late_loss(s.steps) - reference.late_loss(s.steps)) / max(reference.late_loss(s.steps), 1e-12)
        acc = 100 * abs(run.test_acc - reference.test_acc)
        finite = all(math.isfinite(v) for v in run.losses)
        ok = finite and early <= rtol and late <= s.late_loss_rtol and acc <= s.accuracy_pp
        detail = (f"first {s.early_steps} steps' loss within {early:.1e} (<= {rtol:g}), last epoch's mean loss "
                  f"{late:.1%} (<= {s.late_loss_rtol:.0%}), test acc {100 * run.test_acc:.1f} vs "
                  f"{100 * reference.test_acc:.1f} % (|diff| <= {s.accuracy_pp:g} pp)")
        return Verdict(name, ok, detail, {"early_loss_rdiff": early, "late_loss_rdiff": late, "test_acc": run.test_acc,
                                          "reference_test_acc": reference.test_acc, "accuracy_diff_pp": acc})

    def check_teacher_cache(self) -> Verdict:
        """The exact cache: its logits are the live teacher's on the same views, and KD from it trains
        as KD from the live teacher does."""
        execution = Execution(teacher_cache=True)
        logits = self.cache(execution)
        if self.broken == "teacher_cache":
            logits = logits * BREAK_FACTOR
        gap = self.logit_gap(logits)
        live = self.train("kd_live", Execution(), method="logit")
        cached = self.train("kd_cached", execution, method="logit", logits=logits)
        verdict = self.compare("teacher_cache", cached, live, exact=True)
        verdict.ok = verdict.ok and gap <= self.size.logit_atol
        verdict.detail = f"cached vs live logits max diff {gap:.1e} of their scale (<= {self.size.logit_atol:g}); KD " \
                         + verdict.detail
        verdict.numbers["logit_max_rdiff"] = gap
        self.kd_live = live
        return verdict

    def cache(self, execution: Execution) -> torch.Tensor:
        """The teacher's logits of every view, built as `execution` computes them (its precision and
        memory format decide them; the optimiser does not), once per such pair."""
        key = (execution.amp, execution.channels_last)
        if key not in self.caches:
            teacher = execution.prepare(copy.deepcopy(self.teacher))
            self.caches[key] = teacher_cache.build(teacher, self.splits.train_x, execution, layout=self.splits.layout)
        return self.caches[key]

    def logit_gap(self, logits: torch.Tensor) -> float:
        """Largest |cached - live| over a training epoch's batches, relative to the logits' scale."""
        cfg = self.config("logit", cached=True)
        loop = build_loop(cfg, validate(cfg), Execution(teacher_cache=True), self.splits,
                          copy.deepcopy(self.teacher), self.device, self.work / "runs" / "gap", logits)
        gaps, scale = [], []
        with torch.no_grad():
            for batch in loop.train.epoch(1):
                live = self.teacher(batch.x)
                gaps.append((teacher_cache.lookup(logits, batch) - live).abs().max())
                scale.append(live.abs().max())
        return float(torch.stack(gaps).max() / torch.stack(scale).max().clamp_min(1e-12))

    def check_profile(self, settings: list[Setting]) -> Verdict:
        execution = dataclasses.replace(Execution(teacher_cache=True), **{k: v for s in settings for k, v in s.change.items()})
        run = self.train("profile", execution, method="logit", logits=self.cache(execution))
        verdict = self.compare("profile", run, self.kd_live, exact=all(s.exact for s in settings))
        verdict.detail = f"{self.execution} ({' + '.join(s.name for s in settings)} + teacher_cache), KD: " + verdict.detail
        return verdict

    def check_throughput(self) -> Verdict:
        from kdexp import bench  # its Hydra compositions and timings: only here
        out = self.work / "bench.json"
        args = ["--device", str(self.device), *self.size.bench, "--variants", "reference,fast,fast_cached",
                "--out", str(out)]
        if self.execution == "reference":
            args.append("--no-compile")
        with (self.work / "bench.log").open("w") as printed, contextlib.redirect_stdout(printed):
            report = bench.main(args)
        log.info("kdexp.bench said:\n%s", (self.work / "bench.log").read_text())
        rows = {(r["case"], r["variant"]): r for r in report["results"]}
        numbers = {f"{case}_{variant}_images_per_s": r["images_per_s"] for (case, variant), r in rows.items()}
        numbers["study_gpu_hours"] = study_hours(rows) if self.size.name == "full" else None
        detail = ", ".join(f"{case} {variant} {r['images_per_s']:.0f} img/s" for (case, variant), r in rows.items())
        hours = numbers["study_gpu_hours"]
        if hours:
            detail += (f"; study v1 ~{hours['reference']:.1f} GPU-h reference, ~{hours['fast']:.1f} fast "
                       f"(modelled A100 reference: {hours['modelled_a100']:.1f})")
        return Verdict("throughput", True, detail, numbers)

    # --- the whole check ------------------------------------------------------------------------

    def steps(self) -> Iterator[tuple[str, Callable[[], Verdict]]]:
        """(name, verdict) in order; the KD checks distil from the reference run's trained student."""
        settings = switched_on(self.execution, self.device)
        yield "reference", self.check_reference
        self.teacher = FrozenTeacher(copy.deepcopy(self.reference.student)).to(self.device)
        for setting in settings:
            yield setting.name, lambda setting=setting: self.check_setting(setting)
        yield "teacher_cache", self.check_teacher_cache
        if settings:
            yield "profile", lambda: self.check_profile(settings)
        yield "throughput", self.check_throughput


def _record_steps(loop, steps_per_epoch: int, counts: Callable[[], dict], factor: float) -> tuple[list, dict]:
    """Every step's total loss (kept on the device: no synchronisation per step), and Dynamo's counts
    as the second epoch starts (after warm-up: capture and compilation belong to the first)."""
    losses: list[torch.Tensor] = []
    warm: dict = {"graphs": 0}
    step = loop.step

    def recorded(batch):
        if len(losses) == steps_per_epoch:
            warm.update(counts())
        parts, logits = step(batch)
        losses.append(parts["loss"].detach() * factor)
        return parts, logits
    loop.step = recorded
    return losses, warm


@contextlib.contextmanager
def _dynamo_counts() -> Iterator[Callable[[], dict]]:
    """Dynamo's graph and graph-break counters as they grow inside the block."""
    from torch._dynamo.utils import counters
    counters.clear()
    yield lambda: {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def study_hours(rows: dict) -> dict:
    """The v1 study's GPU-hours from the measured rates: the model's A100 estimate of each measured
    case's epoch against what was measured gives this GPU's speed, applied to the model's study."""
    from kdexp.bench import STUDY, CASES
    from launch.epoch_time import epoch_seconds  # the cost model lives with the planner; full size only
    modelled = {case: epoch_seconds(_study_config(CASES[case])) for case in {c for _, c, _, _ in STUDY}}
    total = sum(runs * epochs * modelled[case] for _, case, runs, epochs in STUDY) / 3600
    out = {"modelled_a100": total}
    for variant, measured in (("reference", (("r18_ce", "reference"), ("r50_r18_logit", "reference"))),
                              ("fast", (("r18_ce", "fast"), ("r50_r18_logit", "fast_cached")))):
        ratios = [rows[key]["s_per_epoch"] / modelled[key[0]] for key in measured if key in rows]
        out[variant] = total * sum(ratios) / len(ratios) if ratios else None
    return out


def _study_config(case):
    teacher = [f"teacher={case.teacher}"] if case.teacher else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=["protocol=v1", f"model={case.student}", *teacher,
                                                        f"method={case.method}"])


def run_check(device: torch.device, execution: str, size: Size, out: Path) -> dict:
    started = time.time()
    report = {"schema_version": SCHEMA_VERSION, "ok": False, "failed": [], "device": device_name(device),
              "execution": execution, "size": size.name, "started": _utc(started), "finished": None,
              "environment": environment(device), "verdicts": []}
    print(f"check: environment: {_describe(report['environment'])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kdexp-check-") as work:
        check = Check(device, execution, size, Path(work))
        for name, run in check.steps():
            verdict = _guarded(name, run)
            report["verdicts"].append(dataclasses.asdict(verdict))
            print(verdict.line(), flush=True)
            atomic_write_json(out / CHECK_FILE, report)  # a check cut short keeps its verdicts
            if verdict.name == "reference" and not verdict.ok:
                break  # nothing else can be compared with a broken reference
    report["failed"] = [v["name"] for v in report["verdicts"] if not v["ok"]]
    report["ok"] = not report["failed"] and any(v["name"] == "reference" for v in report["verdicts"])
    report["finished"], report["seconds"] = _utc(time.time()), round(time.time() - started, 1)
    atomic_write_json(out / CHECK_FILE, report)
    return report


def _guarded(name: str, run: Callable[[], Verdict]) -> Verdict:
    """A verdict that raised fails, naming the error (its traceback goes to the log)."""
    start = time.monotonic()
    try:
        verdict = run()
    except Exception as err:
        log.error("check %s raised:\n%s", name, traceback.format_exc())
        first_line = str(err).splitlines()[0] if str(err) else ""
        verdict = Verdict(name, False, f"raised {type(err).__name__}: {first_line}")
    verdict.seconds = round(time.monotonic() - start, 1)
    return verdict


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdexp.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--execution", choices=("reference", "fast"), default="reference",
                   help="the execution profile to check: the study's (reference, default) or fast (bf16, compile)")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="full (default on CUDA) | tiny (default on the CPU)")
    p.add_argument("--out", default="outputs/check", help="where check.json and check.log go (default: outputs/check)")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ConfigError as err:
        p.error(str(err).replace("trainer.device", "--device"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = SIZES[args.size or ("full" if device.type == "cuda" else "tiny")]
    with _logging_to(out / CHECK_LOG):
        report = run_check(device, args.execution, size, out)
    verdicts = len(report["verdicts"])
    if report["ok"]:
        print(f"check: OK ({verdicts} verdicts, {report['seconds']:.0f} s on {report['device']}): {out / 'check.json'}")
        return 0
    print(f"check: FAILED: {', '.join(report['failed'])} (on {report['device']}; details: {out / CHECK_LOG})")
    return 1


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """Tracebacks and the loop's own log lines go to the file; the terminal gets one line per verdict."""
    root = logging.getLogger()
    handler, level = logging.FileHandler(path), root.level
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


if __name__ == "__main__":
    sys.exit(main())
