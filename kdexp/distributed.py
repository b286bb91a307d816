"""One run on several processes (torch.distributed data parallelism): which rank this process is,
the process group's life, and the few collectives kdexp needs.

The ranks come from the environment that `torchrun` or submitit's TorchDistributedEnvironment (kdexp's
SLURM launcher, tasks_per_node > 1) exports: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
Without WORLD_SIZE (or with 1) a run is one process and nothing here communicates.

Rank 0 is the run: it holds the run dir's lock and writes every file; the other ranks compute their
shard of each step and of each evaluation and write nothing. A rank that fails leaves its reason in
the rendezvous store before it exits, so that rank 0's failure result names it; a rank killed
outright (SIGKILL, the OOM killer, its node) leaves none, and is named by its heartbeat stopping.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from datetime import timedelta
from typing import Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from kdexp.config import ConfigError
from kdexp.data.datasets import dataset
from kdexp.data.loaders import Shard, shard_problem

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the ranks of one run (the defaults: a run of one process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # this node's GPU for this rank
    store: dist.Store | None = dataclasses.field(default=None, compare=False, repr=False)  # while the group is up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def shard(self) -> Shard | None:
        """What the loaders take (kdexp.data.loaders.shard_slice): None for one process."""
        return (self.rank, self.size) if self.distributed else None


def from_env(env: Mapping[str, str] = os.environ) -> World:
    """This process's place in the run, as torchrun or submitit exports it; one process without WORLD_SIZE."""
    size = _env_int(env, "WORLD_SIZE", 1)
    if size < 1:
        raise ConfigError(f"WORLD_SIZE={size} must be >= 1 (the number of processes of this run)")
    if size == 1:
        return World()
    rank = _env_int(env, "RANK", None)
    if not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} must be in [0, WORLD_SIZE={size})")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(key):
            raise ConfigError(f"{key} is not set, but WORLD_SIZE={size}: start the ranks with torchrun or "
                              f"a launcher with tasks_per_node > 1, which set it")
    return World(rank, size, _env_int(env, "LOCAL_RANK", rank))


def _env_int(env: Mapping[str, str], key: str, default: int | None) -> int:
    value = env.get(key)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be an integer (set by torchrun or the SLURM launcher)") from None


NCCL_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"  # read when the NCCL process group is made
HEARTBEAT_S = 0.2     # how often a rank other than 0 says it is alive, from a thread of its own
# a rank whose heartbeat has not moved for this long (and that said nothing) was killed; well under
# SLURM's KillWait, as rank 0 decides after srun's SIGTERM for the killed task (--kill-on-bad-exit)
STOPPED_AFTER_S = 2.0


@contextlib.contextmanager
def process_group(world: World, timeout_s: float) -> Iterator[World]:
    """The process group of a run on several ranks, up for the block: gloo for CPU tensors, NCCL for
    CUDA ones. Every collective waits at most `timeout_s` (trainer.dist_timeout_s), so a rank that died
    or raised fails the others instead of hanging them. Yields `world` with its store."""
    if not world.distributed:
        yield world
        return
    if timeout_s <= 0:
        raise ConfigError(f"trainer.dist_timeout_s={timeout_s} must be > 0 (seconds a rank waits for the others)")
    timeout = timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        torch.cuda.set_device(_gpu(world))  # NCCL's objects go to this rank's GPU, not GPU 0
    # NCCL's watchdog, at a collective's timeout or error, by default (3) ends the process on the spot,
    # before rank 0 can record which rank failed; 2 aborts the communicators and raises in the
    # training thread instead, where kdexp records the failure. A value the user set wins.
    os.environ.setdefault(NCCL_ERROR_HANDLING, "2")
    # torchrun's agent already serves the store on MASTER_PORT; otherwise rank 0 serves it
    serves = world.is_main and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    server = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.size, serves,
                           timeout=timeout)
    # torchrun's store outlives a restart of the ranks: each attempt keeps its keys apart
    store = dist.PrefixStore(f"kdexp/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", server)
    dist.init_process_group(store=store, rank=world.rank, world_size=world.size, timeout=timeout)
    try:
        with _heartbeat(store, world.rank):  # beating until the end: a rank done early waits here, alive
            yield dataclasses.replace(world, store=store)
            dist.barrier()  # rank 0, which serves the store, leaves last
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _heartbeat(store: dist.Store, rank: int) -> Iterator[None]:
    """A rank other than 0 counts up its heartbeat in the store while the block runs; a thread keeps
    it going while the rank computes or waits in a collective (both release the GIL), so only a dead
    process stops it. Ends quietly when the store is gone (rank 0 ended first)."""
    if rank == 0:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        with contextlib.suppress(Exception):
            while not stop.wait(HEARTBEAT_S):
                store.add(f"{_HEARTBEATS}/{rank}", 1)

    thread = threading.Thread(target=beat, name="kdexp-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def local_device(device: torch.device, world: World) -> torch.device:
    """The device this rank trains on: its own GPU of the node (LOCAL_RANK) when the run uses CUDA."""
    if world.distributed and device.type == "cuda":
        return torch.device("cuda", _gpu(world))
    return device


def _gpu(world: World) -> int:
    """LOCAL_RANK's GPU of the node's, or the only one that a task bound to one GPU sees."""
    return world.local_rank if torch.cuda.device_count() > 1 else 0


def from_main(world: World, value: T) -> T:
    """Rank 0's `value` on every rank (a decision only rank 0 may take, such as reading the run dir)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place."""
    if world.distributed:
        dist.all_reduce(tensor)
    return tensor


def gather_rows(part: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `part` (any number per rank), concatenated in rank order, on every rank
    (the padding all_gather's equal sizes need is dropped); `part` itself on one process. The default
    process group's ranks (World's), so code that holds no World (a method's forward inside DDP)
    gathers too. No gradient flows through it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return part
    size = torch.tensor([len(part)], device=part.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(sizes).item())
    padded = part.new_zeros((longest, *part.shape[1:]))
    padded[:len(part)] = part
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def broadcast_buffers(world: World, module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank: with per-rank statistics each
    rank's last step updated its own, and every rank evaluates the network rank 0 saves."""
    if world.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def report_failure(world: World, err: BaseException) -> None:
    """A failing rank's reason, left for rank 0 in the order the ranks failed (best effort: rank 0
    and its store may be gone)."""
    if world.is_main or world.store is None:
        return
    with contextlib.suppress(Exception):
        world.store.set(f"{_REPORTED}/{world.rank}", "1")
        order = world.store.add(_FAILURES, 1)
        world.store.set(f"{_FAILURES}/{order}", f"rank {world.rank}: {type(err).__name__}: {err}")


def failure_reason(world: World, err: BaseException) -> str:
    """What the failure result says: `err`, or on several ranks the rank that failed first and why.
    A rank's exit breaks the collective that the others wait in, so their errors come later: a rank
    killed without a word (found by its heartbeat) is named first, then the first reported failure,
    then rank 0's own error. Takes up to STOPPED_AFTER_S on several ranks, to see which heartbeats stopped."""
    own = f"{type(err).__name__}: {err}"
    if world.store is None:
        return own
    with contextlib.suppress(Exception):  # a store that went away with its rank
        killed = _killed_ranks(world)
        if killed:
            names = ", ".join(map(str, killed))
            return (f"rank{'s' if len(killed) > 1 else ''} {names} stopped without raising an error (killed: a "
                    f"signal, the OOM killer or its node; its log or sacct says which); rank 0 then: {own}")
        if world.store.check([f"{_FAILURES}/1"]):
            return world.store.get(f"{_FAILURES}/1").decode()
    return f"rank 0: {own}"


def _killed_ranks(world: World) -> list[int]:
    """The ranks other than 0 that reported no failure and whose heartbeat stood still for
    STOPPED_AFTER_S (asked as long as some rank may be one of them: a live rank's beat ends the wait)."""
    def beats() -> dict[int, int]:
        return {rank: world.store.add(f"{_HEARTBEATS}/{rank}", 0) for rank in range(1, world.size)
                if not world.store.check([f"{_REPORTED}/{rank}"])}
    first, deadline = beats(), time.monotonic() + STOPPED_AFTER_S
    still = set(first)
    while still and time.monotonic() < deadline:
        time.sleep(HEARTBEAT_S)
        now = beats()
        still = {rank for rank in still if now.get(rank) == first[rank]}
    return sorted(still)


_FAILURES, _REPORTED, _HEARTBEATS = "kdexp/failures", "kdexp/reported", "kdexp/heartbeats"


def check(world: World, trainer, data, device: torch.device) -> None:
    """Settings that a run on several ranks cannot take: ConfigError, one line naming the key."""
    if not world.distributed:
        return
    problem = shard_problem(trainer.batch_size, world.size)
    if problem:
        raise ConfigError(problem)
    if trainer.sync_bn and device.type != "cuda":
        raise ConfigError("trainer.sync_bn=true needs CUDA (SyncBatchNorm does not run on the CPU): use "
                          "trainer.sync_bn=false on the CPU")
    if data.loader != "tensor" and not dataset(data.name).in_folders:  # image folders shard their own loader
        raise ConfigError(f"data.loader={data.loader} runs on one process: use data.loader=tensor on several ranks")
