"""kdexp's SLURM launcher: hydra-submitit-launcher's, with every job's end told truthfully, to SLURM
and to the multirun summary (`_target_` of conf/hydra/launcher/slurm_a100.yaml and every launcher
built on it). Hydra takes launchers only from the `hydra_plugins` namespace package, hence its place.

On a node (`__call__`): a job whose run did not succeed (failed, rejected, locked, interrupted)
raises once kdexp has recorded its outcome, so its array task ends FAILED in `sacct` rather than
COMPLETED, and `afterok` dependencies do not start after it. A job of several tasks (tasks_per_node or
nodes > 1, e.g. slurm_a100_x8) is one run on as many ranks: each task exports submitit's
TorchDistributedEnvironment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for
kdexp.distributed, and the tasks other than rank 0 write nothing into the run dir (no .hydra/).

In the driver (`launch`): hydra-submitit-launcher stops at the first job that did not succeed with
submitit's 40-line report, leaving the other jobs uncollected and no summary. Here every job is
waited for, and a job that could not record its own outcome gets one from the driver, so the
summary (kdexp.summary) lists each job and the exit code is the worst job's:
- SLURM ended it before kdexp could write anything (`scancel`, time limit after the last requeue,
  node failure, out of memory): `unfinished`, with its SLURM state and log file;
- it crashed outside kdexp (e.g. an import error on the node): `failed`, with the error's last line;
- sbatch refused the array (a partition or account the site does not have): every job `rejected`,
  with sbatch's message; nothing was submitted;
- Ctrl-C while waiting: the jobs not yet ended are `interrupted` (exit 130). They are not cancelled:
  they go on in SLURM without the driver (cancelling a study's array for a stray Ctrl-C would throw
  away hours); the summary says how to cancel them and how to collect them later.
"""
from __future__ import annotations

import logging
import os
import sys
import zlib
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from kdexp.outcome import EXIT_CODES, Outcome
from kdexp.summary import record_outcome_if_missing

log = logging.getLogger(__name__)


class RunDidNotSucceed(Exception):
    """Raised on the node so that SLURM records the task as FAILED (its outcome is already recorded)."""


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def __call__(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> JobReturn:
        import submitit

        from kdexp.task import NO_METADATA

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # one run on several ranks; every task sees the node's GPUs, picks LOCAL_RANK's
            # submitit's own port lies among Linux's ephemeral ports (32768-60999), where any connection
            # on the node may hold it; every task derives the same one from the job id
            os.environ.setdefault("MASTER_PORT", str(20000 + zlib.crc32(env.job_id.encode()) % 12000))
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            if env.global_rank:
                sweep_overrides = [*sweep_overrides, NO_METADATA]
        job_return = super().__call__(sweep_overrides, *args, **kwargs)
        status = job_return.return_value  # kdexp.task.main's: the outcome's status (raises what Hydra caught)
        if EXIT_CODES.get(status, 0):
            raise RunDidNotSucceed(f"kdexp: this run's outcome is {status!r} (exit code {EXIT_CODES[status]}): "
                                   f"see the multirun summary, or the run dir's result.json and train.log")
        return job_return

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit  # lazily, as hydra-submitit-launcher does: plugin discovery stays fast
        from submitit.core.utils import FailedJobError

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        numbered = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        for num, overrides in numbered:
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
        try:
            jobs = self._executor(submitit).map_array(self, *zip(*[
                (overrides, "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state())
                for num, overrides in numbered]))
        except FailedJobError as err:  # sbatch's refusal: its own message says what it did not accept
            reason = f"sbatch refused the job array: {_one_line(str(err))}; check the launcher's settings " \
                     f"(hydra/launcher={self.config.hydra.runtime.choices.get('hydra/launcher')})"
            for num, overrides in numbered:
                record_outcome_if_missing(sweep_dir, num, Outcome("rejected", reason), overrides)
            return [_job_return(overrides, "rejected") for _, overrides in numbered]
        except KeyboardInterrupt:  # SystemExit: Hydra would print a traceback for anything else
            print(f"kdexp: interrupted while submitting: part of the array may be queued; `squeue --me "
                  f"--name={self.params['name']}` lists it", file=sys.stderr, flush=True)
            sys.exit(EXIT_CODES["interrupted"])
        returns: list[JobReturn] = []
        try:
            for job, (num, overrides) in zip(jobs, numbered):
                returns.append(_collect(job, num, overrides, sweep_dir))
        except KeyboardInterrupt:  # the summary names the jobs still out there
            returns += _left_running(jobs[len(returns):], numbered[len(returns):], sweep_dir)
        return returns

    def _executor(self, submitit: Any) -> Any:
        """hydra-submitit-launcher's executor, from the same parameters."""
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                                         **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]})
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in shared else f"{self._EXECUTOR}_{key}": value
                                      for key, value in self.params.items()
                                      if key not in ("submitit_folder", "max_num_timeout")})
        if self.params["tasks_per_node"] * self.params["nodes"] > 1:  # one run on several ranks: a task that
            # exits with an error ends the others (after SLURM's KillWait: rank 0 records the failure first)
            executor.update_parameters(**{f"{self._EXECUTOR}_srun_args": ["--kill-on-bad-exit=1"]})
        return executor


def _collect(job: Any, num: int, overrides: list[str], sweep_dir: Path) -> JobReturn:
    """Wait for `job`'s end; its outcome is in the summary's folder, from the job or from here."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return job.results()[0]
    except FailedJobError as err:  # it raised: RunDidNotSucceed (its outcome is recorded) or outside kdexp
        outcome = Outcome("failed", f"{_exception_line(str(err))} (SLURM job {job.job_id}; log: {job.paths.stderr})")
    except UncompletedJobError:
        outcome = Outcome("unfinished", f"SLURM job {job.job_id} ended {job.state} before it recorded an outcome "
                                        f"(log: {job.paths.stderr}); the same command resumes it")
    return _job_return(overrides, record_outcome_if_missing(sweep_dir, num, outcome, overrides))


def _left_running(jobs: list, numbered: list[tuple[int, list[str]]], sweep_dir: Path) -> list[JobReturn]:
    """Ctrl-C: the jobs not collected yet, `interrupted` unless they recorded their own end. They
    are left in SLURM: one shared reason says which, and how to cancel or collect them."""
    ids = [job.job_id for job in jobs]
    named = ", ".join(ids) if len(ids) <= 6 else f"{ids[0]}, {ids[1]}, … {ids[-1]}"
    arrays = " ".join(sorted({job_id.split("_")[0] for job_id in ids}))
    reason = (f"still queued or running in SLURM when the driver stopped waiting ({named}), they go on without it: "
              f"`scancel {arrays}` cancels them; once they end, this same command collects them (completed runs "
              f"are skipped, the others resume)")
    return [_job_return(overrides, record_outcome_if_missing(sweep_dir, num, Outcome("interrupted", reason), overrides))
            for num, overrides in numbered]


def _job_return(overrides: list[str], status: str) -> JobReturn:
    """What Hydra's sweeper expects of each job: its status is the outcome, as kdexp.task.main returns it."""
    return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=status)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _exception_line(report: str) -> str:
    """The last line of the job's traceback (the exception), which submitit's report holds between two rulers."""
    parts = report.split("-" * 22)
    lines = [line.strip() for line in (parts[1] if len(parts) >= 3 else report).splitlines() if line.strip()]
    return lines[-1] if lines else "the job raised"
