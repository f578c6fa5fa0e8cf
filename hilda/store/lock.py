"""One writer at a time: an advisory lock per cache store and per training run folder.

zarr has no lock, so two ``hilda-prep`` stages on one store (or two ``hilda-train run`` into
one ``--out``) would both write and silently corrupt it. Every writer holds ``writer_lock``
on its target while it runs; a second writer fails at once with a message naming the holder
(pid, host, command, start time). Readers (training from a cache, ``hilda-prep info``) need
no lock.

The lock is ``flock`` on a file *beside* the target (``cache.zarr.lock``, ``runs/vits.lock``),
never inside it, so a store's own files stay byte-identical between runs. The kernel releases
an flock when its holder exits, however it exits (``kill -9`` included): a stale lock file
only holds the last holder's description, and the next writer takes it over. It is reentrant
within a process (``hilda-prep all`` holds it while its stages take it again). Remote stores
(``s3://``, ``gs://``, ``memory://``) have no advisory locks: their writers are not locked;
local file systems and NFS with flock support are.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from hilda.errors import HildaError

_held: dict[str, int] = {}  # resolved lock path -> depth of writer_lock in this process


class LockedError(HildaError):
    """Another process is writing the target."""


def lock_path(target: str | os.PathLike) -> Path | None:
    """The lock file of a store URL or folder (``X`` -> ``X.lock`` beside it), named from the
    target's real path (symbolic links resolved), so a store reached through two paths has one
    lock; None where the target is not on a local file system (s3://, gs://, memory://: no
    lock is taken there, docs/cache.md)."""
    text = str(target)
    if "://" in text and not text.startswith("file://"):
        return None
    path = Path(text.removeprefix("file://")).resolve()
    return path.with_name(path.name + ".lock")


def _holder(what: str) -> str:
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": what,
            "argv": " ".join(sys.argv),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )


def _describe(fd: int) -> str:
    """The holder recorded in an open lock file, in words."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "a process that has not yet recorded itself"
    return (
        f"pid {info.get('pid')} on {info.get('host')}, {info.get('command')} "
        f"({info.get('argv')}), since {info.get('since')}"
    )


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the writer lock of ``target`` (a store URL or a folder) while inside; ``what``
    names the writer in the message a second writer gets (e.g. "hilda-prep
    build-occupancy")."""
    path = lock_path(target)
    if path is None:
        yield
        return
    key = str(path)
    if key in _held:  # this process holds it already (hilda-prep all and its stages)
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(
                f"{target} is being written by another process: {_describe(fd)}. Wait for it "
                f"to finish or stop it; the lock ({path}) is released when it exits."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder(what).encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)  # releases the flock
