"""The sweep dir's `multirun.yaml` records what the latest multirun of an experiment asked for, and
analysis (analysis/expected.py) reads the sweeps typed on its command line from it to list the
cells still missing. Hydra writes it before any job runs, so a multirun none of whose jobs ran (each
one rejected, a dry run, sbatch refusing the array) would replace the record of the multirun that
made the runs, and a value rejected as invalid (`seed=-1,0`: seed -1) would stay an expected cell,
missing forever.

So, when a multirun ends: if no job ran, the file it replaced is put back (or removed, if there was
none); otherwise each sweep typed on its command line keeps the values that some job ran with.
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from kdexp.preflight import UNLISTED_SWEEPS
from kdexp.records import MULTIRUN_FILE, atomic_write_bytes

NOT_RUN = ("rejected", "dry_run")  # statuses of jobs that trained nothing and wrote no run dir


def snapshot(sweep_dir: Path) -> bytes | None:
    """The file as it is before the multirun replaces it (None: there is none)."""
    path = sweep_dir / MULTIRUN_FILE
    return path.read_bytes() if path.is_file() else None


def keep_what_ran(sweep_dir: Path, previous: bytes | None, outcomes: list[dict]) -> None:
    """`outcomes`: each job's record (kdexp.summary.outcome_record) of the multirun that just ended."""
    path = sweep_dir / MULTIRUN_FILE
    ran = {override for o in outcomes if o["status"] not in NOT_RUN for override in o["overrides"]}
    if not ran:
        if previous is not None:
            atomic_write_bytes(path, previous)
        else:
            path.unlink(missing_ok=True)
        return
    if not path.is_file():
        return
    record = OmegaConf.load(path)
    typed = list(record.hydra.overrides.task)
    kept = [_values_that_ran(override, ran) for override in typed]
    if kept != typed:
        record.hydra.overrides.task = kept
        atomic_write_bytes(path, OmegaConf.to_yaml(record).encode())


def _values_that_ran(typed: str, ran: set[str]) -> str:
    """A typed sweep (`seed=-1,0`) without the values no job ran with (`seed=0`); anything else as typed.
    A job's overrides spell each value as the sweeper expanded it (`seed=0`), so they compare as text."""
    override = OverridesParser.create().parse_override(typed)
    if not override.is_sweep_override() or override.value_type in UNLISTED_SWEEPS:
        return typed
    key = override.get_key_element()
    values = list(override.sweep_string_iterator())
    kept = [value for value in values if f"{key}={value}" in ran]
    return typed if kept == values or not kept else f"{key}={','.join(kept)}"
