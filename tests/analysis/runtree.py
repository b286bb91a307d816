"""Run trees for the analysis tests: kdexp run dirs written with kdexp.records' writers (and a
Hydra-shaped `.hydra/`), and the study's `results.json` files in its published schema.

A plain module, not a conftest.py: another conftest module would shadow tests/conftest.py for
the test files that `from conftest import ...`. Test modules import the fixtures from here."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdexp.records import write_metrics, write_result

TARGETS = {"ce": "kdexp.methods.ce.CrossEntropy", "logit": "kdexp.methods.logit.LogitKD",
           "feature": "kdexp.methods.feature.FeatureKD"}


def _gap(epoch: int, epochs: int) -> float:
    """Distance to the final accuracy: a saturating curve, like real training."""
    return 0.5 * (math.exp(-4 * epoch / epochs) - math.exp(-4))


# The `execution` group's node in .hydra/config.yaml (conf/execution/).
PROFILES = {
    "reference": {"name": "reference", "amp": "none", "channels_last": None, "fused": None, "compile": False,
                  "teacher_cache": None},
    "fast": {"name": "fast", "amp": "bf16", "channels_last": None, "fused": None, "compile": None,
             "teacher_cache": None},
}


class RunTree:
    """Writes runs under `root`; every accuracy is given explicitly so tests know the answers."""

    def __init__(self, root: Path):
        self.root = root
        self.count = 0
        self.clock = 1_700_000_000.0  # result.json mtimes, increasing in creation order

    def _dir(self, path: str | None, parts: list[str]) -> Path:
        self.count += 1
        run_dir = self.root / (path or "/".join(parts + [f"run{self.count}"]))
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir

    def kdexp(self, *, acc: float, final: float | None = None, best_test: float | None = None,
              val: float | None = None, experiment: str = "exp", student: str = "resnet18",
              teacher: str | None = None, method: str = "ce", alpha: float = 0.5, T: float = 4.0,
              beta: float = 0.5, clip: bool = True, seed: int = 0, epochs: int = 4, val_size: int = 5000,
              width: int = 64, stem: str = "cifar", teacher_stem: str = "cifar", teacher_width: int = 64,
              teacher_seed: int = 0, kind: str | None = None, status: str | None = "completed",
              data: str = "cifar10", path: str | None = None, sweep: dict | None = None,
              overrides: list[str] | None = None, extra_config: dict | None = None,
              fidelity: dict | None = None, grad_norm_max: float = 3.0, proj_grad_norm_max: float | None = None,
              clip_fraction: float = 0.5, history: list[dict] | None = None,
              train_seconds: float | None = None, method_config: dict | None = None,
              params: dict | None = None, gflops: dict | None = None, images_per_s: float = 1000.0,
              profile: str | None = None, execution: dict | None = None, git_commit: str = "abc123",
              torch: str = "2.14.1") -> Path:
        """A kdexp run dir: `acc` is test@best-val (or the final test acc without a val split).
        `method_config` replaces the `method` node (a method outside kdexp: its own `_target_`).
        `profile` ("reference" | "fast"): the `execution` group as kdexp saves it (config node, and
        result.json's profile and numerics); without it, the records of a run from before the group
        (no numerics). `execution`: keys of result.json's execution record to replace."""
        kind = kind or ("student" if teacher else "baseline")
        final = acc if final is None else final
        has_val = val_size > 0
        run_dir = self._dir(path, [experiment, f"{teacher}-to-{student}" if teacher else student, method])
        method_cfg: dict[str, Any] = {"_target_": TARGETS.get(method)}
        if method == "logit":
            method_cfg.update(alpha=alpha, T=T)
        elif method == "feature":
            method_cfg.update(alpha=alpha, beta=beta, clip_projection=clip, normalize_by_teacher_std=False)
        method_cfg = method_config if method_config is not None else method_cfg
        # As Hydra saves it: unresolved, with the interpolations kdexp's configs use.
        cfg = {
            "seed": seed, "recipe_epochs": {"student": epochs, "teacher": epochs},
            "experiment_name": experiment, "protocol_name": experiment, "export_teacher": False,
            "dry_run": False, "retry_failed": False,
            "data": {"name": data, "root": "${paths.data_dir}/fake", "val_size": val_size, "split_seed": 1234,
                     "download": False},
            "model": {"arch": student, "stem": stem, "width": width, "num_classes": 10},
            "teacher": ({"arch": teacher, "stem": "${model.stem}" if teacher_stem == stem else teacher_stem,
                         "width": teacher_width, "seed": teacher_seed, "ckpt": None}
                        if teacher else {"arch": None, "stem": "cifar", "width": 64, "seed": 0, "ckpt": None}),
            "method": method_cfg,
            "trainer": {"epochs": "${recipe_epochs.%s}" % ("teacher" if kind == "teacher" else "student"),
                        "batch_size": 128, "lr": 0.1, "clip_norm": 1.0, "device": "cpu", "progress": False,
                        "max_steps_per_epoch": None},
            "paths": {"data_dir": "${oc.env:KDEXP_DATA,data}", "output_dir": "${oc.env:KDEXP_OUTPUTS,outputs}",
                      "teachers_dir": "${.output_dir}/teachers"},
        }
        if profile is not None:
            cfg["execution"] = PROFILES[profile]
        for key, value in (extra_config or {}).items():  # "trainer.lr": 0.05
            node = cfg
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        hydra = {"hydra": {"mode": "MULTIRUN" if sweep is not None else "RUN",
                           "sweeper": {"params": sweep or None},
                           "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": overrides or []}}}
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides or []))
        if history is None:
            history = [{"epoch": e, "lr": 0.1, "loss": 1.0 / e, "loss_ce": 1.0 / e, "train_acc": 0.5 + e / 100,
                        "val_acc": ((val if val is not None else acc) - _gap(e, epochs)) if has_val else None,
                        "test_acc": final - _gap(e, epochs), "grad_norm_max": grad_norm_max / e,
                        "grad_norm_mean": grad_norm_max / e / 2, "proj_grad_norm_max": proj_grad_norm_max,
                        "clip_fraction": clip_fraction, "epoch_seconds": 1.0, "images_per_s": 1000.0}
                       for e in range(1, epochs + 1)]
        write_metrics(run_dir, history)
        if status is None:
            return run_dir
        result = {
            "status": status, "error": "RuntimeError: CUDA out of memory" if status == "failed" else None,
            "failed_epoch": 2 if status == "failed" else None, "kind": kind, "method": method,
            "epochs": epochs, "epochs_completed": 2 if status == "failed" else epochs,
            "best_val_acc": (val if val is not None else acc + 0.005) if has_val else None,
            "best_val_epoch": epochs if has_val else None,
            "test_acc_at_best_val": acc if has_val else None, "test_acc_final": final,
            "best_test_acc": max(acc, final) if best_test is None else best_test, "best_test_epoch": epochs,
            "selected_checkpoint": "best_val" if has_val else "final",
            "per_class_test_acc": {"airplane": acc}, "fidelity": fidelity,
            "grad_norm_max": grad_norm_max, "proj_grad_norm_max": proj_grad_norm_max,
            "clip_fraction": clip_fraction,
            "params": params or {"student": 11_173_962, "method": 0, "teacher": 21_282_122 if teacher else None},
            "gflops": gflops or {"student": 0.557, "teacher": 1.16 if teacher else None},
            "wall_seconds": 12.5, "train_seconds": train_seconds if train_seconds is not None else float(epochs),
            "images_per_s": images_per_s, "device": "cpu",
            "execution": {"precision": "fp32", "channels_last": False, "fused": False, "compile": False,
                          "teacher_cache": False}, "torch": torch, "cuda": None,
            "python": "3.11", "kdexp_version": "0.1.0", "git_commit": git_commit, "hostname": "node1",
        }
        if profile is not None:
            fast = profile == "fast"
            result["device"] = "NVIDIA A100-SXM4-80GB"
            result["execution"].update(profile=profile, numerics=profile, precision="bfloat16" if fast else "fp32",
                                       compile=fast, channels_last=True, fused=True, tf32_conv=True,
                                       tf32_matmul=False)
        result["execution"].update(execution or {})
        write_result(run_dir, result)
        self.clock += 10
        os.utime(run_dir / "result.json", (self.clock, self.clock))
        return run_dir

    def canary(self, *, experiment: str = "exp", job: int = 1000, ok: bool = True, failed: tuple[str, ...] = (),
               execution: str = "reference", git_commit: str = "abc123", torch: str = "2.14.1",
               text: str | None = None) -> Path:
        """A canary's check.json (kdexp.check's schema) at <root>/<experiment>/canary/<job>/, or `text` as
        the file's content (a malformed one)."""
        job_dir = self.root / experiment / "canary" / str(job)
        job_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "schema_version": 1, "ok": ok, "failed": list(failed), "device": "cuda", "execution": execution,
            "size": "full", "started": "2026-12-01T10:00:00+00:00", "finished": "2026-12-01T10:04:30+00:00",
            "environment": {"torch": torch, "cuda": "12.4", "cudnn": 90100, "gpu": "NVIDIA A100-SXM4-80GB",
                            "gpu_memory_gib": 79.2, "driver": "550.54.15", "cpu_count": 16,
                            "git_commit": git_commit, "hostname": "gpu17", "python": "3.11.9"},
            "verdicts": [{"name": "reference", "ok": True, "detail": "deterministic"}]
            + [{"name": name, "ok": False, "detail": "off tolerance"} for name in failed],
        }
        (job_dir / "check.json").write_text(json.dumps(record) if text is None else text)
        return job_dir

    def study(self, *, test_best: float, model: str = "resnet18", teacher: str | None = None,
              kd_type: str = "none", alpha: float = 0.5, temperature: float = 4.0, seed: int = 0,
              val: float | None = None, final: float | None = None, stem: str | None = "cifar",
              no_proj_clip: bool | None = False, epochs: int = 100, path: str | None = None,
              history: list[dict] | None = None, fidelity: dict | None = None, grad_norm: float = 5.0,
              proj_norm: float = 0.0) -> Path:
        """A run in the study's results.json schema (fractions, not %)."""
        run_dir = self._dir(path, ["runs", f"{teacher}_to_{model}_{kd_type}" if teacher else model,
                                   f"seed{seed}"])
        data = {"model": model, "kd_type": kd_type, "alpha": alpha, "temperature": temperature,
                "feat_beta": 0.5, "seed": seed, "grad_norm_max_overall": grad_norm,
                "proj_grad_norm_max_overall": proj_norm, "epochs": epochs,
                "best_val_acc": test_best + 0.005 if val is None else val, "best_val_epoch": epochs - 1,
                "test_acc_best": test_best, "test_acc_final": test_best if final is None else final}
        if teacher is not None:
            data["teacher"] = teacher
        if stem is not None:
            data["stem"] = stem
        if no_proj_clip is not None:
            data["no_proj_clip"] = no_proj_clip
        data["history"] = history if history is not None else [
            {"epoch": e, "val_acc": data["best_val_acc"] - 0.001 * (epochs - e), "train_acc": 0.9,
             "loss_ce": 0.1, "loss_kd": 0.1, "loss_total": 0.1, "grad_norm_max": grad_norm if e % 2 else 0.5}
            for e in range(1, epochs + 1)]
        (run_dir / "results.json").write_text(json.dumps(data))
        if fidelity is not None:
            (run_dir / "fidelity.json").write_text(json.dumps(fidelity))
        self.clock += 10
        os.utime(run_dir / "results.json", (self.clock, self.clock))
        return run_dir


@pytest.fixture
def tree(tmp_path: Path) -> RunTree:
    return RunTree(tmp_path / "runs")


@pytest.fixture(scope="module")
def module_tree(tmp_path_factory) -> RunTree:
    """A tree shared by a module's tests, for trees that are slow to analyse."""
    return RunTree(tmp_path_factory.mktemp("tree") / "runs")
