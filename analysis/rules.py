"""Selection rules: which test accuracy of a run is "the" number.

`val` is the study's v2 number (test at the best-val epoch), `final` the last epoch's, `test` the
best test accuracy over epochs: the checkpoint is chosen on the test set itself, as the study's v1
and most KD papers did, which flatters every number, so it is labelled optimistic wherever shown.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class Rule:
    name: str
    column: str      # column of collect()'s frame
    short: str       # column header
    description: str
    optimistic: bool = False

    @property
    def label(self) -> str:
        return f"{self.short} (optimistic)" if self.optimistic else self.short


RULES = {
    "val": Rule("val", "test_at_best_val", "test@best-val",
                "test accuracy at the epoch of best validation accuracy (the study's v2 number)"),
    "final": Rule("final", "test_final", "test@final", "test accuracy after the last epoch"),
    "test": Rule("test", "best_test", "best test",
                 "best test accuracy over epochs: OPTIMISTIC, the checkpoint is selected on the test "
                 "set itself (the study's v1 and most KD papers)", optimistic=True),
}


def default_rule(runs: Iterable[dict[str, Any]]) -> Rule:
    """`val` where every run has a validation split, else `final`."""
    runs = list(runs)
    if runs and all(r.get("val_size") and r.get("test_at_best_val") is not None for r in runs):
        return RULES["val"]
    return RULES["final"]


def rule_note(rule: Rule, chosen_by_default: bool) -> str:
    how = "default for these runs" if chosen_by_default else "chosen with --select"
    return f"Selection rule `{rule.name}` ({how}): {rule.description}."
