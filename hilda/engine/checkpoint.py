"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds everything a resumed run needs to continue exactly: model, optimiser,
scheduler and grad-scaler states, the RNG states, the position (epoch, batches done in it,
global step) and the config it was written with. Only tensors, numbers, strings, lists,
tuples and dicts are stored, so nothing is unpickled beyond what ``weights_only`` allows.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hilda.atomic import atomic_write
from hilda.errors import HildaError

FORMAT = "hilda-train-checkpoint"
VERSION = 1


def rng_state() -> dict[str, Any]:
    name, key, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (global state, saved for resume)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], key, n["pos"], n["has_gauss"], n["cached"]))  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def previous_path(path: str | Path) -> Path:
    """Where ``save_checkpoint`` keeps the checkpoint before the newest: ``last.pt`` ->
    ``last.previous.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def save_checkpoint(path: str | Path, blob: dict[str, Any]) -> Path:
    """Write ``blob`` (+ format, version, RNG states) to ``path`` via a temporary file and an
    atomic rename, keeping the checkpoint it replaces as ``previous_path(path)``: a crash
    leaves a complete checkpoint, and a newest one damaged later (a full disk, a torn copy)
    still has one to fall back to (``load_latest_checkpoint``)."""
    path = Path(path)
    full = {"format": FORMAT, "version": VERSION, "rng": rng_state(), **blob}
    if path.exists():
        os.replace(path, previous_path(path))
    return atomic_write(path, lambda tmp: torch.save(full, tmp))


def load_latest_checkpoint(
    path: str | Path, warn: Callable[[str], None] = print
) -> tuple[dict[str, Any], Path]:
    """(checkpoint, its path): ``path``, or the one before it when ``path`` is missing or
    unreadable (with a warning that names both); an error when neither can be read."""
    path = Path(path)
    try:
        return load_checkpoint(path), path
    except HildaError as exc:
        previous = previous_path(path)
        if not previous.is_file():
            raise
        warn(f"{exc}; resuming from the checkpoint before it, {previous}")
        return load_checkpoint(previous), previous


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise HildaError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # refused by weights_only, truncated or not a torch file
        raise HildaError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise HildaError(f"{path} is not a hilda training checkpoint")
    if blob.get("version") != VERSION:
        raise HildaError(f"{path} is checkpoint version {blob.get('version')}, expected {VERSION}")
    return blob
