#!/usr/bin/env python3
"""`python3 -m launch.gpu_check` (`make gpu-check`): `python -m kdexp.check` plus the measurements,
in one call, on a CUDA machine that has torch but none of kdexp's other dependencies and no network.

  install  what the machine lacks, from the wheelhouse (.wheelhouse/, `make wheelhouse`): pip
           resolves kdexp's requirements against the installed packages and only the missing ones
           go into a private folder on PYTHONPATH, so torch and every installed package stay as
           they are; kdexp runs from this tree (the repo root on PYTHONPATH, as an editable install)
  check    python -m kdexp.check --execution fast: the self-test every user runs on their GPU (every
           speed setting against the reference, compile's graph breaks and recompiles, throughput);
           its check.json and check.log go to <out>/check/
  tests    pytest tests/gpu (CUDA), with tests/test_fast_path.py and tests/test_e2e.py (which pin
           the CPU through protocol=quickstart) alongside
  bench    kdexp.bench: every case eager (reference, fast, fast+cache), then the compiled fast path
           for the issue's two targets, R18 CE and R50->R18 logit from the cache
  packing  aggregate images/s of 1, 2 and 4 concurrent fast R18 bench processes on the one GPU, and
           whether MPS could be used as the machine is (read only: nothing is started or changed)

Every step has a time budget (9 minutes in all); after the install the steps keep a cumulative
schedule, so time a step leaves over goes to the next ones. A failing or overrunning step is
recorded and the next one runs. Writes <out>/gpu_check.json (the summary, rewritten after every
step), gpu_check.log and the bench reports; exits 0 only if every step passed. --cpu-dry (or KDEXP_GPU_CHECK_DRY=1) runs the
same steps on the CPU at tiny sizes, to prove the script here.

Only the standard library is used here: this runs before anything is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE = REPO / ".wheelhouse"
# What a CUDA image with torch is known to lack (hydra, omegaconf, antlr4, submitit, the launcher),
# plus small pure dependencies it may lack or hold too old (tzdata: python-dateutil 4 needs it);
# pip installs only what is missing.
WHEELS = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "submitit", "hydra-submitit-launcher",
          "cloudpickle", "typing_extensions", "tabulate", "tqdm", "tzdata")
BUDGETS = {"install": 45, "check": 200, "tests": 100, "bench": 150, "packing": 45}  # seconds; 540 in all
# The four cases the issue names first, so a bench cut short by its budget still has them.
EAGER_CASES = "r18_ce,r50_r18_logit,r50_r34_logit,r34_r18_feature,r34_ce,r50_ce,r34_r18_logit," \
              "r50_r18_feature,r50_r34_feature"
COMPILED = (("r18_ce", "fast"), ("r50_r18_logit", "fast_cached"))  # the two targets, one graph each
PACKING = (1, 2, 4)
GRAPH_BREAK = re.compile(r"\[__graph_breaks\] Graph break\b.*? in user code at (\S+)")
RECOMPILE = re.compile(r"\[__recompiles\] Recompiling function (\S+) in (\S+)")
GUARD_FAILURE = re.compile(r"\[__recompiles\]\s+- (\d+/\d+: .*)")


@dataclass(frozen=True)
class Sizes:
    """How big each step runs: the study's networks on the GPU, tiny ones on the CPU (--cpu-dry)."""
    device: str
    bench: tuple[str, ...]  # kdexp.bench options shared by every bench run
    check: tuple[str, ...]  # kdexp.check options
    tests: tuple[str, ...]  # pytest arguments
    eager_cases: str
    compiled: tuple[tuple[str, str], ...]  # (case, variant) measured compiled too
    packing: tuple[int, ...]
    packing_steps: int


GPU = Sizes(
    device="cuda",
    bench=("--device", "cuda", "--steps", "60", "--warmup", "5"),
    check=("--device", "cuda", "--execution", "fast"),
    tests=("tests/gpu", "tests/test_fast_path.py", "tests/test_e2e.py"),
    eager_cases=EAGER_CASES, compiled=COMPILED, packing=PACKING, packing_steps=150)
DRY = Sizes(
    device="cpu",
    bench=("--device", "cpu", "--width", "4", "--steps", "2", "--warmup", "1", "--batch-size", "4", "--workers", "0"),
    check=("--device", "cpu", "--execution", "fast", "--size", "tiny"),
    tests=("tests/gpu", "tests/test_fast_path.py::test_bench_runs_on_cpu_and_writes_its_json"),
    eager_cases="r18_ce,r34_r18_logit", compiled=(("r18_ce", "fast"), ("r34_r18_logit", "fast_cached")),
    packing=(1, 2), packing_steps=3)


@dataclass
class Command:
    """A started process: its output is read as it comes (into the log) and a timer kills its whole
    process group at the deadline."""
    argv: list[str]
    process: subprocess.Popen
    started: float
    lines: list[str] = field(default_factory=list)
    rc: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    threads: list = field(default_factory=list, repr=False)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group this command started, nothing else
            self.timed_out = True
        except ProcessLookupError:  # it had ended
            pass

    def record(self) -> dict:
        return {"argv": " ".join(self.argv), "rc": self.rc, "seconds": round(self.seconds, 1),
                "timed_out": self.timed_out}


class Check:
    def __init__(self, args: argparse.Namespace):
        self.out, self.sizes, self.wheelhouse = Path(args.out), DRY if args.cpu_dry else GPU, Path(args.wheelhouse)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="kdexp-gpu-check-"))
        self.log = (self.out / "gpu_check.log").open("a", buffering=1)
        self.log_lock = threading.Lock()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.budgets = {**BUDGETS, **args.budget}
        self.steps = ["install", *[s for s in BUDGETS if s in args.only and s != "install"]]
        self.summary: dict = {"dry": args.cpu_dry, "python": sys.version.split()[0], "started": _utc(),
                              "budgets_s": {s: self.budgets[s] for s in self.steps}, "steps": {}}

    # --- running things -------------------------------------------------------------------------

    def start(self, argv: list, deadline: float, env: dict | None = None) -> Command:
        """Starts argv in its own process group, to be killed with its children at the deadline."""
        argv = [str(a) for a in argv]
        self.note(f"$ {' '.join(argv)}")
        process = subprocess.Popen(argv, cwd=REPO, env=env or self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        cmd = Command(argv, process, time.monotonic())
        timer = threading.Timer(max(0.0, deadline - cmd.started), cmd.kill)
        reader = threading.Thread(target=self._read, args=(cmd,))
        cmd.threads = [timer, reader]
        timer.start()
        reader.start()
        return cmd

    def _read(self, cmd: Command) -> None:
        for line in cmd.process.stdout:
            cmd.lines.append(line)
            with self.log_lock:
                self.log.write(line)

    def finish(self, cmd: Command) -> Command:
        timer, reader = cmd.threads
        cmd.rc = cmd.process.wait()
        reader.join()
        timer.cancel()
        cmd.seconds = time.monotonic() - cmd.started
        self.note(f"  rc {cmd.rc}{' (over budget: killed)' if cmd.timed_out else ''} after {cmd.seconds:.1f} s: "
                  f"{' '.join(cmd.argv[1:4])} ...")
        return cmd

    def run(self, argv: list, deadline: float, env: dict | None = None) -> Command:
        return self.finish(self.start(argv, deadline, env))

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def note(self, line: str) -> None:
        with self.log_lock:
            self.log.write(line + "\n")
        print(line, flush=True)

    # --- the steps --------------------------------------------------------------------------------

    def install(self, deadline: float) -> dict:
        site = self.work / "site"
        pip_env = {k: v for k, v in self.env.items() if not k.startswith("PIP_")}
        pip_env["PIP_CONFIG_FILE"] = os.devnull  # only this wheelhouse: no index, find-links or constraints from config
        pip = self.python("-m", "pip", "--disable-pip-version-check")
        report = self.work / "pip-report.json"
        resolve = self.run([*pip, "install", "--dry-run", "--quiet", "--no-index", "--find-links", self.wheelhouse,
                            "--report", report, *project_requirements()], deadline, pip_env)
        if resolve.rc != 0:
            return {"ok": False, "error": f"pip could not resolve kdexp's requirements from {self.wheelhouse} and "
                    "the installed packages (see the log); build the wheelhouse with `make wheelhouse`",
                    "commands": [resolve.record()]}
        missing = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.loads(report.read_text())["install"]]
        commands = [resolve]
        if missing:
            commands.append(self.run([*pip, "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                                      "--find-links", self.wheelhouse, "--target", site, *missing], deadline, pip_env))
        self.env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        probe = self.run(self.python("-c", "import hydra, omegaconf, submitit, hydra_plugins.hydra_submitit_launcher, "
                                     "kdexp.train, torch, torchvision; print('torch', torch.__version__, "
                                     "'cuda', torch.cuda.is_available())"), deadline)
        commands.append(probe)
        return {"ok": all(c.rc == 0 for c in commands), "installed": missing, "site": str(site),
                "torch": probe.output.strip().splitlines()[-1] if probe.output.strip() else None,
                "commands": [c.record() for c in commands]}

    def tests(self, deadline: float) -> dict:
        """The CUDA tests and the CPU ones side by side (the CPU tests do not use the GPU)."""
        gpu_tests = [t for t in self.sizes.tests if t.startswith("tests/gpu")]
        groups = {"gpu": gpu_tests, "cpu": [t for t in self.sizes.tests if t not in gpu_tests]}
        cores = os.cpu_count() or 1
        env = {**self.env, "OMP_NUM_THREADS": str(max(1, cores // 4))}
        workers = ["-n", "5"] if self.sizes.device == "cuda" and _has_module("xdist") else []
        running = {}
        for name, paths in groups.items():
            if paths:
                junit = self.work / f"pytest_{name}.xml"
                running[name] = (junit, self.start(self.python("-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                               f"--junitxml={junit}", *(workers if name == "gpu" else []),
                                                               *paths), deadline, env))
        results = {}
        for name, (junit, cmd) in running.items():
            record = self.finish(cmd).record()  # first: the report is written as pytest ends
            results[name] = {**junit_counts(junit), **record}
        ok = all(r["rc"] == 0 and "error" not in r for r in results.values())
        return {"ok": ok, **results}

    def check(self, deadline: float) -> dict:
        """kdexp's own self-test, as a user runs it: its verdicts, as it wrote them."""
        out = self.out / "check"
        cmd = self.run(self.python("-m", "kdexp.check", *self.sizes.check, "--out", out), deadline)
        report = _read_json(out / "check.json") or {}  # kdexp.records.CHECK_FILE (this script imports no kdexp)
        return {"ok": cmd.rc == 0 and bool(report.get("ok")), "failed": report.get("failed"),
                "verdicts": [{k: v.get(k) for k in ("name", "ok", "detail", "seconds")} for v in report.get("verdicts", [])],
                "commands": [cmd.record()]}

    def bench(self, deadline: float) -> dict:
        """Every case eager with its reference first (the whole table and the study's hours), then each
        target compiled in a process of its own (one graph each: compiling is what takes the time).
        Each report is rewritten after every row, so a run the budget cuts short keeps its rows."""
        bench = self.python("-m", "kdexp.bench", *self.sizes.bench)
        eager_out = self.out / "bench_eager.json"
        commands = [self.run([*bench, "--cases", self.sizes.eager_cases, "--no-compile", "--out", eager_out], deadline)]
        outs, torch_logs = [], {}
        env = {**self.env, "TORCH_LOGS": "recompiles,graph_breaks"}
        for case, variant in self.sizes.compiled:
            outs.append(self.out / f"bench_compiled_{case}.json")
            # the CPU cannot compile (execution.compile needs CUDA): the dry run takes the same path eagerly
            compiled = "--compile" if self.sizes.device == "cuda" else "--no-compile"
            commands.append(self.run([*bench, "--cases", case, "--variants", variant, compiled, "--out", outs[-1]],
                                     deadline, env))
            torch_logs[case] = torch_log_counts(commands[-1].output)
        eager, *compiled = [_read_json(path) for path in (eager_out, *outs)]
        ok = all(c.rc == 0 for c in commands) and all(r and r["complete"] for r in (eager, *compiled))
        return {"ok": ok, **bench_summary(eager, [r for r in compiled if r]), "compiled_torch_logs": torch_logs,
                "commands": [c.record() for c in commands]}

    def packing(self, deadline: float) -> dict:
        """1, 2, 4 fast R18 bench processes at once; timed only once all are warm (a barrier), and the
        aggregate is every image over the span from the first timed step to the last."""
        rounds, commands = {}, []
        for n in self.sizes.packing:
            barrier = self.work / f"barrier-{n}"
            outs = [self.work / f"pack-{n}-{i}.json" for i in range(n)]
            procs = [self.start(self.python("-m", "kdexp.bench", *self.sizes.bench, "--cases", "r18_ce",
                                            "--variants", "fast", "--no-compile", "--steps", str(self.sizes.packing_steps),
                                            "--barrier", barrier, "--barrier-count", str(n),
                                            "--out", out), deadline) for out in outs]
            commands += [self.finish(p).record() for p in procs]
            rows = [r["results"][0] for r in map(_read_json, outs) if r and r["results"]]
            if len(rows) == n:
                rounds[str(n)] = packed_throughput(rows)
        single = rounds.get("1", {}).get("aggregate_images_per_s")
        for r in rounds.values():
            r["vs_one"] = r["aggregate_images_per_s"] / single if single else None
        ok = len(rounds) == len(self.sizes.packing) and all(c["rc"] == 0 for c in commands)
        return {"ok": ok, "compile": False, "rounds": rounds, "mps": mps_state(), "commands": commands}

    # --- the whole check --------------------------------------------------------------------------

    def main(self) -> int:
        self.summary["gpu"] = gpu_info()
        self.step("install", self.install, time.monotonic() + self.budgets["install"])
        if self.summary["steps"]["install"]["ok"]:  # else nothing can run
            schedule = time.monotonic()
            for name in self.steps[1:]:
                schedule += self.budgets[name]
                self.step(name, getattr(self, name), schedule)
        self.summary["ok"] = len(self.summary["steps"]) == len(self.steps) and \
            all(s["ok"] for s in self.summary["steps"].values())
        self.summary["finished"] = _utc()
        self.write()
        shutil.rmtree(self.work, ignore_errors=True)  # training outputs and data: the log has what they said
        self.print_table()
        return 0 if self.summary["ok"] else 1

    def step(self, name: str, fn: Callable[[float], dict], deadline: float) -> None:
        self.note(f"== {name} (until {max(0.0, deadline - time.monotonic()):.0f} s from now)")
        start = time.monotonic()
        try:
            result = fn(deadline)
        except Exception as err:  # a broken step is reported and the next one runs
            self.log.write(traceback.format_exc())
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        self.summary["steps"][name] = {"ok": result.pop("ok"), "seconds": round(time.monotonic() - start, 1),
                                       "budget_s": self.budgets[name], **result}
        self.write()

    def write(self) -> None:
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=2) + "\n")
        tmp.replace(path)

    def print_table(self) -> None:
        print("\nstep      ok     seconds  budget")
        for name, s in self.summary["steps"].items():
            print(f"{name:9s} {'yes' if s['ok'] else 'NO':5s} {s['seconds']:8.1f} {s['budget_s']:7d}"
                  f"{'  ' + s['error'] if s.get('error') else ''}")
        bench = self.summary["steps"].get("bench", {})
        for row in bench.get("table", []):
            print(f"  {row['case']:16s} {row['variant']:12s} {'compiled' if row['compile'] else 'eager':8s} "
                  f"{row['s_per_epoch']:8.2f} s/epoch  x{row['speedup'] or 0:5.2f}  {row['tflops']:7.2f} TFLOP/s")
        print(f"summary: {self.out / 'gpu_check.json'}  ok: {self.summary['ok']}")


# --- reading what the steps wrote ----------------------------------------------------------------

# What the GPU machine need not have: analysis's power computation (imported only by a table with a Δ;
# compiled, so no pure wheel of it can be carried), and kdexp's own extras in the test extra (the
# trackers' clients: the GPU steps track nothing).
NOT_ON_THE_GPU = re.compile(r"^(statsmodels|kdexp\[)")


def project_requirements() -> list[str]:
    """kdexp's requirements (with the test extra), as pyproject.toml states them, less NOT_ON_THE_GPU."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [r for r in (*project["dependencies"], *project["optional-dependencies"]["test"])
            if not NOT_ON_THE_GPU.match(r)]


def torch_log_counts(output: str) -> dict:
    """Recompiles and graph breaks in TORCH_LOGS=recompiles,graph_breaks output; each with where and why."""
    breaks = GRAPH_BREAK.findall(output)
    recompiles = [f"{fn} in {where}" for fn, where in RECOMPILE.findall(output)]
    return {"recompiles": len(recompiles), "graph_breaks": len(breaks), "recompiled": recompiles[:10],
            "guard_failures": sorted(set(GUARD_FAILURE.findall(output)))[:10], "graph_breaks_at": sorted(set(breaks))[:10]}


def junit_counts(path: Path) -> dict:
    if not path.exists():
        return {"error": "pytest wrote no report"}
    suites = ET.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed}


def bench_summary(eager: dict | None, compiled: list[dict]) -> dict:
    """One table of the bench runs (speedups against the eager run's reference), the cache build,
    the measured matrix rate, the fast R18 step's share of it and the study's device-hours."""
    reference = {r["case"]: r["s_per_epoch"] for r in (eager or {}).get("results", []) if r["variant"] == "reference"}
    reports = [r for r in (eager, *compiled) if r]
    table = []
    for report in reports:
        for r in report["results"]:
            table.append({"case": r["case"], "variant": r["variant"], "compile": report["compile"] and r["variant"] != "reference",
                          "s_per_epoch": r["s_per_epoch"], "images_per_s": r["images_per_s"],
                          "speedup": reference[r["case"]] / r["s_per_epoch"] if r["case"] in reference else None,
                          "tflops": r["tflops"], "fraction_of_peak": r["fraction_of_peak"]})
    r18 = [row for row in table if row["case"] == "r18_ce" and row["variant"] == "fast"]
    best_r18 = min(r18, key=lambda row: row["s_per_epoch"]) if r18 else None
    return {
        "device": reports[0]["device"] if reports else None, "table": table,
        "peak_bf16_tflops": [r["peak_bf16_tflops"] for r in reports],  # one per process: their spread is the noise
        "r18_fast_tflops": best_r18 and best_r18["tflops"], "r18_fast_fraction_of_peak": best_r18 and best_r18["fraction_of_peak"],
        "cache_build_s_per_50k": eager and {arch: b["seconds_per_50k"] for arch, b in eager["cache_build"].items()},
        "study_gpu_hours_eager": eager and eager["study_gpu_hours"],
        "targets": _targets(table, eager),
    }


def _targets(table: list[dict], eager: dict | None) -> dict:
    """The issue's goals, each against kdexp's own reference in this run (reported, never asserted)."""
    def best(case, variant):
        rows = [r for r in table if r["case"] == case and r["variant"] == variant]
        return min(rows, key=lambda r: r["s_per_epoch"]) if rows else None
    cached, r18 = best("r50_r18_logit", "fast_cached"), best("r18_ce", "fast")
    hours = ((eager or {}).get("study_gpu_hours") or {}).get("fast", {}).get("total")
    return {"r50_r18_cached_over_reference": cached and cached["speedup"] and 1 / cached["speedup"], "goal_ratio": 0.2,
            "r18_ce_fast_s_per_epoch": r18 and r18["s_per_epoch"], "goal_s_per_epoch": 1.6,
            "study_fast_gpu_hours_eager": hours, "goal_hours": 4.0}


def packed_throughput(rows: list[dict]) -> dict:
    """Images over the span from the first process's timed start to the last one's end."""
    start, end = min(r["timed_window"][0] for r in rows), max(r["timed_window"][1] for r in rows)
    images = sum(r["images_per_s"] * (r["timed_window"][1] - r["timed_window"][0]) for r in rows)
    return {"processes": len(rows), "aggregate_images_per_s": images / (end - start),
            "per_process_images_per_s": [r["images_per_s"] for r in rows]}


def mps_state() -> dict:
    """Whether CUDA MPS could serve several processes as the machine is: a control daemon already
    running with its pipe directory. Read only; never started or changed here."""
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    running = [p for p in _process_names() if p.startswith("nvidia-cuda-mps")]
    return {"control_binary": shutil.which("nvidia-cuda-mps-control"), "daemon_processes": running,
            "pipe_directory": str(pipe), "pipe_directory_exists": pipe.is_dir(),
            "usable_without_changes": bool(running) and pipe.is_dir(),
            "compute_mode": _nvidia_smi("compute_mode")}


def gpu_info() -> dict | None:
    fields = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "compute_mode", "power.limit")
    values = _nvidia_smi(",".join(fields))
    return dict(zip(fields, (v.strip() for v in values.split(",")))) if values else None


def _nvidia_smi(query: str) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _process_names() -> list[str]:
    names = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            names.append(comm.read_text().strip())
        except OSError:  # the process ended while we looked
            pass
    return names


def _has_module(name: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True).returncode == 0


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- the wheelhouse, built where pip can reach an index ------------------------------------------

def build_wheelhouse(directory: Path) -> list[Path]:
    """Wheels of WHEELS at the versions this environment runs, all pure Python (py3-none-any, so valid
    for any Python 3 the GPU machine has); an sdist-only release (antlr4 4.9.3) is built here."""
    from importlib.metadata import version
    shutil.rmtree(directory, ignore_errors=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", directory, *pins],
                   check=True)
    wheels = sorted(directory.glob("*.whl"))
    impure = [w.name for w in wheels if not w.name.endswith("-none-any.whl")]
    if impure:
        raise SystemExit(f"gpu_check: wheels that are not pure Python cannot travel to any machine: {', '.join(impure)}")
    return wheels


def _budgets(text: str) -> dict[str, int]:
    budgets = {}
    for item in filter(None, text.split(",")):
        name, _, seconds = item.partition("=")
        if name not in BUDGETS or not seconds.isdigit():
            raise argparse.ArgumentTypeError(f"--budget {item!r}: give STEP=SECONDS with STEP one of {', '.join(BUDGETS)}")
        budgets[name] = int(seconds)
    return budgets


def _steps(text: str) -> list[str]:
    unknown = set(text.split(",")) - set(BUDGETS)
    if unknown:
        raise argparse.ArgumentTypeError(f"--only {', '.join(sorted(unknown))}: choose from {', '.join(BUDGETS)}")
    return text.split(",")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m launch.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu-check",
                   help="where the summary, log and bench reports go (default: $OUT, else outputs/gpu-check)")
    p.add_argument("--cpu-dry", action="store_true", default=os.environ.get("KDEXP_GPU_CHECK_DRY") == "1",
                   help="the same steps on the CPU at tiny sizes (also KDEXP_GPU_CHECK_DRY=1)")
    p.add_argument("--wheelhouse", default=str(WHEELHOUSE), help="the wheels to install from (default: .wheelhouse)")
    p.add_argument("--only", type=_steps, default=list(BUDGETS), help="comma-separated steps (install always runs)")
    p.add_argument("--budget", type=_budgets, default={}, help="STEP=SECONDS,... instead of the default budgets")
    p.add_argument("--build-wheelhouse", action="store_true",
                   help="build the wheelhouse here (needs pip's index and kdexp's environment) and exit")
    args = p.parse_args(argv)
    if args.build_wheelhouse:
        wheels = build_wheelhouse(Path(args.wheelhouse))
        size = sum(w.stat().st_size for w in wheels) / 2**20
        print(f"{len(wheels)} wheels, {size:.1f} MiB in {args.wheelhouse}")
        return 0
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
