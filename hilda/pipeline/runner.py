"""Running a stage's tasks on dask.distributed, with a progress bar and a completion map.

Every stage splits its work into shard tasks. ``run_tasks`` submits the tasks that are not
yet marked done, shows a rich progress bar (frames done) as they complete, and marks each
shard done in the store as soon as its task returns: a killed run loses only the shards in
flight, and a rerun skips the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hilda.errors import HildaError

console = Console(stderr=True)


class NoWorkersError(HildaError):
    """The stage's cluster has had no workers for longer than its timeout."""


@dataclass(frozen=True)
class ClusterConfig:
    workers: int = 1  # local cluster size (processes, one thread each)
    scheduler: str | None = None  # address of an existing cluster; overrides workers
    gpu_workers: bool = False  # local workers advertise one "GPU" resource each
    processes: bool = True  # False: threads in this process (needed for memory:// stores)
    # A stage whose cluster has had no worker this long fails (an external scheduler whose
    # workers all died would otherwise wait for ever, showing nothing).
    no_worker_timeout: float = 300.0


@dataclass(frozen=True)
class Workers:
    """A stage's connection to its cluster: the ``distributed.Client`` and how long tasks
    may wait with no worker to run them."""

    client: Any
    no_worker_timeout: float = 300.0
    address: str = ""


CONNECT_TIMEOUT_S = 10.0  # how long a stage tries an existing scheduler before giving up


def check_scheduler(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse an existing scheduler that cannot be reached, before a stage changes anything
    (an ``--overwrite`` would otherwise empty a finished group first)."""
    from distributed import Client

    try:
        with Client(address, timeout=timeout):
            pass
    except (OSError, TimeoutError) as exc:
        raise NoWorkersError(
            f"cannot reach the Dask scheduler {address} ({type(exc).__name__}: {exc}); "
            "nothing in the store was changed"
        ) from None


@contextlib.contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator[Workers]:
    """A ``distributed.Client`` on an existing scheduler or on a fresh local cluster."""
    from distributed import Client, LocalCluster

    if cfg.scheduler:
        with Client(cfg.scheduler) as client:
            yield Workers(client, cfg.no_worker_timeout, cfg.scheduler)
        return
    # One thread per worker process: the ops are numpy/torch heavy and hold the GIL in
    # places; torch in each worker is limited to one thread for the same reason.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    kwargs: dict[str, Any] = {}
    if cfg.gpu_workers:
        kwargs["resources"] = {"GPU": 1}
    with (
        LocalCluster(
            n_workers=cfg.workers,
            threads_per_worker=1,
            processes=cfg.processes,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,  # worker shutdown chatter; task errors still raise
            **kwargs,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield Workers(client, cfg.no_worker_timeout, "a local cluster")


@dataclass(frozen=True)
class Task:
    key: int  # shard index in the completion map
    frames: int  # frames it covers (for the progress bar)
    args: tuple


POLL_S = 1.0  # how often the driver looks at the cluster while no task finishes


def run_tasks(
    workers: Workers,
    fn: Callable[..., Any],
    tasks: Sequence[Task],
    *,
    label: str,
    on_done: Callable[[Task, Any], None],
    resources: dict[str, float] | None = None,
) -> list[Any]:
    """Run ``fn(*task.args)`` for every task on the cluster; ``on_done`` runs on the driver
    as each finishes (in completion order). Results are returned in task order. When the
    cluster has no worker the bar says so, and after ``workers.no_worker_timeout`` seconds
    without one the stage fails (the shards done so far are kept)."""
    client = workers.client
    results: dict[int, Any] = {}
    total = sum(t.frames for t in tasks)
    with Progress(
        TextColumn("[bold]{task.description}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("frames"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        progress = bar.add_task(label, total=total)
        finished_q, futures = _submit(client, fn, tasks, label, resources)
        remaining = len(futures)
        alone_since: float | None = None  # when the cluster was last seen without workers
        try:
            while remaining:
                try:
                    finished = [finished_q.get(timeout=POLL_S)]
                except queue.Empty:
                    alone_since = _check_workers(workers, alone_since, label)
                    waiting = "" if alone_since is None else _waiting(workers, alone_since)
                    bar.update(progress, description=f"{label}{waiting}")
                    continue
                while not finished_q.empty():
                    finished.append(finished_q.get())
                for fut in sorted(finished, key=lambda f: futures[f].key):
                    task = futures[fut]
                    results[task.key] = fut.result()
                    on_done(task, results[task.key])
                    bar.update(progress, advance=task.frames)
                    remaining -= 1
        finally:
            for fut in futures:
                fut.cancel()
    return [results[t.key] for t in tasks]


def _submit(
    client: Any,
    fn: Callable[..., Any],
    tasks: Sequence[Task],
    label: str,
    resources: dict[str, float] | None,
) -> tuple[queue.SimpleQueue, dict[Any, Task]]:
    """Submit every task; completions arrive through a queue fed by each future's
    done-callback: O(1) a task. (``distributed.wait(pending, FIRST_COMPLETED)`` in a loop
    re-registers every pending future at each call: O(tasks^2) driver work over a stage, 1k
    shards at nuScenes trainval's size.)"""
    finished_q: queue.SimpleQueue = queue.SimpleQueue()
    futures = {}
    for task in tasks:
        key = f"{label}-{task.key}-{os.getpid()}"
        fut = client.submit(fn, *task.args, key=key, pure=False, resources=resources)
        futures[fut] = task
        fut.add_done_callback(finished_q.put)
    return finished_q, futures


def _check_workers(workers: Workers, alone_since: float | None, label: str) -> float | None:
    """When the cluster was first seen without workers in the current spell (None: it has
    some); raises once the spell is longer than the timeout."""
    if workers.client.nthreads():
        return None
    now = time.monotonic()
    if alone_since is None:
        return now
    if now - alone_since > workers.no_worker_timeout:
        raise NoWorkersError(
            f"{label}: the Dask cluster ({workers.address}) has had no workers for "
            f"{workers.no_worker_timeout:g} s, so no task can run. Start workers for it "
            "(`dask worker ADDRESS`) or run without --scheduler; the shards already done are "
            "kept and a rerun resumes from them (--no-worker-timeout sets the wait)"
        )
    return alone_since


def _waiting(workers: Workers, alone_since: float) -> str:
    waited = time.monotonic() - alone_since
    return f" [red](no Dask workers for {waited:.0f} s of {workers.no_worker_timeout:g})[/]"
