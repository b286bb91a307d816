"""Atomic checkpoints and the RNG state an exact resume needs.

Every checkpoint is read with `torch.load(weights_only=True)`: tensors and plain Python values
only, never a pickled object whose unpickling can run code (a published teacher, a file copied to
a teacher's path, a run dir's last.pt). kdexp writes nothing that needs more, except the numpy RNG
state of a last.pt written before it stored that state as plain values: the four numpy names
that state needs are allowed while reading a last.pt, and nowhere else. Anything else is refused
in one line (UnsafeCheckpointError).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdexp.records import atomic_write_bytes

LAST = "last.pt"


class CheckpointError(RuntimeError):
    pass


class UnsafeCheckpointError(CheckpointError):
    """The file holds objects that only a full unpickle (which can run code) would load."""


# An older last.pt's `np.random.get_state()`: a uint32 array, as numpy pickles it. By object, not by
# import path: numpy moved `_reconstruct` (numpy.core -> numpy._core) and has no `dtypes` before 1.25.
LEGACY_RNG_GLOBALS = (np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.zeros(0).__reduce__()[0])


def save(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's tensors and plain values; UnsafeCheckpointError if it holds anything else,
    CheckpointError (what to do is the caller's to say) if unreadable."""
    with _allowed(Path(path)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # truncated zip, wrong pickle, ...: all mean the same to the user
            refused = _refused_globals(path, err)
            if refused:
                raise UnsafeCheckpointError(
                    f"refusing to load {path}: it holds {', '.join(refused)}, which only a full unpickle loads, and "
                    f"that can run code (kdexp loads tensors and plain values only: torch.load(weights_only=True))"
                ) from None
            raise CheckpointError(f"cannot read checkpoint {path} ({type(err).__name__}: {_reason(err)})") from None


def _allowed(path: Path) -> contextlib.AbstractContextManager:
    """The legacy RNG state's numpy names while reading a last.pt (the run's own file); nothing else."""
    if path.name == LAST:
        return torch.serialization.safe_globals(list(LEGACY_RNG_GLOBALS))
    return contextlib.nullcontext()


def _refused_globals(path: Path, err: Exception) -> list[str]:
    """The names `weights_only` refused in `path`; none when the file is merely unreadable."""
    try:  # all of them, read from the pickle without running it (zip checkpoints: torch >= 1.6)
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # torch's legacy format, or no checkpoint at all: the error names the first
        return re.findall(r"GLOBAL ([\w.]+)", str(err))[:1]


def _reason(err: Exception) -> str:
    """The line of torch's error that says what is wrong (weights_only wraps it in paragraphs of advice)."""
    text = str(err).split("WeightsUnpickler error:")[-1]
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every generator's state, as plain values and tensors (what weights_only reads)."""
    name, keys, *position = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), *position), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
