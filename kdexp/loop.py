"""The epoch loop: forward, loss parts, backward, clip over the optimiser's clipped groups, step,
evaluate, record, checkpoint. Everything else (building, files, failure handling) lives in job.py."""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdexp import checkpoint, distributed, optimizers
from kdexp.config import TrainerConfig
from kdexp.data.loaders import Batch, EvalBatches, TrainBatches
from kdexp.distributed import World
from kdexp.evaluation import accuracy, fidelity, per_class_accuracy, predict
from kdexp.execution import Execution
from kdexp.methods import DistillationMethod, ModelOutputs
from kdexp.records import METRICS_FILE, write_metrics
from kdexp.taps import TapRecorder
from kdexp.teacher_cache import lookup

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    def __init__(self, epoch: int, with_teacher: bool):
        remedy = "lower trainer.lr or check the teacher" if with_teacher else "lower trainer.lr"
        super().__init__(f"loss became NaN/inf in epoch {epoch}; {remedy}")
        self.epoch = epoch


class TeacherChanged(RuntimeError):
    """last.pt was trained from another teacher file than the one this start loads; nothing was written."""


START_OVER = "delete it to start this run over"


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name `path` in an OSError raised while writing it: a full disk's ENOSPC comes from a write()
    that names no file (or from the temporary file beside it), and the one-line error says which file."""
    try:
        yield
    except OSError as err:
        if err.filename == str(path):
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


def build_optimizer(student: nn.Module, method: nn.Module, optimizer: DictConfig, lr: float,
                    fused: bool = False) -> torch.optim.Optimizer:
    """The `optimizer` group's optimiser (kdexp/optimizers.py) over the student and the method's own
    parameters (same lr schedule and settings). Each group says whether it is clipped: the clip then
    covers exactly the optimiser's parameters, so a method's parameters cannot be forgotten by
    accident. `fused`: one kernel for the whole update instead of PyTorch's default implementation."""
    groups = [{"params": list(student.parameters()), "clip": True, "name": "student"}]
    method_params = list(method.parameters())
    if method_params:
        groups.append({"params": method_params, "clip": method.clip_with_student, "name": "method"})
    return optimizers.build_optimizer(groups, optimizer, lr, fused)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clip the clipped groups together; return their pre-clip total norm and the method-only norm."""
    clipped = [p for g in optimizer.param_groups if g["clip"] for p in g["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(clipped, max_norm if max_norm else math.inf, foreach=True)
    method = [p.grad for g in optimizer.param_groups if g["name"] == "method" for p in g["params"]
              if p.grad is not None]
    method_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in method])) if method else None
    return norm, method_norm


def predict_all(model: nn.Module, batches: EvalBatches) -> torch.Tensor:
    """Logits for the whole split on every rank: each rank predicts its part (EvalBatches' shard)
    and the parts are gathered, so each image counts once and every metric is the one-process one."""
    return distributed.gather_rows(predict(model, batches))


class NetworkOutputs:
    """One network's outputs as its method reads them: logits, and what the method declares it
    needs (stage outputs, tapped modules, the strong view's outputs)."""

    def __init__(self, model: nn.Module, method: DistillationMethod, role: str):
        # the network itself, whose module names a method's taps use (FrozenTeacher wraps it as `.model`)
        network = getattr(model, "model", model) if role == "teacher" else model
        self.model, self.with_features = model, method.needs_features
        self.recorder = TapRecorder(network, method.taps(network, role), role)

    def __call__(self, x: torch.Tensor, x_strong: torch.Tensor | None = None) -> ModelOutputs:
        out = self._one_view(x)
        if x_strong is not None:
            out.strong = self._one_view(x_strong)
        return out

    def _one_view(self, x: torch.Tensor) -> ModelOutputs:
        with self.recorder.recording() as taps:
            out = self.model(x, with_features=self.with_features)
        return ModelOutputs(*out, taps=taps) if self.with_features else ModelOutputs(out, taps=taps)


class StudentLosses(nn.Module):
    """The student's forward and the method's loss parts as one module: what DDP wraps on several
    ranks, so that the gradients of the student and of the method's own parameters (projections)
    are both averaged over the ranks."""

    def __init__(self, student: nn.Module, method: DistillationMethod):
        super().__init__()
        self.student, self.method = student, method
        self._outputs = NetworkOutputs(student, method, "student")

    def forward(self, x: torch.Tensor, y: torch.Tensor, teacher_out: ModelOutputs | None,
                x_strong: torch.Tensor | None = None,
                indices: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        student_out = self._outputs(x, x_strong)
        extra = {"indices": indices} if self.method.needs_indices else {}
        return self.method(student_out, teacher_out, y, **extra), student_out.logits


@dataclass
class TrainState:
    """Everything the loop carries across epochs; saved in last.pt for an exact resume."""

    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)
    best_val: dict | None = None  # the row (plus per-class acc) of the best-val epoch; ties keep the earliest
    best_test: dict | None = None
    last_eval: dict | None = None
    stopped_early_epoch: int | None = None  # trainer.early_stopping ended the run after this epoch


@dataclass
class Loop:
    student: nn.Module
    method: DistillationMethod
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train: TrainBatches
    val: EvalBatches | None
    test: EvalBatches
    trainer: TrainerConfig  # the config's trainer node (a DictConfig this schema types)
    run_dir: Path
    teacher_test_logits: torch.Tensor | None = None
    execution: Execution = field(default_factory=Execution)
    teacher_logits: torch.Tensor | None = None  # the teacher-logit cache: replaces the live teacher in training
    teacher_file: dict | None = None  # {"path", "sha256"} of the teacher checkpoint it distils from (None: no teacher)
    state: TrainState = field(default_factory=TrainState)
    log_epoch: Callable[[dict], None] | None = None  # each metrics.jsonl line, once written: the job's trackers
    world: World = field(default_factory=World)  # the ranks of this run; only rank 0 writes files
    _epoch: int | None = field(default=None, init=False, repr=False)  # the epoch being trained or checkpointed

    def __post_init__(self) -> None:
        self._student_losses: nn.Module = StudentLosses(self.student, self.method)
        if self.world.distributed:  # rank 0's weights on every rank now; gradients averaged in backward
            # No buffer broadcast each step: training reads no running statistic, evaluation and last.pt
            # take rank 0's (`evaluate`, `save`), and a method's buffers are its own to keep in step
            # (CRD's memory banks, 1.3 GB on ImageNet, are updated from every rank's embeddings).
            # torch 2.14 deprecates the flag, but its successor still syncs buffers at init, which the
            # deprecation notice itself says to avoid this way until `init_sync_buffers` exists.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
                self._student_losses = DistributedDataParallel(self._student_losses, broadcast_buffers=False)
        self._compiled = self.execution.compiled(self.losses, self.trainer.deterministic) \
            if self.execution.compile else None
        self._teacher_outputs = NetworkOutputs(self.teacher, self.method, "teacher") \
            if self.teacher is not None else None

    def fit(self) -> TrainState:
        if self.state.stopped_early_epoch is not None:  # resumed after it stopped: it is done
            return self.state
        for epoch in range(self.state.epoch + 1, self.trainer.epochs + 1):
            self._epoch = epoch
            self.method.start_epoch(epoch, self.trainer.epochs)  # a resumed run's first epoch too
            row = self.train_epoch(epoch)
            if epoch % self.trainer.eval_every == 0 or epoch == self.trainer.epochs:
                row.update(self.evaluate(epoch))
            self.state.history.append(row)
            self.state.epoch = epoch
            if self.patience_ran_out():
                self.state.stopped_early_epoch = epoch
            self.scheduler.step()
            self.save()  # first: metrics.jsonl never shows an epoch that a resume would redo
            self._write_metrics()
            if self.log_epoch is not None:
                self.log_epoch(row)
            log.info(_epoch_line(row, self.trainer.epochs))
            if self.state.stopped_early_epoch is not None:
                log.info("stopping early after epoch %d: no better val accuracy in %d evaluations since epoch %d",
                         epoch, self.trainer.early_stopping, self.state.best_val["epoch"])
                break
        return self.state

    def failed_epoch(self) -> int:
        """The epoch a failure now belongs to (result.json's `failed_epoch`): the one being trained or
        checkpointed (its epoch counter already advanced); after training, the last; before, the first."""
        return self._epoch or max(self.state.epoch, 1)

    def patience_ran_out(self) -> bool:
        """trainer.early_stopping: that many evaluations since the best val accuracy (ties are no gain)."""
        patience, best = self.trainer.early_stopping, self.state.best_val
        if not patience or best is None:
            return False
        since = [row for row in self.state.history if row["epoch"] > best["epoch"] and row.get("val_acc") is not None]
        return len(since) >= patience

    def train_epoch(self, epoch: int) -> dict:
        self.student.train()
        self.method.train()
        device = next(self.student.parameters()).device
        sums: dict[str, torch.Tensor] = {}
        norms, method_norms = [], []
        correct = torch.zeros((), device=device)
        seen, start = 0, time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        for batch in _progress(self.train.epoch(epoch), len(self.train), self.trainer.progress, epoch):
            parts, logits = self.step(batch)
            for name, value in parts.items():
                sums[name] = sums.get(name, 0) + value.detach() * len(batch.y)
            norm, method_norm = clip_gradients(self.optimizer, self.trainer.clip_norm)
            self.optimizer.step()
            norms.append(norm)
            if method_norm is not None:
                method_norms.append(method_norm)
            correct += (logits.argmax(1) == batch.y).sum()
            seen += len(batch.y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        # over every rank's images: the same row on each rank (a NaN stops every rank in the same epoch)
        for total in (*sums.values(), correct):
            distributed.sum_over_ranks(self.world, total)
        seen = int(distributed.sum_over_ranks(self.world, torch.tensor(seen, device=device)).item())
        losses = {name: (s / seen).item() for name, s in sums.items()}
        if not all(math.isfinite(v) for v in losses.values()):
            raise NonFiniteLossError(epoch, self.method.needs_teacher)
        norms_t = torch.stack(norms).float()
        clip = self.trainer.clip_norm
        return {
            "epoch": epoch, "lr": lr, **{("loss" if k == "loss" else f"loss_{k}"): v for k, v in losses.items()},
            "train_acc": correct.item() / seen,
            "grad_norm_max": norms_t.max().item(), "grad_norm_mean": norms_t.mean().item(),
            "proj_grad_norm_max": torch.stack(method_norms).max().item() if method_norms else None,
            "clip_fraction": (norms_t > clip).float().mean().item() if clip else 0.0,
            "epoch_seconds": seconds, "images_per_s": seen / seconds,
        }

    def step(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Forward, the method's loss parts, backward; returns parts and the student's logits."""
        losses = self.losses
        if self._compiled is not None and len(batch.y) * self.world.size == self.trainer.batch_size:
            # The epoch's last, partial batch runs eagerly: one step, instead of a second capture.
            torch.compiler.cudagraph_mark_step_begin()
            losses = self._compiled
        self.optimizer.zero_grad(set_to_none=True)
        parts, logits = losses(*self.inputs(batch))
        (parts["loss"] * batch.loss_scale).backward()
        return parts, logits.detach()

    def inputs(self, batch: Batch) -> tuple[torch.Tensor | None, ...]:
        """`losses`' arguments from a batch: images, labels, the cached teacher logits of their views
        (with a cache), and what the method declares it reads (a strong view, indices)."""
        cached = lookup(self.teacher_logits, batch) if self.teacher_logits is not None else None
        x_strong = batch.x_strong if self.method.needs_strong_view else None
        indices = batch.index if self.method.needs_indices else None
        return batch.x, batch.y, cached, x_strong, indices

    def losses(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
               x_strong: torch.Tensor | None = None,
               indices: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Forward both networks (the teacher only without cached logits) and the method's loss parts."""
        with self.execution.autocast(x.device):
            teacher_out = None
            if teacher_logits is not None:
                teacher_out = ModelOutputs(teacher_logits)
            elif self._teacher_outputs is not None:
                teacher_out = self._teacher_outputs(x, x_strong)
            return self._student_losses(x, y, teacher_out, x_strong, indices)

    def evaluate(self, epoch: int) -> dict:
        row: dict = {"val_acc": None}
        distributed.broadcast_buffers(self.world, self.student)  # every rank evaluates rank 0's network
        if self.val is not None:
            row["val_acc"] = accuracy(predict_all(self.student, self.val), self.val.labels)
        test_logits = predict_all(self.student, self.test)
        row["test_acc"] = accuracy(test_logits, self.test.labels)
        if self.teacher_test_logits is not None:
            row.update(fidelity(test_logits, self.teacher_test_logits))
        snapshot = {**row, "epoch": epoch, "per_class_test_acc": per_class_accuracy(test_logits, self.test.labels, self.test.classes)}
        if row["val_acc"] is not None and (self.state.best_val is None or row["val_acc"] > self.state.best_val["val_acc"]):
            self.state.best_val = snapshot
        if self.state.best_test is None or row["test_acc"] > self.state.best_test["test_acc"]:
            self.state.best_test = snapshot
        self.state.last_eval = snapshot
        return row

    def save(self) -> None:
        if not self.world.is_main:
            return
        path = self.run_dir / checkpoint.LAST
        with writing(path):
            checkpoint.save(path, {
                "student": self.student.state_dict(), "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "state": self.state.__dict__, "rng": checkpoint.rng_state(), "teacher": self.teacher_file,
            })

    def _write_metrics(self) -> None:
        if not self.world.is_main:
            return
        with writing(self.run_dir / METRICS_FILE):
            write_metrics(self.run_dir, self.state.history)

    def resume(self) -> bool:
        """Continue from last.pt if the run dir has one (every rank reads rank 0's); returns whether
        it did. Raises TeacherChanged (before writing anything) when last.pt was trained from another
        teacher file, and CheckpointError saying to delete it when it is damaged or does not fit this run."""
        path = self.run_dir / checkpoint.LAST
        if not path.exists():
            return False
        ckpt = _read_last(path, next(self.student.parameters()).device)
        self._check_teacher(ckpt, path)
        try:
            self._restore(ckpt)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:  # another kdexp's or another run's file
            raise checkpoint.CheckpointError(f"{path} does not fit this run ({_first_line(err)}); "
                                             f"{START_OVER}") from None
        self._write_metrics()  # the log as of this checkpoint
        log.info("resuming %s after epoch %d", self.run_dir, self.state.epoch)
        return True

    def _check_teacher(self, ckpt: dict, path: Path) -> None:
        """A resume (or a requeued job) distils from the very teacher file its epochs so far did."""
        if "teacher" not in ckpt:
            if self.teacher_file is not None:
                log.warning("%s records no teacher (written before kdexp recorded it): resuming without checking "
                            "that it was trained from %s", path, self.teacher_file["path"])
            return
        before = ckpt["teacher"]
        if (before or {}).get("sha256") != (self.teacher_file or {}).get("sha256"):
            raise TeacherChanged(f"{path} was trained from teacher {_named(before)}, but this start loads "
                                 f"{_named(self.teacher_file)}: resume with the teacher it started with "
                                 f"(paths.teachers_dir, teacher.ckpt), or {START_OVER} with this one")

    def _restore(self, ckpt: dict) -> None:
        self.student.load_state_dict(ckpt["student"])
        self.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        _match_layouts(self.optimizer)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = TrainState()
        self.state.__dict__.update(ckpt["state"])
        checkpoint.set_rng_state(ckpt["rng"])


def _read_last(path: Path, device: torch.device) -> dict:
    """last.pt's contents, or CheckpointError saying to delete it. The zip's CRCs are checked first:
    torch.load does not, and a damaged byte in the weights loads as a network that trains into NaN
    (a failure that retry_failed=true repeats, blaming the learning rate)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception:  # not a readable zip at all: checkpoint.load says why
        damaged = None
    if damaged:
        raise checkpoint.CheckpointError(f"{path} is damaged ({damaged} fails its CRC check); {START_OVER}")
    try:
        ckpt = checkpoint.load(path, map_location=device)
    except checkpoint.CheckpointError as err:
        raise checkpoint.CheckpointError(f"{err}; {START_OVER}") from None
    if not isinstance(ckpt, dict):
        raise checkpoint.CheckpointError(f"{path} does not fit this run (it holds a {type(ckpt).__name__}); "
                                         f"{START_OVER}")
    return ckpt


def _named(teacher: dict | None) -> str:
    return f"{teacher['path']} (sha256 {teacher['sha256'][:16]})" if teacher else "no teacher"


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter buffer (SGD's momentum, Adam's moments) its parameter's memory
    layout: a checkpoint written with another execution.channels_last has them in the other layout,
    which fused kernels silently mismatch."""
    for p, state in optimizer.state.items():
        for key, buf in state.items():
            if isinstance(buf, torch.Tensor) and buf.shape == p.shape and buf.stride() != p.stride():
                state[key] = torch.empty_like(p).copy_(buf)


def _epoch_line(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.4f}", f"loss {row['loss']:.4f}",
             f"train {row['train_acc']:.4f}"]
    for key in ("val_acc", "test_acc", "agreement"):
        if row.get(key) is not None:
            parts.append(f"{key.removesuffix('_acc')} {row[key]:.4f}")
    parts += [f"|g| max {row['grad_norm_max']:.2f}", f"{row['images_per_s']:.0f} img/s"]
    return "  ".join(parts)


def _progress(iterable, total: int, enabled: bool, epoch: int):
    """A progress bar only for a person at a terminal; logs and SLURM files stay clean."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=f"epoch {epoch}", leave=False)
