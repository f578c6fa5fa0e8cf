"""One writer per store and per run folder (``hilda.store.lock``): a second writer fails at once
naming the holder, a holder killed with -9 leaves a lock the next writer takes over, and one
process may nest the lock (``hilda-prep all`` and its stages). The holder is a real second
process; the test synchronises on files it writes, not on sleeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hilda.cli.prep import app as prep_app
from hilda.cli.train import app as train_app
from hilda.store.lock import LockedError, lock_path, writer_lock

HOLDER = """
import sys, time
from pathlib import Path
from hilda.store.lock import writer_lock
target, ready, release = sys.argv[1:4]
with writer_lock(target, "test holder"):
    Path(ready).touch()
    while not Path(release).exists():
        time.sleep(0.05)
"""


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until ``path`` exists (the holder has the lock), failing if the holder died."""
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the holder never took the lock"
        time.sleep(0.05)


@pytest.fixture
def holder(tmp_path: Path):
    """Start a process holding the writer lock of a target; yields (start, tmp_path)."""
    procs: list[subprocess.Popen] = []

    def start(target: Path) -> subprocess.Popen:
        ready, release = tmp_path / f"{target.name}.ready", tmp_path / f"{target.name}.release"
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(target), str(ready), str(release)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(proc)
        wait_for(ready, proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_second_writer_is_refused_naming_the_holder(holder, tmp_path: Path) -> None:
    store = tmp_path / "cache.zarr"
    proc = holder(store)
    with pytest.raises(LockedError, match=rf"pid {proc.pid} on .*test holder"):
        with writer_lock(store, "second"):
            pass
    # Every stage takes it before touching the store.
    res = CliRunner().invoke(prep_app, ["build-occupancy", "--store", str(store)])
    assert res.exit_code != 0 and f"pid {proc.pid}" in res.output, res.output
    assert "being written by another process" in res.output
    # kill -9 leaves the lock file, but not the lock: the next writer takes it over.
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with writer_lock(store, "after the kill"):
        info = json.loads(lock_path(store).read_text())
        assert info["pid"] == os.getpid() and info["command"] == "after the kill"


def test_training_refuses_a_run_folder_another_process_writes(holder, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = holder(out)
    args = ["run", "--config", "tiny_cpu", "--store", str(tmp_path / "none.zarr")]
    res = CliRunner().invoke(train_app, [*args, "--out", str(out)])
    assert res.exit_code != 0 and f"pid {proc.pid}" in res.output, res.output
    assert not out.exists()  # nothing was written


def test_the_lock_nests_in_one_process_and_sits_beside_its_target(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    with writer_lock(store, "outer"), writer_lock(f"file://{store}", "inner"):
        assert lock_path(store) == tmp_path / "s.zarr.lock"
        assert json.loads(lock_path(store).read_text())["command"] == "outer"
    assert not store.exists()  # nothing inside the target
    assert lock_path("memory://s.zarr") is None and lock_path("s3://b/s.zarr") is None
    with writer_lock("memory://s.zarr", "unlocked"):  # no advisory locks on remote stores
        pass
