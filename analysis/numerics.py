"""A run's numerics: `reference` (the study's: fp32, PyTorch's TF32-convolution defaults, no
autocast, no compile) or `fast` (bf16 autocast and/or torch.compile). channels_last, fused SGD and
the exact teacher-logit cache equal the fp32 reference to floating-point tolerance by construction,
so they leave a run's numerics reference. A reference and a fast run of one configuration are
never averaged together (aggregate.SPLIT_COLUMNS); a table whose runs mix them says so (`note`).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

REFERENCE, FAST = "reference", "fast"
UNRECORDED = "unrecorded"  # a result.json written before kdexp recorded its execution
# What each kind means, as the notes say it.
MEANING = {REFERENCE: "fp32, no compile: the study's numerics", FAST: "bf16 autocast and/or torch.compile"}


def of_execution(execution: dict[str, Any]) -> str | None:
    """A run's numerics from its result.json `execution` record: as recorded, or (files written
    before kdexp recorded it) derived the same way kdexp derives it, from precision and compile."""
    recorded = execution.get("numerics")
    if isinstance(recorded, str) and recorded in MEANING:
        return recorded
    precision = execution.get("precision")
    if precision is None:
        return None
    return REFERENCE if precision == "fp32" and not execution.get("compile") else FAST


def note(runs: Iterable[dict[str, Any]]) -> str | None:
    """What a table's notes say about its runs' numerics: nothing where all are reference (the
    study's own numerics, the default), a warning where all are fast, counts where they mix."""
    counts = Counter(r.get("numerics") or UNRECORDED for r in runs)
    if not counts or set(counts) == {REFERENCE}:
        return None
    if set(counts) == {FAST}:
        return (f"Numerics: fast ({MEANING[FAST]}) for every run here, not the study's fp32 reference: "
                "accuracies may differ from reference runs by the precision change itself.")
    if set(counts) == {UNRECORDED}:
        return ("Numerics: not recorded (result.json written before kdexp recorded how a run executed); "
                "such a run on CUDA may have trained in bf16.")
    kinds = ", ".join(f"{counts[k]} {k} ({MEANING[k]})" if k in MEANING else f"{counts[k]} {k}"
                      for k in (REFERENCE, FAST, UNRECORDED) if counts[k])
    return (f"Numerics MIXED: {kinds} run(s). A difference between runs of unlike numerics (a Δ, gap or "
            "comparison across them) includes a precision change, which can be as large as the effects "
            "measured; each configuration's own mean is never taken over both (the `numerics` column of "
            "runs.csv says which run is which).")
