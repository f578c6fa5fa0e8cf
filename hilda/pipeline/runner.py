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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


@dataclass(frozen=True)
class ClusterConfig:
    workers: int = 1  # local cluster size (processes, one thread each)
    scheduler: str | None = None  # address of an existing cluster; overrides workers
    gpu_workers: bool = False  # local workers advertise one "GPU" resource each
    processes: bool = True  # False: threads in this process (needed for memory:// stores)


@contextlib.contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator[Any]:
    """A ``distributed.Client`` on an existing scheduler or on a fresh local cluster."""
    from distributed import Client, LocalCluster

    if cfg.scheduler:
        with Client(cfg.scheduler) as client:
            yield client
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
        yield client


@dataclass(frozen=True)
class Task:
    key: int  # shard index in the completion map
    frames: int  # frames it covers (for the progress bar)
    args: tuple


def run_tasks(
    client: Any,
    fn: Callable[..., Any],
    tasks: Sequence[Task],
    *,
    label: str,
    on_done: Callable[[Task, Any], None],
    resources: dict[str, float] | None = None,
) -> list[Any]:
    """Run ``fn(*task.args)`` for every task on the cluster; ``on_done`` runs on the driver
    as each finishes (in completion order). Results are returned in task order."""
    from distributed import as_completed

    results: dict[int, Any] = {}
    total = sum(t.frames for t in tasks)
    with Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("frames"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        progress = bar.add_task(label, total=total)
        futures = {}
        for task in tasks:
            fut = client.submit(
                fn,
                *task.args,
                key=f"{label}-{task.key}-{os.getpid()}",
                pure=False,
                resources=resources,
            )
            futures[fut] = task
        try:
            for fut in as_completed(futures):
                task = futures[fut]
                results[task.key] = fut.result()
                on_done(task, results[task.key])
                bar.update(progress, advance=task.frames)
        finally:
            for fut in futures:
                fut.cancel()
    return [results[t.key] for t in tasks]
