"""Reader for the original study's per-run `results.json` (+ `fidelity.json`) files.

The schema is in shared/study-notes.md: accuracies are fractions, `test_acc_best` is the test
accuracy at the best-val epoch and `test_acc_final` the last epoch's; `history` has no test
accuracy in v2, so the best test over epochs is unavailable for those files (left empty).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdexp.run_record import UNRECORDED

from . import numerics

from .schema import clipped_fraction, config_hash, empty_row, is_fraction, mark, method_of, one_line

RESULTS_FILE = "results.json"
FIDELITY_FILE = "fidelity.json"
EXPERIMENT = "study"
STUDY_CLIP_NORM = 1.0       # the study's recipe clips at 1.0
STUDY_VAL_SIZE = 5000       # protocol v2: fixed 45k/5k split
STUDY_TEACHER_SEED = 0      # protocol v2: students distil from the seed-0 teacher
STUDY_WIDTH = 64            # torchvision's ResNets: base width 64
STUDY_NUMERICS = numerics.REFERENCE  # fp32, no autocast, no compile: the study defines the reference
_REQUIRED = ("model", "seed", "test_acc_final")


def read_study_run(run_dir: Path) -> dict[str, Any]:
    row = empty_row(run_dir, "study")
    row["experiment"] = EXPERIMENT
    path = run_dir / RESULTS_FILE
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return mark(row, "corrupt", f"{path} is not valid JSON ({one_line(err)})")
    if not isinstance(data, dict):
        return mark(row, "corrupt", f"{path} is not a JSON object")
    missing = [key for key in _REQUIRED if data.get(key) is None]
    if missing:
        return mark(row, "corrupt", f"{path} lacks {', '.join(missing)}")
    if not is_fraction(data["test_acc_final"]):
        return mark(row, "corrupt", f"{path}: test_acc_final is not an accuracy in [0, 1]")

    teacher = data.get("teacher") or None
    kd_type = data.get("kd_type") or "none"
    stem = data.get("stem") or "cifar"
    has_val = data.get("best_val_acc") is not None
    history = data.get("history") if isinstance(data.get("history"), list) else []
    row.update(
        protocol="v2" if has_val else "v1", student=data["model"], stem=stem, width=STUDY_WIDTH, seed=data["seed"],
        epochs=data.get("epochs"), val_size=STUDY_VAL_SIZE if has_val else 0, data="cifar10",
        clip_norm=STUDY_CLIP_NORM, kind="student" if teacher else "baseline", **UNRECORDED, numerics=STUDY_NUMERICS,
        epochs_completed=len(history) or data.get("epochs"),
        best_val_acc=data.get("best_val_acc"), best_val_epoch=data.get("best_val_epoch"),
        test_at_best_val=data.get("test_acc_best"), test_final=data["test_acc_final"],
        grad_norm_max=data.get("grad_norm_max_overall"),
        clipped_epoch_fraction=clipped_fraction(history, STUDY_CLIP_NORM),
        finished_at=path.stat().st_mtime,
    )
    if teacher:
        # One `stem` field describes both networks of a run.
        row.update(teacher=teacher, teacher_stem=stem, teacher_width=STUDY_WIDTH, teacher_seed=STUDY_TEACHER_SEED,
                   teacher_init=UNRECORDED["init"], teacher_label_smoothing=UNRECORDED["label_smoothing"],
                   pair=f"{teacher}→{data['model']}")
    if kd_type not in STUDY_METHODS:
        return mark(row, "corrupt", f"{path}: unknown kd_type {kd_type!r} (the study has {', '.join(STUDY_METHODS)})")
    method = study_method(kd_type, data)
    identity, unknown = method_of(method)
    if unknown:
        return mark(row, "unknown method", unknown)
    row.update(identity.columns())
    if kd_type == "feature":  # the logit runs log 0.0 here, which would read as a measurement
        row["proj_grad_norm_max"] = data.get("proj_grad_norm_max_overall")
    tests = [(h["test_acc"], h.get("epoch")) for h in history
             if isinstance(h, dict) and isinstance(h.get("test_acc"), (int, float))]
    if tests:
        best = max(tests, key=lambda t: t[0])  # max keeps the earliest of equal accuracies
        row["best_test"], row["best_test_epoch"] = best
    notes = _read_fidelity(row, run_dir)
    row["notes"] = notes
    config = {k: row[k] for k in ("teacher", "student", "stem", "seed", "epochs", "val_size")}
    config.update({f"method.{key}": value for key, value in method.items()})
    row["config"], row["config_hash"] = config, config_hash(config)
    row["status"] = "completed"  # the study writes results.json only when a run has finished
    return row


# The study's kd_type → kdexp's class for it, and its fields → that class's arguments: a
# translation of the study's file format (its runs are these methods with these arguments).
STUDY_METHODS = {
    "none": ("kdexp.methods.ce.CrossEntropy", {}),
    "logit": ("kdexp.methods.logit.LogitKD", {"alpha": "alpha", "T": "temperature"}),
    "feature": ("kdexp.methods.feature.FeatureKD", {"alpha": "alpha", "beta": "feat_beta"}),
}


def study_method(kd_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """The `method` node kdexp would have saved for a study run."""
    target, arguments = STUDY_METHODS[kd_type]
    method = {"_target_": target, **{arg: data[field] for arg, field in arguments.items()
                                     if data.get(field) is not None}}
    if kd_type == "feature":
        method["clip_projection"] = not data.get("no_proj_clip", False)  # v1's bug: projections not clipped
    return method


def _read_fidelity(row: dict[str, Any], run_dir: Path) -> str:
    path = run_dir / FIDELITY_FILE
    try:
        fid = json.loads(path.read_text())
    except FileNotFoundError:
        return ""
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{FIDELITY_FILE} is not valid JSON; fidelity unavailable"
    if not isinstance(fid, dict):
        return f"{FIDELITY_FILE} is not a JSON object; fidelity unavailable"
    row.update(agreement=fid.get("top1_agreement"), kl_t1=fid.get("kl_t1"), kl_t4=fid.get("kl_t4"),
               teacher_test_acc=fid.get("teacher_test_acc"))
    return ""


def read_history(run_dir: Path) -> list[dict]:
    try:
        history = json.loads((run_dir / RESULTS_FILE).read_text()).get("history")
    except (OSError, ValueError, AttributeError):
        return []
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []


def assign_teacher_kind(rows: list[dict[str, Any]]) -> None:
    """Tell the study's teacher runs from its baselines: the files do not say which is which.

    Both have no teacher and kd_type "none"; the protocol trains teachers longer (200 epochs vs
    100), so a teacher-less run with more epochs than every distillation run is a teacher. Without
    distillation runs to compare with, every teacher-less run stays a baseline.
    """
    study = [r for r in rows if r["source"] == "study" and r["status"] == "completed"]
    student_epochs = [r["epochs"] for r in study if r["teacher"] and r["epochs"] is not None]
    if not student_epochs:
        return
    longest = max(student_epochs)
    for row in study:
        if row["kind"] == "baseline" and row["epochs"] is not None and row["epochs"] > longest:
            row["kind"] = "teacher"


