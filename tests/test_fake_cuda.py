"""kdexp's CUDA path run on the CPU as far as torch allows (issue 17, section 4).

Fake tensors (`FakeTensorMode`) carry a device, dtype, shape and strides but no data: every op
checks its inputs' devices as it would on a GPU, without running a kernel. The real parts (models,
methods, TrainBatches, the cache lookup, Loop) are built on the CPU, moved to a fake device and run:

- the forward on fake CUDA, every method x live/cached teacher x reference/fast (bf16 autocast,
  channels_last): the batch, the teacher-logit lookup and `Loop.losses`;
- the compiled forward on fake CUDA (dynamo, eager backend): one graph, no graph break, no
  recompile across epochs with evaluation between them; dynamo also traces the backward of any
  custom autograd.Function there;
- the backward on fake *meta*: without a GPU, torch's autograd engine refuses CUDA tensors
  ("hasPrimaryContext expects a valid device index"), eagerly and under make_fx or AOTAutograd
  alike. Meta is a non-CPU device it runs on, so `Loop.step` there still fails on a CPU tensor
  (reference execution only: autocast has no meta device);
- the gradient clip and the unfused optimiser step, eval batches and `teacher_cache.build` on fake CUDA;
- the compiled step with its backward (AOTAutograd, aot_eager), for real on the CPU.

Not checkable without a GPU: the fused optimiser step (aten::_fused_sgd_ has no fake kernel),
inductor and CUDA graphs (`mode="reduce-overhead"`), and values (fake tensors have none, so no
`.item()`: train_epoch's metrics and evaluation's accuracies). tests/gpu covers them on a GPU.

Each fake-device check fails when a CPU tensor is planted in it, and the compiled checks fail on a
graph break or a recompile (the tests at the end).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from functools import partial

import pytest
import torch
from omegaconf import DictConfig
from torch import nn
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import CPU, compose_cfg
from kdexp import loop as loop_module
from kdexp import teacher_cache
from kdexp.config import method_classes
from kdexp.data import Splits, loaders
from kdexp.data.loaders import Batch, EvalBatches, TrainBatches
from kdexp.evaluation import predict
from kdexp.execution import Execution
from kdexp.loop import Loop, build_optimizer, clip_gradients
from kdexp.methods import DistillationMethod
from kdexp.models import build_model
from kdexp.teachers import FrozenTeacher

CUDA, META = torch.device("cuda:0"), torch.device("meta")
REFERENCE = Execution()
FAST = Execution(amp=torch.bfloat16, channels_last=True, fused=True)
EXECUTIONS = {"reference": REFERENCE, "fast": FAST}
BATCH = 16
EPOCHS = 2  # the first compiles; the second must reuse its graph
# torch's message on a GPU too. A 0-dim CPU tensor (a scalar) is allowed there, and here.
DEVICE_MISMATCH = r"Expected all tensors to be on the same device, but found at least two devices, .*cpu"
MEAN_STD = loaders._mean_std  # the real one, whose cache is cleared even where a test replaced it


@dataclasses.dataclass(frozen=True)
class Case:
    method: type[DistillationMethod]
    cached: bool  # teacher logits from the cache instead of a live teacher

    def __str__(self) -> str:
        return f"{self.method.name}-{'cached' if self.cached else 'live'}"


# Every method in kdexp/methods/ (one added later is covered), with a live teacher and, where it
# can use one, the teacher-logit cache; DEFAULT: the teacher each method has by default on CUDA.
CASES = [Case(m, cached) for m in method_classes() for cached in (False, True)
         if not cached or m.can_use_teacher_cache()]
DEFAULT = [Case(m, m.can_use_teacher_cache()) for m in method_classes()]
CACHED = next(c for c in CASES if c.cached)
# Features of the teacher and parameters of its own (projections, clipped with the student's).
FEATURES = next(c for c in CASES if c.method.needs_features)


@pytest.fixture(autouse=True)
def cuda_autocast(monkeypatch) -> Iterator[None]:
    """torch.autocast("cuda") asks the driver whether CUDA and bf16 are there and, without a GPU,
    disables itself: answer as a GPU would, so the fast path runs its bf16 autocast. Before and
    after each test, a fresh dynamo and fresh normalisation constants (`_mean_std` caches them
    per device, and a fake tensor must not outlive its mode)."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    _fresh()
    yield
    _fresh()


def _fresh() -> None:
    MEAN_STD.cache_clear()
    torch._dynamo.reset()
    counters.clear()  # reset() keeps dynamo's statistics


@pytest.fixture(scope="module")
def cfg() -> DictConfig:
    return compose_cfg(f"trainer.batch_size={BATCH}", f"trainer.epochs={EPOCHS}")


def fake_mode() -> FakeTensorMode:
    # Real CPU tensors that meet fake ones become fake CPU tensors, so they still mismatch.
    return FakeTensorMode(allow_non_fake_inputs=True)


def loop_on(device: torch.device, mode: contextlib.AbstractContextManager, case: Case, execution: Execution,
            cfg: DictConfig, splits: Splits) -> Loop:
    """A Loop whose networks, method, optimiser, data and cache are on `device` (fake inside
    `mode`), built as build_loop builds them: on the CPU, then moved. Except that channels_last is
    set before the move: a fake module's .to() cannot swap its parameters."""
    execution = dataclasses.replace(execution, teacher_cache=case.cached)
    torch.manual_seed(0)
    student = execution.prepare(build_model("resnet18", cfg.model.num_classes, width=4))
    teacher = execution.prepare(FrozenTeacher(build_model("resnet18", cfg.model.num_classes, width=4))) \
        if case.method.needs_teacher else None
    method = case.method()
    method.bind(student, teacher)
    if method.needs_indices:
        method.bind_training_set(splits.train_y)
    execution.prepare(method)
    with mode:
        for module in (student, teacher, method):
            if module is not None:
                module.to(device)
        optimizer = build_optimizer(student, method, cfg.optimizer, cfg.trainer.lr, execution.fused)
        batches = StrongViewBatches if method.needs_strong_view else TrainBatches
        train = batches(splits.train_x, splits.train_y, BATCH, cfg.seed, device, 1, execution.channels_last)
        views = (len(splits.train_x), teacher_cache.OFFSETS, teacher_cache.OFFSETS, 2, cfg.model.num_classes)
        cache = torch.zeros(views, dtype=execution.amp or torch.float32, device=device) if case.cached else None
    return Loop(student, method, teacher, optimizer, scheduler=None, train=train, val=None, test=None,
                trainer=cfg.trainer, run_dir=None, execution=execution, teacher_logits=cache)


class StrongViewBatches(TrainBatches):
    """Batches that also carry a second view, as the DataLoader path's strong augmentation
    (data.strong_view) delivers it: a tensor of the images' shape, device and layout."""

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for batch in super().epoch(epoch):
            yield dataclasses.replace(batch, x_strong=batch.x.flip(3))


def step_forward(loop: Loop, batch: Batch, losses: Callable | None = None):
    """Loop.step up to its backward: the inputs from the batch (cache lookup included), then the loss parts."""
    return (losses or loop.losses)(*loop.inputs(batch))


def assert_on(device: torch.device, parts: dict[str, torch.Tensor], logits: torch.Tensor,
              execution: Execution) -> None:
    assert {name: (p.device, p.dtype, p.shape) for name, p in parts.items()} == \
        {name: (device, torch.float32, torch.Size()) for name in parts}  # fp32 scalars, bf16 or not
    assert (logits.device, logits.dtype) == (device, execution.amp or torch.float32)


# The checks: each runs as tests below, and again with a CPU tensor planted in it.

def forward_on_fake_cuda(case: Case, execution: Execution, cfg: DictConfig, splits: Splits) -> None:
    mode = fake_mode()
    loop = loop_on(CUDA, mode, case, execution, cfg, splits)
    with mode:
        loop.method.start_epoch(1, EPOCHS)
        batch = next(loop.train.epoch(1))
        parts, logits = step_forward(loop, batch)
    assert batch.x.is_contiguous(memory_format=torch.channels_last) == execution.channels_last
    assert_on(CUDA, parts, logits, execution)


def compiled_forward_on_fake_cuda(case: Case, cfg: DictConfig, splits: Splits) -> None:
    """The fast forward as torch.compile captures it, over epochs with an evaluation between them
    as fit() runs them: one graph (fullgraph: a graph break raises, naming its cause), no
    recompile. The eager backend: inductor needs a GPU, and so does the backward here."""
    mode = fake_mode()
    loop = loop_on(CUDA, mode, case, FAST, cfg, splits)
    compiled = torch.compile(loop.losses, backend="eager", fullgraph=True, dynamic=False)
    with mode, torch._dynamo.config.patch(error_on_recompile=True):
        test = EvalBatches(splits.test_x[:BATCH], splits.test_y[:BATCH], BATCH, CUDA, FAST.channels_last)
        for epoch in range(1, EPOCHS + 1):
            loop.method.start_epoch(epoch, EPOCHS)
            loop.student.train(), loop.method.train()
            for batch in loop.train.epoch(epoch):
                parts, logits = step_forward(loop, batch, compiled)
            assert predict(loop.student, test).device == CUDA
    assert counters["stats"]["unique_graphs"] == 1
    assert_on(CUDA, parts, logits, FAST)


def backward_on_fake_meta(case: Case, cfg: DictConfig, splits: Splits) -> None:
    """Loop.step, backward included, on the meta device: every parameter that trains gets its
    gradient there."""
    mode = fake_mode()
    loop = loop_on(META, mode, case, REFERENCE, cfg, splits)
    with mode:
        loop.method.start_epoch(1, EPOCHS)
        parts, _ = loop.step(next(loop.train.epoch(1)))
    trained = [p for g in loop.optimizer.param_groups for p in g["params"]]
    assert trained and all(p.grad is not None and p.grad.device == META for p in trained)
    assert all(p.device == META for p in parts.values())


def clip_and_step_on_fake_cuda(case: Case, cfg: DictConfig, splits: Splits) -> None:
    """What train_epoch does after the backward: the clip over student and method parameters and
    the (unfused) optimiser step. The gradients stand in for the backward's, which cannot run
    here: zeros with each parameter's device, dtype and layout, as autograd makes them."""
    mode = fake_mode()
    loop = loop_on(CUDA, mode, case, REFERENCE, cfg, splits)
    with mode:
        for group in loop.optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        norm, method_norm = clip_gradients(loop.optimizer, cfg.trainer.clip_norm)
        loop.optimizer.step()
    assert norm.device == CUDA and (method_norm is None or method_norm.device == CUDA)
    assert all(s["momentum_buffer"].device == CUDA for s in loop.optimizer.state.values())


def cache_build_on_fake_cuda(execution: Execution, cfg: DictConfig, splits: Splits) -> None:
    """teacher_cache.build on CUDA: every view of every image, in the layout lookup indexes. A
    one-layer teacher: the 162 views are build's loop, the network is not what it checks."""
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, cfg.model.num_classes))
    with fake_mode():
        teacher.to(CUDA)
        logits = teacher_cache.build(teacher, splits.train_x[:4], execution)
    assert logits.shape == (4, teacher_cache.OFFSETS, teacher_cache.OFFSETS, 2, cfg.model.num_classes)
    assert (logits.device, logits.dtype) == (CUDA, execution.amp or torch.float32)


def compiled_step_on_cpu(case: Case, cfg: DictConfig, splits: Splits) -> None:
    """Loop.train_epoch with execution.compile, for real on the CPU: dynamo captures the forward in
    one graph, AOTAutograd traces its backward, nothing recompiles across epochs. The backend is
    swapped for aot_eager (inductor's CUDA graphs need a GPU). The one check here that a CPU tensor
    cannot fail: on fake CUDA the backward cannot run, and on meta aot_eager drops cross-entropy's
    gradient (torch 2.14: "aten::nll_loss: an autograd kernel was not registered")."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Execution, "compiled", staticmethod(
            lambda fn, *args, **kwargs: torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)))
        loop = loop_on(CPU, contextlib.nullcontext(), case, dataclasses.replace(REFERENCE, compile=True),
                       cfg, splits)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for epoch in range(1, EPOCHS + 1):
            loop.method.start_epoch(epoch, EPOCHS)
            row = loop.train_epoch(epoch)
    assert counters["stats"]["unique_graphs"] == 1
    assert math.isfinite(row["loss"])


@pytest.mark.parametrize("execution", EXECUTIONS.values(), ids=EXECUTIONS.keys())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_on_fake_cuda(case, execution, cfg, splits):
    forward_on_fake_cuda(case, execution, cfg, splits)


@pytest.mark.parametrize("case", DEFAULT, ids=str)
def test_compiled_forward_on_fake_cuda_is_one_graph_for_every_epoch(case, cfg, splits):
    compiled_forward_on_fake_cuda(case, cfg, splits)


@pytest.mark.parametrize("case", DEFAULT, ids=str)
def test_backward_on_fake_meta(case, cfg, splits):
    backward_on_fake_meta(case, cfg, splits)


def test_clip_and_optimizer_step_on_fake_cuda(cfg, splits):
    clip_and_step_on_fake_cuda(FEATURES, cfg, splits)


@pytest.mark.parametrize("execution", EXECUTIONS.values(), ids=EXECUTIONS.keys())
def test_teacher_cache_build_on_fake_cuda(execution, cfg, splits):
    cache_build_on_fake_cuda(execution, cfg, splits)


def test_compiled_step_traces_its_backward_once_on_the_cpu(cfg, splits):
    compiled_step_on_cpu(CACHED, cfg, splits)


# Planting a CPU tensor: each check above then fails with a device mismatch.

def plant_in_loss(monkeypatch) -> None:
    """A CPU tensor added to every method's CE term (each method has one)."""
    cross_entropy = DistillationMethod.cross_entropy
    monkeypatch.setattr(DistillationMethod, "cross_entropy",
                        lambda self, logits, targets: cross_entropy(self, logits, targets) + torch.zeros(1))


def plant_in_lookup(monkeypatch) -> None:
    """Cached teacher logits that come back on the CPU."""
    lookup = teacher_cache.lookup
    monkeypatch.setattr(teacher_cache, "lookup", lambda logits, batch: lookup(logits, batch).cpu())
    monkeypatch.setattr(loop_module, "lookup", teacher_cache.lookup)


def plant_in_normalisation(monkeypatch) -> None:
    """The data path's mean and std left on the CPU."""
    monkeypatch.setattr(loaders, "_mean_std", lambda device, layout: MEAN_STD(CPU, layout))


class CpuInBackward(torch.autograd.Function):
    """The identity, whose backward adds a CPU tensor: a custom op's bug that no forward shows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad + torch.zeros(1)


def plant_in_backward(monkeypatch) -> None:
    """A CPU tensor in the backward only, behind every method's CE term."""
    cross_entropy = DistillationMethod.cross_entropy
    monkeypatch.setattr(DistillationMethod, "cross_entropy",
                        lambda self, logits, targets: CpuInBackward.apply(cross_entropy(self, logits, targets)))


def plant_in_gradient_norm(monkeypatch) -> None:
    """A CPU tensor in the norms the clip takes."""
    norm = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda x, *a, **k: norm(x, *a, **k) + torch.zeros(1))


PLANTED = {
    "forward-loss": (partial(forward_on_fake_cuda, FEATURES, FAST), plant_in_loss),
    "forward-lookup": (partial(forward_on_fake_cuda, CACHED, REFERENCE), plant_in_lookup),
    "forward-normalisation": (partial(forward_on_fake_cuda, CACHED, FAST), plant_in_normalisation),
    "compiled-loss": (partial(compiled_forward_on_fake_cuda, CACHED), plant_in_loss),
    "compiled-backward": (partial(compiled_forward_on_fake_cuda, CACHED), plant_in_backward),
    "backward-loss": (partial(backward_on_fake_meta, CACHED), plant_in_loss),
    "backward-only": (partial(backward_on_fake_meta, CACHED), plant_in_backward),
    "clip-norm": (partial(clip_and_step_on_fake_cuda, FEATURES), plant_in_gradient_norm),
    "cache-build-normalisation": (partial(cache_build_on_fake_cuda, FAST), plant_in_normalisation),
}


@pytest.mark.parametrize("check, plant", PLANTED.values(), ids=PLANTED.keys())
def test_a_planted_cpu_tensor_fails_the_check(check, plant, cfg, splits, monkeypatch):
    plant(monkeypatch)
    with pytest.raises(RuntimeError, match=DEVICE_MISMATCH):  # FakeTensorDeviceMismatchError, or dynamo's
        check(cfg, splits)


# And the compiled checks fail on what they are there to find.

def plant_graph_break(monkeypatch) -> None:
    """A graph break in every method's CE term (a print, a .item(), a data-dependent branch...)."""
    cross_entropy = DistillationMethod.cross_entropy

    def broken(self, logits, targets):
        torch._dynamo.graph_break()
        return cross_entropy(self, logits, targets)
    monkeypatch.setattr(DistillationMethod, "cross_entropy", broken)


def plant_python_epoch(monkeypatch) -> None:
    """The epoch as a Python number in the loss, as a warm-up might read it (DKD reads a buffer
    instead): the graph holds it as a constant, so each epoch recompiles."""
    start_epoch, cross_entropy = DistillationMethod.start_epoch, DistillationMethod.cross_entropy

    def start(self, epoch: int, epochs: int) -> None:
        start_epoch(self, epoch, epochs)
        self.epoch_number = epoch
    monkeypatch.setattr(DistillationMethod, "start_epoch", start)
    monkeypatch.setattr(DistillationMethod, "cross_entropy",
                        lambda self, logits, targets: cross_entropy(self, logits, targets) * self.epoch_number)


@pytest.mark.parametrize("check, plant, error", [
    (partial(compiled_forward_on_fake_cuda, CACHED), plant_python_epoch, "Recompiling function losses"),
    (partial(compiled_step_on_cpu, CACHED), plant_graph_break, r"torch._dynamo.graph_break\(\)"),
], ids=["fake-cuda-recompile", "cpu-graph-break"])
def test_a_recompile_or_graph_break_fails_the_compiled_check(check, plant, error, cfg, splits, monkeypatch):
    plant(monkeypatch)
    with pytest.raises(Exception, match=error):  # dynamo's RecompileError, Unsupported
        check(cfg, splits)
