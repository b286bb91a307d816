"""The canary: `python -m kdexp.check` as one short GPU job on a cluster's launcher, and its verdict.

    python -m launch.check --cluster slurm_a100|mysite [--output-dir DIR] [HYDRA_OVERRIDE ...]

submits the canary alone (for multiruns started by hand: `launch.study` submits the same job as its
stage 0), waits until it ends and prints its verdict in one line. Give it the overrides of the
multirun it guards (experiment=paper_v1 execution=fast hydra.launcher.qos=high ...; sweeps are
ignored): the canary then runs on that multirun's launcher (partition, account, qos, constraint and
GPU resources, setup lines, under srun as its jobs run), checks the execution profile it trains
with (`--execution` of kdexp.check, from the `execution` group), and writes under its experiment dir:
<output dir>/<experiment>/canary/<job id>/check.json and check.log, SLURM's output of the job in
<...>/canary/<job id>.out. The check sizes itself to the device it finds (full on a GPU, tiny on a
CPU) within a 20-minute limit. Ctrl-C stops waiting and leaves the job queued.
Exit codes: 0 the check passed; 1 it failed, or the job ended without a verdict, or sbatch refused
it; 2 bad input (cluster, override, output dir, no sbatch); 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from hydra.errors import HydraException

from kdexp.records import CHECK_FILE, CHECK_LOG
from launch import sbatch
from launch.plan import (Canary, OneLineParser, PlanError, canary_of, hydra_error, missing_launcher,
                         output_dir_override, require_writable)
from launch.sweep import compose_job, fixed, hydra_session

SCRIPT = "canary.sbatch"
MAX_QUERY_S = 30.0  # squeue at most this often once the job is known to be slow; the record is looked for each second


@dataclass(frozen=True)
class Verdict:
    ok: bool
    line: str


def describe(canary: Canary) -> str:
    """What the canary asks SLURM for, in one line."""
    return (f"kdexp.check, 1 GPU job on hydra/launcher={canary.launcher_name}, time limit {canary.minutes} min "
            f"({' '.join(canary.options())})")


def job_name(canary: Canary) -> str:
    return f"kdexp-{canary.root.parent.name}-canary"


def script(canary: Canary) -> str:
    """The canary's batch script: it runs in this cwd, with this python, as the drivers do
    (sbatch.DirectiveError for a value sbatch would misread)."""
    return sbatch.script(job_name(canary), canary.log("%j"), canary.lines, Path.cwd(), canary.launcher,
                         canary.options(), "`python -m launch.check` or `launch.study`: the canary, kdexp.check on "
                         "the students' launcher")


def submit(canary: Canary) -> str:
    """sbatch the canary; returns its job id."""
    text = script(canary)  # a value sbatch would misread: refused before anything is written
    canary.root.mkdir(parents=True, exist_ok=True)
    path = canary.root / SCRIPT
    path.write_text(text)
    return sbatch.submit(path, None)


def wait(canary: Canary, job_id: str, say: Callable[[str], None]) -> Verdict:
    """Wait until kdexp.check has finished its record (check.json) or the job has ended without that,
    saying each state the job passes through (PENDING (Resources), RUNNING on node): a GPU may take a while."""
    seen, interval, next_query = None, 1.0, 0.0
    while not _finished(_record(canary, job_id)):
        if time.monotonic() >= next_query:
            state = sbatch.live_state(job_id)
            if state is None:
                break
            if state != seen:
                say(f"canary job {job_id}: {state}")
                seen, interval = state, 1.0
            next_query = time.monotonic() + interval
            interval = min(interval * 1.5, MAX_QUERY_S)
        time.sleep(1)
    return verdict(canary, job_id)


def _record(canary: Canary, job_id: str) -> dict | None:
    """kdexp.check's record, rewritten after each verdict (atomically) and finished at its end."""
    try:
        return json.loads((canary.out_dir(job_id) / CHECK_FILE).read_text())
    except (OSError, ValueError):
        return None


def _finished(record: dict | None) -> bool:
    return bool(record and record.get("finished"))


def verdict(canary: Canary, job_id: str) -> Verdict:
    """The ended canary's verdict in one line: kdexp.check's record, else how the job ended and the
    last line of its log (a setup line, an import, a time limit that stopped it before the check's end)."""
    out, log, record = canary.out_dir(job_id), canary.log(job_id), _record(canary, job_id)
    if not _finished(record):
        state = sbatch.final_state(job_id) or "ended"
        passed = [v["name"] for v in (record or {}).get("verdicts", []) if v.get("ok")]
        so_far = f" (passed so far: {', '.join(passed)})" if passed else ""
        return Verdict(False, f"canary job {job_id} {state} before kdexp.check finished{so_far}: "
                              f"{_last_line(log)} (log: {log})")
    env = record.get("environment") or {}
    where = (f"canary job {job_id} on {env.get('hostname', '?')} ({env.get('gpu') or record.get('device')}, "
             f"execution {record.get('execution')}, size {record.get('size')})")
    if record.get("ok"):
        return Verdict(True, f"{where}: passed {len(record.get('verdicts', []))} checks ({out / CHECK_FILE})")
    return Verdict(False, f"{where}: FAILED: {', '.join(record.get('failed') or ['?'])} "
                          f"(details: {out / CHECK_LOG})")


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "empty log"


def stopped_waiting(canary: Canary, job_id: str) -> str:
    return (f"stopped waiting for canary job {job_id}, which stays queued; its verdict will be in "
            f"{canary.out_dir(job_id) / CHECK_FILE} (log: {canary.log(job_id)})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m launch.check", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", required=True, help="hydra/launcher config of the GPU jobs, e.g. slurm_a100")
    p.add_argument("--output-dir", type=Path, help="paths.output_dir of the runs it guards (default: the config's)")
    p.add_argument("overrides", nargs="*", help="the overrides of the multirun it guards, e.g. experiment=paper_v1")
    return p.parse_intermixed_args(argv)


def plan_canary(cluster: str, output_dir: Path | None, overrides: Sequence[str]) -> Canary:
    """The canary of a multirun with these overrides on `cluster`; PlanError or HydraException on bad input."""
    with hydra_session():
        problem = missing_launcher(cluster)
        if problem:
            raise PlanError(f"--cluster {cluster}: {problem}")
        paths = [output_dir_override(output_dir.absolute())] if output_dir else []
        canary = canary_of(compose_job([*fixed(overrides), *paths, f"hydra/launcher={cluster}"]), sys.executable)
    require_writable(canary.root)
    check_script(canary)
    return canary


def check_script(canary: Canary) -> None:
    """Its batch script can be written as it is submitted: a value sbatch would misread is bad input."""
    try:
        script(canary)
    except sbatch.DirectiveError as err:
        raise PlanError(f"the canary's batch script: {err}") from err


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        canary = plan_canary(args.cluster, args.output_dir, args.overrides)
        if not sbatch.available():
            raise PlanError("sbatch not found: run this on a SLURM login node")
        print(describe(canary), flush=True)
        job_id = submit(canary)
    except PlanError as err:
        print(f"launch.check: {err}", file=sys.stderr)
        return 2
    except HydraException as err:
        print(f"launch.check: {hydra_error(err)}", file=sys.stderr)
        return 2
    except (sbatch.SlurmError, OSError) as err:
        print(f"launch.check: {err}", file=sys.stderr)
        return 1
    print(f"submitted canary job {job_id}; waiting for its verdict (Ctrl-C stops waiting)", flush=True)
    try:
        result = wait(canary, job_id, lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(f"launch.check: {stopped_waiting(canary, job_id)}", file=sys.stderr)
        return 130
    except sbatch.SlurmError as err:
        print(f"launch.check: {err}; {stopped_waiting(canary, job_id)}", file=sys.stderr)
        return 1
    print(result.line if result.ok else f"launch.check: {result.line}", file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
