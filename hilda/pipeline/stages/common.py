"""What every stage shares: opening the store, shard tasks, completion maps, provenance, and
the writer of ragged (CSR) groups.

Ragged groups (points, pointmaps) are written so that no two workers ever write the same
shard file and no frame is computed or read twice: a *compute* phase (one task per frame
shard) computes the shard's rows and keeps them in a staging group of its own
(``_staging/<group>/<shard>``, with each frame's row count); the driver then fixes
``offsets`` from the counts; a *copy* phase (one task per row shard of the output) copies the
staged rows that fall in its shard and writes exactly that shard. The staging group is removed
once every row shard is written. Reruns skip staged frame shards and finished row shards.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zarr

import hilda
from hilda.data_schemas.store import RAGGED_ROWS_PER_SHARD, GroupSpec, is_half_made
from hilda.data_schemas.validate import validate_store
from hilda.errors import HildaError
from hilda.lock import writer_lock
from hilda.pipeline.runner import ClusterConfig, Task, Workers, dask_client, run_tasks
from hilda.pipeline.store_io import create_group


class FrameError(HildaError):
    """A frame could not be processed; the message names the frame and the file."""


@dataclass(frozen=True)
class StageOptions:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    overwrite: bool = False
    skip_bad: bool = False


def stage_client(store: str, cluster: ClusterConfig) -> contextlib.AbstractContextManager[Workers]:
    """The stage's Dask client; memory:// stores live in one process, so their stages run
    on in-process (thread) workers."""
    if store.startswith("memory://") and cluster.scheduler is None:
        cluster = replace(cluster, processes=False)
    return dask_client(cluster)


def locked_stage(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a stage function ``fn(cfg, options)`` holding the writer lock of ``cfg.store``
    (``hilda.lock``): a second writer of the store fails at once, naming this one."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(cfg: Any, options: StageOptions) -> Any:
            with writer_lock(cfg.store, f"hilda-prep {name}"):
                return fn(cfg, options)

        return run

    return wrap


def frame_shards(num_frames: int, frames_per_shard: int) -> list[tuple[int, int]]:
    return [
        (s, min(s + frames_per_shard, num_frames)) for s in range(0, num_frames, frames_per_shard)
    ]


def row_shards(total_rows: int, shard_rows: int = RAGGED_ROWS_PER_SHARD) -> list[tuple[int, int]]:
    return [(s, min(s + shard_rows, total_rows)) for s in range(0, total_rows, shard_rows)]


def record_stage(root: zarr.Group, stage: str, config: dict[str, Any]) -> None:
    """Provenance entry in the root attrs: config, time, code version."""
    entry = {
        "config": config,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": f"hilda {hilda.__version__}",
    }
    stages = dict(root.attrs.get("stages", {}))
    stages[stage] = entry
    root.attrs["stages"] = stages


def done_map(group: zarr.Group, name: str = "done") -> np.ndarray:
    return np.asarray(group[name][:], dtype=bool)


def prepare_group(
    root: zarr.Group,
    spec: GroupSpec,
    dims: dict[str, int],
    frames_per_shard: int,
    attrs: dict[str, Any],
    overwrite: bool,
    compressors: dict[str, Any] | None = None,
) -> zarr.Group:
    """Create the stage group, or reuse it to resume when its attrs match this run's. A
    half-made group (its creation cut short) is rebuilt."""
    if spec.name in root and is_half_made(root[spec.name]):
        overwrite = True
    if spec.name in root and not overwrite:
        group = root[spec.name]
        old = {k: group.attrs.get(k) for k in attrs if k not in ("skipped",)}
        new = {k: v for k, v in attrs.items() if k not in ("skipped",)}
        new = _jsonable(new)
        differ = sorted(k for k in new if old.get(k) != new[k])
        if differ:
            raise HildaError(
                f"{spec.name}/ in the store was built with other settings ({', '.join(differ)}); "
                "rerun with --overwrite to rebuild it"
            )
        return group
    if spec.name in root:
        del root[spec.name]
    return create_group(root, spec, dims, frames_per_shard, attrs, compressors)


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON attrs (tuples become lists)."""
    import json

    return json.loads(json.dumps(value))


def run_frame_shards(
    client: Any,
    group: zarr.Group,
    fn: Callable[..., Any],
    args: Callable[[int, int], tuple],
    *,
    num_frames: int,
    frames_per_shard: int,
    label: str,
    resources: dict[str, float] | None = None,
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Run ``fn(*args(start, stop))`` per frame shard not yet done and mark each shard done
    as it finishes. A task returns a dict whose ``skipped`` maps frame index -> reason for
    frames it skipped (with --skip-bad); they are merged into the group's ``skipped``
    attribute. Returns (all skipped frames, the results of the tasks run now)."""
    done = done_map(group)
    shards = frame_shards(num_frames, frames_per_shard)
    tasks = [Task(i, b - a, args(a, b)) for i, (a, b) in enumerate(shards) if not done[i]]
    skipped = dict(group.attrs.get("skipped", {}))

    shard_stats = dict(group.attrs.get("shard_stats", {}))

    def mark(task: Task, result: dict[str, Any]) -> None:
        # Per-shard results live in the store with the shard's done flag, so a resumed run
        # aggregates exactly what an uninterrupted one does.
        # Sorted, so the attrs do not depend on the order in which workers finish.
        if result.get("skipped"):
            skipped.update({str(k): v for k, v in result["skipped"].items()})
            group.attrs["skipped"] = _by_index(skipped)
        if result.get("stats"):
            shard_stats[str(task.key)] = result["stats"]
            group.attrs["shard_stats"] = _by_index(shard_stats)
        group["done"][task.key] = True

    results = (
        run_tasks(client, fn, tasks, label=label, on_done=mark, resources=resources)
        if tasks
        else []
    )
    return skipped, results


STAGING = "_staging"
Rows = tuple[np.ndarray, ...] | str  # a frame's columns, or why it could not be computed


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
    staging = f"{STAGING}/{group.path}"
    if not group.attrs.get("counted", False):
        shards = frame_shards(num_frames, frames_per_shard)
        staged = _staged_shards(store, staging, len(shards))
        tasks = [
            Task(i, b - a, (store, f"{staging}/{i}", columns, compute_fn, compute_args(a, b)))
            for i, (a, b) in enumerate(shards)
            if not staged[i]
        ]
        if tasks:
            run_tasks(client, stage_rows, tasks, label=f"{label} (compute)", on_done=_ignore)
        _fix_offsets(group, *_staged_counts(store, staging, shards), skip_bad, shard_rows)
    offsets = np.asarray(group["offsets"][:])
    rows = row_shards(int(offsets[-1]), shard_rows)
    if "rows_done" not in group or group["rows_done"].shape[0] != len(rows):
        arr = group.create_array(
            "rows_done",
            shape=(max(1, len(rows)),),
            dtype="bool",
            chunks=(1,),
            fill_value=False,
            overwrite=True,
        )
        arr[:] = False
    done = done_map(group, "rows_done")
    copy = (store, group.path, staging, columns, frames_per_shard)
    counted = frames_counted(offsets, rows)
    tasks = [
        Task(i, counted[i], (*copy, a, b, offsets)) for i, (a, b) in enumerate(rows) if not done[i]
    ]
    if tasks:

        def mark(task: Task, _: Any) -> None:
            group["rows_done"][task.key] = True

        run_tasks(client, copy_rows, tasks, label=f"{label} (write)", on_done=mark)
    group["done"][:] = True
    _remove_staging(store, staging)
    return offsets


def _fix_offsets(
    group: zarr.Group, counts: np.ndarray, errors: dict[int, str], skip_bad: bool, shard_rows: int
) -> None:
    """``offsets`` from the staged row counts (bad frames hold none), the arrays sized to the
    total, the bad frames recorded; or the first bad frame's error without ``skip_bad``."""
    if errors and not skip_bad:
        first = next(iter(errors.values()))
        more = f" (and {len(errors) - 1} more bad frames)" if len(errors) > 1 else ""
        raise FrameError(
            f"{first}{more}; rerun with --skip-bad to record them as skipped and go on"
        )
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    _resize_rows(group, int(offsets[-1]), shard_rows)
    group["offsets"][:] = offsets
    group.attrs["skipped"] = {str(i): err for i, err in sorted(errors.items())}
    group.attrs["counted"] = True


def _ignore(task: Task, result: Any) -> None:
    """Staged shards mark themselves complete in the store."""


def stage_rows(
    store: str, path: str, columns: tuple[str, ...], fn: Callable[..., list[Rows]], args: tuple
) -> None:
    """Dask task: compute one frame shard's rows and write them, with each frame's row count
    (-1: the frame's error, kept in the attrs), to the staging group ``path``."""
    results = fn(*args)
    g = zarr.open_group(store, path=path, mode="w")
    for j, name in enumerate(columns):
        parts = [r[j] for r in results if not isinstance(r, str)]
        if parts:
            data = np.concatenate(parts)
            g.create_array(name, data=data, chunks=(max(1, len(data)), *data.shape[1:]))
    counts = np.array([-1 if isinstance(r, str) else len(r[0]) for r in results], np.int64)
    g.create_array("counts", data=counts, chunks=(max(1, len(counts)),))
    errors = {str(i): r for i, r in enumerate(results) if isinstance(r, str)}
    g.attrs.update({"errors": errors, "complete": True})  # last: the shard is staged


def _staged_shards(store: str, staging: str, n: int) -> list[bool]:
    try:
        root = zarr.open_group(store, path=staging, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return [False] * n
    names = set(root.group_keys())
    return [str(i) in names and bool(root[str(i)].attrs.get("complete")) for i in range(n)]


def _staged_counts(
    store: str, staging: str, shards: list[tuple[int, int]]
) -> tuple[np.ndarray, dict[int, str]]:
    """Rows per frame (0 for a bad frame) and the bad frames' errors."""
    counts, errors = [], {}
    for i, (a, _) in enumerate(shards):
        g = zarr.open_group(store, path=f"{staging}/{i}", mode="r")
        shard_counts = np.asarray(g["counts"][:])
        errors |= {a + int(k): v for k, v in dict(g.attrs["errors"]).items()}
        counts.append(np.maximum(shard_counts, 0))
    return (np.concatenate(counts) if counts else np.zeros(0, np.int64)), errors


def copy_rows(
    store: str,
    path: str,
    staging: str,
    columns: tuple[str, ...],
    frames_per_shard: int,
    start: int,
    stop: int,
    offsets: np.ndarray,
) -> None:
    """Dask task: write rows [start, stop) of every column (exactly one row shard) from the
    staged rows of the frames they belong to."""
    staged: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}  # shard -> (starts, columns)

    def rows_of(f: int) -> list[np.ndarray]:
        i, local = divmod(f, frames_per_shard)
        if i not in staged:
            g = zarr.open_group(store, path=f"{staging}/{i}", mode="r")
            starts = np.concatenate([[0], np.cumsum(np.maximum(g["counts"][:], 0))])
            staged[i] = (starts, [np.asarray(g[name][:]) for name in columns])
        starts, cols = staged[i]
        return [c[starts[local] : starts[local + 1]] for c in cols]

    values = gather_rows(offsets, start, stop, rows_of)
    group = zarr.open_group(store, path=path, mode="r+")
    for name, column in zip(columns, values, strict=True):
        group[name][start:stop] = column


def _remove_staging(store: str, staging: str) -> None:
    root = zarr.open_group(store, mode="r+")
    if staging in root:
        del root[staging]
    if STAGING in root and not list(root[STAGING].members()):
        del root[STAGING]


def _resize_rows(group: zarr.Group, rows: int, shard_rows: int) -> None:
    """Re-create the ragged arrays with their final row count (zarr arrays have fixed shards)."""
    from hilda.data_schemas.store import RAGGED_ROW_CHUNK

    for name in list(group.array_keys()):
        arr = group[name]
        if name in ("offsets", "done", "rows_done") or arr.ndim == 0:
            continue
        chunk = max(1, min(RAGGED_ROW_CHUNK, rows))
        shard = max(chunk, min(shard_rows, -(-rows // chunk) * chunk))
        shard = -(-shard // chunk) * chunk
        tail = tuple(arr.shape[1:])
        dtype = arr.dtype
        del group[name]
        group.create_array(
            name,
            shape=(rows, *tail),
            dtype=dtype,
            chunks=(chunk, *tail),
            shards=(shard, *tail),
            fill_value=0,
            overwrite=True,
            compressors=(ragged_compressor(dtype),),
        )


def ragged_compressor(dtype: np.dtype):
    """LZ4 after a byte shuffle: on sweeps it keeps 0.78 of the bytes (zstd: 0.74) and decodes
    about twice as fast, which is what a training sample's two sweeps and two frames of pairs
    cost (docs/benchmarks.md)."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=np.dtype(dtype).itemsize)


def _by_index(entries: dict[str, Any]) -> dict[str, Any]:
    return dict(sorted(entries.items(), key=lambda kv: int(kv[0])))


def frames_counted(offsets: np.ndarray, rows: list[tuple[int, int]]) -> list[int]:
    """Frames each row shard counts for the progress bar: those whose first row lies in it
    (empty frames at the end count with the last shard), so a frame that spans two shards
    counts once and the shards' counts add up to the number of frames."""
    starts = np.asarray(offsets[:-1])  # (F,)
    if not rows:
        return []
    bounds = [a for a, _ in rows] + [np.iinfo(np.int64).max]
    edges = np.searchsorted(starts, bounds, side="left")
    edges[0] = 0
    return [int(n) for n in np.diff(edges)]


def frame_rows(offsets: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """Frames [f0, f1) whose rows overlap rows [start, stop)."""
    f0 = int(np.searchsorted(offsets, start, "right") - 1)
    f1 = int(np.searchsorted(offsets, stop, "left"))
    return max(f0, 0), f1


def gather_rows(
    offsets: np.ndarray, start: int, stop: int, compute: Callable[[int], Sequence[np.ndarray]]
) -> list[np.ndarray]:
    """Rows [start, stop) of the concatenation of ``compute(frame)`` over the overlapping frames."""
    f0, f1 = frame_rows(offsets, start, stop)
    parts: list[list[np.ndarray]] = []
    for f in range(f0, f1):
        if offsets[f + 1] == offsets[f]:
            continue
        arrays = compute(f)
        lo = max(start, offsets[f]) - offsets[f]
        hi = min(stop, offsets[f + 1]) - offsets[f]
        parts.append([a[lo:hi] for a in arrays])
    return [np.concatenate(cols) for cols in zip(*parts, strict=True)]


class PointsBlock:
    """The points of frames [f0, f1), read from the store in one contiguous slice (a task's
    frames are contiguous, so this is one read instead of one per frame)."""

    def __init__(self, root: zarr.Group, f0: int, f1: int) -> None:
        self.f0 = f0
        self.offsets = np.asarray(root["points/offsets"][f0 : f1 + 1])
        self.data = np.asarray(root["points/data"][self.offsets[0] : self.offsets[-1]])

    def frame(self, f: int) -> np.ndarray:
        """(N, 4) float32 points of frame f."""
        i = f - self.f0
        return self.data[self.offsets[i] - self.offsets[0] : self.offsets[i + 1] - self.offsets[0]]


def open_for_stage(
    store: str, require: tuple[str, ...], builds: str, dataset: str | None = None
) -> zarr.Group:
    """Validate then open the store writable, for a stage that builds group ``builds`` (not
    validated: the stage resumes, rebuilds or replaces it, ``prepare_group``)."""
    validate_store(store, require=require, dataset=dataset, rebuild=builds)
    return zarr.open_group(store, mode="r+")
