"""Atomic file writes: the bytes go to ``<name>.tmp``, are flushed to disk, and a rename makes
them current, so a crash or kill leaves the previous file (or none), never half of one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` writes the content to a temporary path beside ``path``; it then becomes
    ``path`` atomically. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:  # on disk before the rename makes it current
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, value: Any) -> Path:
    """``value`` as indented JSON at ``path``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2)))
