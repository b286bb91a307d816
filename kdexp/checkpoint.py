"""Atomic checkpoints and the RNG state an exact resume needs."""
from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdexp.records import atomic_write_bytes

LAST = "last.pt"


class CheckpointError(RuntimeError):
    pass


def save(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's contents; CheckpointError (what to do is the caller's to say) if unreadable."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, wrong pickle, ...: all mean the same to the user
        raise CheckpointError(f"cannot read checkpoint {path} ({type(err).__name__}: {err})") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
