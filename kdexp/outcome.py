"""How one start of a run ended, and the exit code that tells scripts and SLURM's `afterok`.

| code | meaning |
|---|---|
| 0 | completed, or skipped because it completed before; a dry run that found nothing wrong |
| 1 | a run failed: now, or before (a start that skips a failed run without `retry_failed=true`); on SLURM, a job that ended without a result (`unfinished`: cancelled, time limit after the last requeue, node failure) |
| 2 | rejected before anything was written (invalid config, export dir not writable); a dry run that found problems |
| 75 | the run dir is in use by another live process (left untouched; EX_TEMPFAIL: try again later) |
| 130 | interrupted (Ctrl-C); the same command resumes from the last epoch |

A multirun exits with the most serious of its jobs' codes, in the order 130, 1, 2, 75, 0.
"""
from __future__ import annotations

from dataclasses import dataclass

EXIT_CODES = {"completed": 0, "skipped": 0, "dry_run": 0, "failed": 1, "unfinished": 1, "rejected": 2,
              "locked": 75, "interrupted": 130}
SEVERITY = (130, 1, 2, 75)  # a multirun's exit code: the first of these that any of its jobs has


@dataclass(frozen=True)
class Outcome:
    status: str  # a key of EXIT_CODES
    reason: str | None = None  # one line for the user: why it failed or was refused, what a dry run found
    train_teacher: str | None = None  # dry run: the command that trains the teacher this job lacks
    # dry run: each problem it found but the teacher that train_teacher trains, for the multirun
    # summary to count across jobs (a problem's own text may hold "; ", so reason cannot be split)
    problems: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        return 2 if self.status == "dry_run" and self.reason else EXIT_CODES[self.status]


def multirun_exit_code(codes: list[int]) -> int:
    return next((code for code in SEVERITY if code in codes), 0)


class CannotStart(Exception):
    """Found before training, with nothing written: a problem no config value fixes (a teacher
    export dir that cannot be written)."""
