"""Submit the whole study to SLURM as a chain of stage drivers after a canary job, and return
once the canary has passed.

    python -m launch.study --cluster slurm_a100|mysite [--protocol v1|v2|quickstart|cifar100|imagenet] [--grids logit,feature,dkd]
                           [--dry-run] [--skip-check] [--no-wait] [--output-dir DIR] [--driver-sbatch=OPTION ...]
                           [HYDRA_OVERRIDE ...]

Design. Each stage's *driver* is a small CPU-only sbatch job (1 CPU, 2 GB, no GPU, 3-day limit:
it only waits, but for its whole GPU array) running one Hydra multirun,
`python -m kdexp.train -m ... hydra/launcher=<cluster>`: hydra-submitit-launcher submits the
GPU job array and the driver blocks until it ends, exiting non-zero when a run failed. Stages
are chained by SLURM dependencies between drivers, so nothing needs the login session once
they are queued.
  stage 0 check:  the canary (launch.check): `python -m kdexp.check` as one GPU job on the
                  students' launcher (partition, account, qos, constraint and GPU resources, setup
                  lines; run under srun as their jobs run; 20-minute limit), checking the execution
                  profile they train with (execution=...). Every driver submitted waits for it
                  (afterok): a failed check starts no training job. This command waits for its
                  verdict (a few minutes once it has a GPU; each state is printed) and prints it in
                  one line: 0 when it passed, 1 naming the failed checks. Ctrl-C stops waiting and
                  leaves everything queued; --no-wait does not wait; --skip-check submits no canary.
                  Every submission that trains checks again (a node's environment can change).
                  Its record: <output-dir>/<experiment>/canary/<job id>/check.json and check.log.
  v1, quickstart: 1 teachers (one driver each; launcher <cluster>_teacher where it exists)
                  2 students: per pair and grid a driver (default grids: logit and feature;
                    quickstart: its smoke grid), afterok its teacher's driver; a baselines
                    driver, no dependency
                  3 analysis: `python -m analysis`, afterany every driver
  v2:             1 teachers (seeds 0-2 per arch; students distil from seed 0)
                  2 selection: seed 0, every cell of each grid, 4 pairs, on val (experiment=paper_v2)
                  3 select: `python -m launch.select` writes <experiment>/selected.json
                  4 finals: per pair and grid the selected cell x seeds 0-4 (read from
                    selected.json when the driver starts; seed 0 is the selection run, reused),
                    baselines R18/R34 x 5 seeds
                  5 analysis
  cifar100:       1 teachers (resnet56, resnet110, resnet32x4, wrn_40_2, vgg13; protocol=crd)
                  2 students: experiment=cifar100_kd, one driver (8 pairs x its methods x 3 seeds)
                  3 analysis (beside the published numbers)
The pairs, seeds and protocol come from the experiment preset (conf/experiment/paper_v1.yaml,
paper_v2.yaml, quickstart.yaml), the cells from the kd_grid presets: --grids names any of them
(conf/kd_grid/ or $KDEXP_SITE_DIR/kd_grid/), e.g. --grids logit,feature,dkd adds a DKD stage driver
per pair. Drivers waiting on a failed driver (or canary) are cancelled by SLURM (--kill-on-invalid-dep);
after a failed driver the analysis (afterany) still runs and reports what is missing. Every driver
runs in this command's cwd with this python (sys.executable), with the partition, account, qos and
setup lines of the cluster's launcher config (--driver-sbatch adds or overrides sbatch options; not
the canary's); extra HYDRA_OVERRIDEs go to every training job (and choose the canary's execution).
Driver scripts, logs and job ids live in <output-dir>/<experiment>/.study/.
Every job of every stage is composed here (Hydra's compose API, exactly as the multirun will) and
checked with kdexp's own validation, with --dry-run too: a bad override is one line naming the
stage and job, before anything is submitted. So is data that is not there (checked as a job's dry
run checks it, once per data config), and a value that no batch script can carry: every script is
made as the submission writes it, each #SBATCH value quoted, and a line break, a backslash, a % in
the output dir, or a job name, partition, account or qos beyond letters, digits and . _ , + - is
refused (--driver-sbatch takes --name=value or --name). The launcher's setup lines are shell, run
as written. Overrides go to every training job, so a key that some stage's config lacks
(method.alpha: teachers and baselines train with method=ce) is refused.
Re-running submits only what is missing: a driver whose runs all have a completed result.json
is skipped, one still queued from an earlier submission is kept, and the select / analysis steps
rerun when anything upstream runs. A resubmitted multirun skips its completed runs and, unless
retry_failed=true is among the overrides, those that failed while training (a run that failed
before it, e.g. for want of its teacher, is redone); such skipped runs count as failed: their
drivers exit non-zero, and so does this command, with the hint.
Exit codes: 0 submitted (or planned), the canary passed and nothing failed; 1 the canary failed, runs
that failed while training will be skipped, or sbatch refused a job; 2 bad input (cluster, override,
output dir, no sbatch); 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml
from hydra.errors import HydraException
from omegaconf import OmegaConf

from kdexp.data import DataError
from kdexp.job import CannotStart
from kdexp.teachers import resolve_teacher_export_path
from kdexp.job import check_data_on_disk  # the job dry run's data check
from kdexp.preflight import config_file_problem
from kdexp.records import atomic_write_json, read_result
from launch import check, epoch_time, sbatch
from launch.plan import (PROTOCOLS, Canary, Driver, Job, OneLineParser, Plan, PlanError, build_plan, estimate,
                         hydra_error, require_writable)
from launch.sweep import compose_job, group_overrides, hydra_session

JOBS_FILE = "jobs.json"


@dataclass
class Decision:
    action: str                 # submit | keep (queued from an earlier submission) | skip (done)
    why: str
    job_id: str | None = None
    stale: str | None = None    # an earlier, still queued job of this driver to cancel first


def decide(plan: Plan, previous: dict[str, str], queued: set[str]) -> dict[str, Decision]:
    """What to do with each driver, given the job ids of an earlier submission still queued."""
    decisions: dict[str, Decision] = {}
    steps = {d.name for d in plan.drivers if d.output}
    for d in plan.drivers:
        running = {a: decisions[a].action for a in d.after if decisions[a].action != "skip"}
        # a CPU step redoes its file after anything upstream ran; the finals, after a new selection
        inputs_change = bool(running) if d.output else bool(steps & set(running))
        prev = previous.get(d.name)
        if prev in queued and "submit" not in running.values():
            decisions[d.name] = Decision("keep", f"still queued as job {prev}", job_id=prev)
        elif d.done() and not inputs_change:
            decisions[d.name] = Decision("skip", _done_note(d))
        else:
            decisions[d.name] = Decision("submit", _todo_note(d), stale=prev if prev in queued else None)
    return decisions


def _done_note(d: Driver) -> str:
    return f"{d.output} exists" if d.output else f"all {_n(len(d.jobs), 'run')} completed"


def _todo_note(d: Driver) -> str:
    if d.awaits_selection:
        return "cells read from selected.json when it starts; seed 0 is the selection run, reused"
    counts = Counter(j.status() for j in d.jobs)
    notes = [f"{counts['completed']}/{len(d.jobs)} runs completed"] if counts["completed"] else []
    if counts["failed"]:
        notes.append(f"{counts['failed']} failed while training: skipped and counted failed unless retry_failed=true")
    return ", ".join(notes)


def describe(plan: Plan, decisions: dict[str, Decision]) -> str:
    """The plan: stages, drivers with their runs, GPU-hours, dependencies and exact commands."""
    out = [f"kdexp study: protocol {plan.protocol} on {plan.cluster} -> {plan.experiment_dir}", *_launchers(plan),
           *_stage0(plan, decisions)]
    for i, stage in enumerate(plan.stages, 1):
        drivers = plan.stage_drivers(stage)
        jobs = [j for d in drivers for j in d.jobs]
        size = f"{_n(len(jobs), 'training run')}, {estimate(jobs)}" if jobs else "CPU only"
        out.append(f"\nstage {i}/{len(plan.stages)} {stage}: {_n(len(drivers), 'driver')}, {size}")
        for d in drivers:
            dec = decisions[d.name]
            what = f"{_n(len(d.jobs), 'run')}, {estimate(d.jobs)}" if d.jobs else "CPU step"
            waits = ", ".join(d.after) if len(d.after) <= 3 else f"all {len(d.after)} drivers above"
            after = f", {d.dependency} on {waits}" if d.after else ""
            why = f" ({dec.why})" if dec.why else ""
            out.append(f"  {d.name}: {what}{after} -> {dec.action.upper()}{why}")
            out += [f"    {line}" for line in d.lines]
    # v2: a final's seed 0 is the selection run of its cell (same config, same run dir): counted once
    distinct = {j.run_dir: j for d in plan.drivers for j in d.jobs}
    out.append(f"\ntotal: {_n(len(distinct), 'distinct training run')}, {estimate(list(distinct.values()))} "
               f"({epoch_time.describe()})")
    out.append(f"drivers: CPU-only sbatch jobs ({' '.join(sbatch.DRIVER_RESOURCES)}); "
               f"scripts and logs in {plan.study_dir}")
    return "\n".join(out)


def canary_decision(plan: Plan, decisions: dict[str, Decision]) -> Decision:
    """Stage 0 runs whenever a training driver is submitted, again on every submission: a node's
    environment (driver, CUDA, modules, the venv) can change between two."""
    if plan.canary is None:
        return Decision("skip", "--skip-check: the drivers start without a canary")
    if not any(decisions[d.name].action == "submit" and d.jobs for d in plan.drivers):
        return Decision("skip", "no training driver to submit")
    return Decision("submit", "on every submission that trains: a node's environment can change")


def _stage0(plan: Plan, decisions: dict[str, Decision]) -> list[str]:
    dec = canary_decision(plan, decisions)
    if plan.canary is None:
        return [f"\nstage 0 check: none ({dec.why})"]
    return [f"\nstage 0 check: {check.describe(plan.canary)}; the drivers submitted below wait for it (afterok): "
            f"a failed check starts no training job -> {dec.action.upper()} ({dec.why})",
            *(f"    {line}" for line in plan.canary.lines)]


def _launchers(plan: Plan) -> list[str]:
    """Which launcher, with which time limit, the teachers and the other runs get: teachers train
    twice as long, and a site without a <cluster>_teacher config gives them the students' limit."""
    lines = []
    for role, teacher in (("teachers", True), ("other training runs", False)):
        drivers = [d for d in plan.drivers if d.jobs and d.jobs[0].cfg.export_teacher == teacher]
        if not drivers:
            continue
        limit = drivers[0].jobs[0].cfg.hydra.launcher.get("timeout_min")
        longest = max(j.gpu_hours for d in drivers for j in d.jobs)
        lines.append(f"{role}: hydra/launcher={drivers[0].launcher}, time limit "
                     f"{f'{limit / 60:g} h' if limit else 'none'} per run (longest ~{longest:.1f} GPU-h)")
    if plan.teacher_launcher == plan.cluster:
        lines[0] += (f"; there is no {plan.cluster}_teacher config, so teachers get {plan.cluster} too (for a "
                     f"longer limit: $KDEXP_SITE_DIR/hydra/launcher/{plan.cluster}_teacher.yaml with "
                     f"`defaults: [{plan.cluster}, _self_]` and timeout_min, see README)")
    return lines


def failed_runs(plan: Plan) -> list[Job]:
    """Runs that failed while training, which this submission's multiruns skip and count as failed."""
    return list({j.run_dir: j for d in plan.drivers for j in d.jobs if j.status() == "failed"}.values())


def failed_note(failed: list[Job], dry_run: bool) -> str:
    first = failed[0].run_dir
    error = (read_result(first) or {}).get("error")
    return (f"{_n(len(failed), 'run')} that failed while training {'would' if dry_run else 'will'} be skipped and "
            f"counted as failed (their drivers exit non-zero; drivers waiting on them are cancelled), e.g. "
            f"{first}{f' ({error})' if error else ''}; add retry_failed=true to train them again")


def check_writable(plan: Plan) -> None:
    """The experiment dir and the teachers' export dirs must be writable, found before anything is
    submitted (without writing anything: a dry run leaves no trace)."""
    teacher_dirs = {resolve_teacher_export_path(j.cfg).parent for d in plan.drivers for j in d.jobs
                    if j.cfg.export_teacher}
    for path in (plan.experiment_dir, *sorted(teacher_dirs)):
        require_writable(path, "choose another --output-dir (or paths.teachers_dir=...)")


def check_data(plan: Plan) -> None:
    """The data of every run still to train is there, checked as its own dry run checks it (downloaded
    data on disk, generated data writable), once per distinct data config: else each job fails on a node."""
    seen: set[str] = set()
    for d in plan.drivers:
        for job in d.jobs:
            key = json.dumps(OmegaConf.to_container(job.cfg.data, resolve=True), sort_keys=True)
            if key in seen or job.status() == "completed":
                continue
            seen.add(key)
            try:
                check_data_on_disk(job.cfg.data)
            except (DataError, CannotStart) as err:
                raise PlanError(f"stage {d.stage} ({job.describe()}): {err}") from err


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def submit(plan: Plan, decisions: dict[str, Decision], extra_sbatch: Sequence[str]) -> str | None:
    """sbatch the canary (when it is due), then every driver marked submit, each with its dependencies
    on the jobs it waits for and on this canary; returns the canary's job id."""
    plan.study_dir.mkdir(parents=True, exist_ok=True)
    jobs_file = plan.study_dir / JOBS_FILE
    ids = _load_ids(jobs_file)
    canary = check.submit(plan.canary) if canary_decision(plan, decisions).action == "submit" else None
    try:
        for d in plan.drivers:
            if decisions[d.name].action == "submit":
                ids[d.name] = _submit_driver(plan, d, decisions, extra_sbatch, canary)
                atomic_write_json(jobs_file, ids)  # after each sbatch: a later failure must not lose an id
    except BaseException as err:
        if canary and not any(decisions[d.name].job_id for d in plan.drivers if decisions[d.name].action == "submit"):
            sbatch.cancel(canary)  # no driver waits for it: it would hold a GPU for nothing
            if isinstance(err, sbatch.SlurmError):
                raise sbatch.SlurmError(f"{err}; canary job {canary} cancelled (no driver waits for it)") from err
        raise
    return canary


def _submit_driver(plan: Plan, d: Driver, decisions: dict[str, Decision], extra_sbatch: Sequence[str],
                   canary: str | None) -> str:
    dec = decisions[d.name]
    if dec.stale:  # queued after a driver that is resubmitted now: it would start too early
        sbatch.cancel(dec.stale)
    for path, text in d.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    script = plan.study_dir / f"{d.name}.sbatch"
    script.write_text(driver_script(plan, d, extra_sbatch))
    waits = [decisions[a].job_id for a in d.after if decisions[a].action != "skip"]
    dec.job_id = sbatch.submit(script, _dependency(d, waits, canary))
    return dec.job_id


def driver_script(plan: Plan, d: Driver, extra_sbatch: Sequence[str]) -> str:
    """The driver's batch script (sbatch.DirectiveError for a value sbatch would misread)."""
    return sbatch.script(f"kdexp-{plan.experiment_dir.name}-{d.name}", plan.study_dir / f"{d.name}-%j.out", d.lines,
                         Path.cwd(), plan.launcher, sbatch.driver_options(plan.launcher, extra_sbatch),
                         "`python -m launch.study`: one stage driver of the study")


def check_scripts(plan: Plan, extra_sbatch: Sequence[str]) -> None:
    """Every batch script a submission can write (the canary's, each driver's) is made here as it
    will be written, so a value that sbatch would misread is refused before anything is submitted."""
    if plan.canary:
        check.check_script(plan.canary)
    for d in plan.drivers:
        try:
            driver_script(plan, d, extra_sbatch)
        except sbatch.DirectiveError as err:
            raise PlanError(f"the {d.name} driver's batch script: {err}") from err


def _dependency(d: Driver, waits: list[str], canary: str | None) -> str | None:
    """The driver's own dependency and, when a canary was submitted, afterok on it (both must hold)."""
    parts = [f"{d.dependency}:{':'.join(waits)}"] if waits else []
    return ",".join([*parts, *([f"afterok:{canary}"] if canary else [])]) or None


def _load_ids(path: Path) -> dict[str, str]:
    return json.loads(path.read_text()) if path.is_file() else {}


def follow_up(plan: Plan, decisions: dict[str, Decision], canary: str | None) -> str:
    active = {n: d.job_id for n, d in decisions.items() if d.action != "skip"}
    skipped = [n for n, d in decisions.items() if d.action == "skip"]
    kept = [n for n, d in decisions.items() if d.action == "keep"]
    if not active:
        return "nothing to submit: every stage is complete"
    lines = [f"\nsubmitted {len(active) - len(kept)} driver job(s); kept {len(kept)} still queued; "
             f"skipped {len(skipped)} complete{': ' + ', '.join(skipped) if skipped else ''}"]
    if canary:
        lines.append(f"  canary: job {canary} (kdexp.check; the drivers submitted wait for it; "
                     f"log {plan.canary.log(canary)})")
    lines += [f"  {name}: job {job_id}" for name, job_id in active.items()]
    ids = [*([canary] if canary else []), *active.values()]
    lines += ["follow them:", "  squeue -u $USER",
              f"  sacct -X -j {','.join(ids)} -o JobID,JobName%40,State,Start,End,Elapsed",
              f"  tail -f {plan.study_dir}/<driver>-<job id>.out   (GPU job logs: {plan.experiment_dir}/.submitit/)",
              f"report when done: {plan.experiment_dir}/report/report.html"]
    return "\n".join(lines)


def _grid_list(text: str) -> list[str]:
    grids = text.split(",")
    if not all(grids):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of kd_grid presets")
    return grids


def _sbatch_option(option: str) -> str:
    try:
        sbatch.directive(option, "this option")
    except sbatch.DirectiveError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return option


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m launch.study", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", required=True, help="hydra/launcher config of the GPU jobs, e.g. slurm_a100")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="v2", help="default: v2 (as kdexp.train)")
    p.add_argument("--grids", type=_grid_list, metavar="GRID,GRID",
                   help="kd_grid presets the students' stages run, one driver per pair and grid, e.g. "
                        "logit,feature,dkd (default: " +
                        "; ".join(f"{name} {','.join(p.grids)}" for name, p in sorted(PROTOCOLS.items())) + ")")
    p.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    p.add_argument("--skip-check", action="store_true",
                   help="submit no canary (stage 0: kdexp.check as one GPU job the drivers wait for)")
    p.add_argument("--no-wait", action="store_true",
                   help="return once submitted, without waiting for the canary's verdict")
    p.add_argument("--output-dir", type=Path, help="paths.output_dir of every run (default: the config's)")
    p.add_argument("--driver-sbatch", action="append", default=[], metavar="OPTION", type=_sbatch_option,
                   help="extra sbatch option for the drivers, e.g. --driver-sbatch=--partition=cpu")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every training job, e.g. data.root=...")
    return p.parse_intermixed_args(argv)


def plan_study(args: argparse.Namespace) -> Plan:
    """The plan, every job composed and validated; PlanError or HydraException on bad input."""
    with hydra_session():
        # parsing every override first reports a syntax error as such, not as some stage's
        paths = group_overrides(args.overrides, "paths")
        # the jobs' default output dir: the paths group, as every job composes it ($KDEXP_OUTPUTS)
        output_dir = args.output_dir or Path(compose_job(paths).paths.output_dir)
        plan = build_plan(args.protocol, args.cluster, output_dir.absolute(), args.overrides, sys.executable,
                          args.grids, check=not args.skip_check)
    if any(j.cfg.dry_run for d in plan.drivers for j in d.jobs):
        raise PlanError("dry_run=true would submit drivers that train nothing: use --dry-run, which composes "
                        "and checks every job here and submits nothing")
    check_writable(plan)
    check_data(plan)
    check_scripts(plan, args.driver_sbatch)
    return plan


def _kept(jobs_file: Path | None) -> str:
    """After a failed or interrupted submission: where the drivers submitted so far are recorded."""
    return f"; the drivers submitted so far are in {jobs_file}, and a rerun keeps them" if jobs_file else ""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    submitted_to = canary = None
    try:
        plan = plan_study(args)
        previous = _load_ids(plan.study_dir / JOBS_FILE)
        live = sbatch.queued(previous.values()) if sbatch.available() else set()
        decisions = decide(plan, previous, live)
        print(describe(plan, decisions), flush=True)
        failed = failed_runs(plan)
        if not args.dry_run:
            if not sbatch.available():
                raise PlanError("sbatch not found: run this on a SLURM login node (or see the plan with --dry-run)")
            submitted_to = plan.study_dir / JOBS_FILE
            canary = submit(plan, decisions, args.driver_sbatch)
            print(follow_up(plan, decisions, canary), flush=True)
    except PlanError as err:  # bad input: one line, nothing submitted
        print(f"launch.study: {err}", file=sys.stderr)
        return 2
    except HydraException as err:
        print(f"launch.study: {hydra_error(err)}", file=sys.stderr)
        return 2
    except (yaml.YAMLError, UnicodeDecodeError) as err:  # a config file (a site launcher, say) composing could not read
        print(f"launch.study: {config_file_problem(err)}", file=sys.stderr)
        return 2
    except (sbatch.SlurmError, OSError) as err:
        print(f"launch.study: {err}{_kept(submitted_to)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"launch.study: interrupted{_kept(submitted_to)}", file=sys.stderr)
        return 130
    if canary and not args.no_wait:
        code = await_canary(plan.canary, canary)
        if code:
            return code
    if failed:
        print(f"launch.study: {failed_note(failed, args.dry_run)}", file=sys.stderr)
        return 1
    return 0


def await_canary(canary: Canary, job_id: str) -> int:
    """Wait for the canary's verdict (minutes once it has a GPU): 0 passed; 1 failed, and SLURM
    cancels every driver that waits for it; 130 Ctrl-C, which leaves everything queued."""
    print("\nwaiting for the canary's verdict (Ctrl-C stops waiting and leaves the study queued)", flush=True)
    try:
        result = check.wait(canary, job_id, lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(f"launch.study: {check.stopped_waiting(canary, job_id)}", file=sys.stderr)
        return 130
    except sbatch.SlurmError as err:
        print(f"launch.study: {err}; {check.stopped_waiting(canary, job_id)}", file=sys.stderr)
        return 1
    if result.ok:
        print(f"{result.line}; the drivers go ahead", flush=True)
        return 0
    print(f"launch.study: {result.line}; no training job starts (SLURM cancels the drivers waiting for it): "
          f"fix that, then run this command again", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
