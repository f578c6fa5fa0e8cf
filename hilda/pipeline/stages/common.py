"""What every stage shares: its options, Dask client and writer lock, and the orchestration of
shard tasks: frame shards marked done as they finish, and ragged (CSR) groups computed,
staged and copied (the store side of both is ``hilda.store``: ``writer``, ``ragged``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zarr

from hilda.errors import FrameError, HildaError
from hilda.pipeline.runner import (
    ClusterConfig,
    Task,
    Workers,
    check_scheduler,
    dask_client,
    run_tasks,
)
from hilda.store.lock import writer_lock
from hilda.store.ragged import (
    Rows,
    copy_rows,
    fix_offsets,
    frame_shards,
    frames_counted,
    remove_staging,
    row_shard_size,
    row_shards,
    rows_done_map,
    stage_rows,
    staged_counts,
    staged_shards,
    staging_path,
)
from hilda.store.schema import RAGGED_ROWS_PER_SHARD
from hilda.store.writer import done_map, mark_shard_done
from hilda.store.written import (
    RECORD,
    ROWS_RECORD,
    Record,
    describe_rows,
    put_record,
    record_array,
)

__all__ = ["FrameError", "StageOptions", "run_frame_shards", "write_ragged"]


# Storage faults a stage reports in one line, naming the path (not a traceback).
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


class StoreIOError(HildaError):
    """The store cannot be written (disk full, read-only, permissions)."""


@dataclass(frozen=True)
class StageOptions:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    overwrite: bool = False
    skip_bad: bool = False

    @classmethod
    def of(
        cls,
        workers: int,
        scheduler: str | None,
        overwrite: bool,
        skip_bad: bool,
        *,
        gpu: bool = False,
        no_worker_timeout: float = 300.0,
    ) -> StageOptions:
        """From the stage commands' options."""
        cluster = ClusterConfig(workers, scheduler, gpu, no_worker_timeout=no_worker_timeout)
        return cls(cluster, overwrite, skip_bad)


def stage_client(store: str, cluster: ClusterConfig) -> contextlib.AbstractContextManager[Workers]:
    """The stage's Dask client; memory:// stores live in one process, so their stages run
    on in-process (thread) workers."""
    if store.startswith("memory://") and cluster.scheduler is None:
        cluster = replace(cluster, processes=False)
    return dask_client(cluster)


def locked_stage(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a stage function ``fn(cfg, options)`` holding the writer lock of ``cfg.store``
    (``hilda.store.lock``): a second writer of the store fails at once, naming this one."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(cfg: Any, options: StageOptions) -> Any:
            if options.cluster.scheduler:  # connect first, then change the store
                check_scheduler(options.cluster.scheduler)
            try:
                with writer_lock(cfg.store, f"hilda-prep {name}"):
                    return fn(cfg, options)
            except OSError as exc:
                if exc.errno not in STORAGE_ERRNOS:
                    raise
                where = exc.filename or f"a file under {cfg.store}"
                raise StoreIOError(
                    f"hilda-prep {name}: {exc.strerror} writing {where}; the shards finished "
                    "so far are kept: fix it (free space, permissions) and rerun to resume"
                ) from None

        return run

    return wrap


def run_frame_shards(
    client: Any,
    group: zarr.Group,
    fn: Callable[..., Any],
    args: Callable[[int, int], tuple],
    *,
    num_frames: int,
    frames_per_shard: int,
    label: str,
    store: str,
    resources: dict[str, float] | None = None,
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Run ``fn(*args(start, stop))`` per frame shard not yet done and mark each shard done
    as it finishes, with the record of the files it wrote (``hilda.store.written``). A task
    returns a dict whose ``skipped`` maps frame index -> reason for frames it skipped (with
    --skip-bad); they are merged into the group's ``skipped`` attribute. Returns (all
    skipped frames, the results of the tasks run now)."""
    done = done_map(group)
    shards = frame_shards(num_frames, frames_per_shard)
    tasks = [
        Task(i, b - a, (fn, store, group.path, a, b, args(a, b)))
        for i, (a, b) in enumerate(shards)
        if not done[i]
    ]
    skipped = dict(group.attrs.get("skipped", {}))
    record_array(group, RECORD, len(shards))

    def mark(task: Task, result: dict[str, Any]) -> None:
        # Per-shard results live in the store with the shard's done flag, so a resumed run
        # aggregates exactly what an uninterrupted one does.
        skipped.update({str(k): v for k, v in (result.get("skipped") or {}).items()})
        mark_shard_done(
            group, task.key, result.get("skipped"), result.get("stats"), result["written"]
        )

    results = (
        run_tasks(client, _recorded_shard, tasks, label=label, on_done=mark, resources=resources)
        if tasks
        else []
    )
    return skipped, results


def _recorded_shard(
    fn: Callable[..., dict[str, Any]], store: str, path: str, f0: int, f1: int, args: tuple
) -> dict[str, Any]:
    """Dask task: ``fn(*args)``, then the record of the files it wrote for frames [f0, f1),
    made on the worker while they are in its page cache."""
    result = dict(fn(*args) or {})
    result["written"] = describe_rows(store, path, f0, f1)
    return result


def write_ragged(
    client: Any,
    group: zarr.Group,
    *,
    store: str,
    columns: tuple[str, ...],
    compute_fn: Callable[..., list[Rows]],
    compute_args: Callable[[int, int], tuple],
    num_frames: int,
    frames_per_shard: int,
    skip_bad: bool,
    label: str,
    shard_rows: int = RAGGED_ROWS_PER_SHARD,
) -> np.ndarray:
    """Compute and stage every frame shard's rows (``compute_fn(*compute_args(f0, f1))``:
    per frame its ``columns``, or an error), fix ``offsets``, then copy row shards. Returns
    the offsets (F+1,)."""
    staging = staging_path(group)
    if not group.attrs.get("counted", False):
        shards = frame_shards(num_frames, frames_per_shard)
        staged = staged_shards(store, staging, len(shards))
        tasks = [
            Task(i, b - a, (store, f"{staging}/{i}", columns, compute_fn, compute_args(a, b)))
            for i, (a, b) in enumerate(shards)
            if not staged[i]
        ]
        if tasks:
            run_tasks(client, stage_rows, tasks, label=f"{label} (compute)", on_done=_ignore)
        fix_offsets(group, *staged_counts(store, staging, shards), skip_bad, shard_rows)
    offsets = np.asarray(group["offsets"][:])
    # One copy task a shard file of the arrays as laid out (resize_rows), so no two tasks
    # write one file and a row shard's record is its own files'.
    rows = row_shards(int(offsets[-1]), row_shard_size(group, columns))
    done = rows_done_map(group, len(rows))
    record_array(group, ROWS_RECORD, len(rows))
    copy = (store, group.path, staging, columns, frames_per_shard)
    counted = frames_counted(offsets, rows)
    tasks = [
        Task(i, counted[i], (*copy, a, b, offsets)) for i, (a, b) in enumerate(rows) if not done[i]
    ]
    if tasks:

        def mark(task: Task, written: Record) -> None:
            put_record(group, ROWS_RECORD, task.key, written)
            group["rows_done"][task.key] = True

        run_tasks(client, copy_rows, tasks, label=f"{label} (write)", on_done=mark)
    group["done"][:] = True
    remove_staging(store, staging)
    return offsets


def _ignore(task: Task, result: Any) -> None:
    """Staged shards mark themselves complete in the store."""
