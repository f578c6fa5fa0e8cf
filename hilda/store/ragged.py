"""Ragged (CSR) groups of the store: ``data`` rows plus ``offsets`` (F+1), written so that no
two workers ever write the same shard file and no frame is computed or read twice.

A *compute* phase (one task per frame shard) keeps each shard's rows in a staging group of
its own (``_staging/<group>/<shard>``, with each frame's row count); the driver then fixes
``offsets`` from the counts (``fix_offsets``); a *copy* phase (one task per row shard of the
output, ``copy_rows``) copies the staged rows that fall in its shard and writes exactly that
shard. The staging group is removed once every row shard is written. Reruns skip staged
frame shards and finished row shards. The orchestration (which tasks run where) is the
pipeline's (``hilda.pipeline.stages.common.write_ragged``); this module is the store side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import zarr

from hilda.errors import FrameError
from hilda.store.schema import RAGGED_ROW_CHUNK, RAGGED_ROWS_PER_SHARD
from hilda.store.written import RECORD, Record, describe_rows, describe_whole

STAGING = "_staging"
Rows = tuple[np.ndarray, ...] | str  # a frame's columns, or why it could not be computed


def frame_shards(num_frames: int, frames_per_shard: int) -> list[tuple[int, int]]:
    return [
        (s, min(s + frames_per_shard, num_frames)) for s in range(0, num_frames, frames_per_shard)
    ]


def row_shards(total_rows: int, shard_rows: int = RAGGED_ROWS_PER_SHARD) -> list[tuple[int, int]]:
    return [(s, min(s + shard_rows, total_rows)) for s in range(0, total_rows, shard_rows)]


def fix_offsets(
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
    resize_rows(group, int(offsets[-1]), shard_rows)
    group["offsets"][:] = offsets
    group.attrs.update(
        {
            "skipped": {str(i): err for i, err in sorted(errors.items())},
            RECORD: describe_whole(group, ["offsets"]),
            "counted": True,  # last in the same write: the offsets and their record are in
        }
    )


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


def staged_shards(store: str, staging: str, n: int) -> list[bool]:
    try:
        root = zarr.open_group(store, path=staging, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return [False] * n
    names = set(root.group_keys())
    return [str(i) in names and _staged_clean(root[str(i)]) for i in range(n)]


def _staged_clean(shard: zarr.Group) -> bool:
    """A staged shard counts as done only when complete and free of frame errors: a failed
    frame is never recorded as done, so a rerun reads it again (its file may have been fixed),
    and ``--skip-bad`` records only what is bad now."""
    return bool(shard.attrs.get("complete")) and not shard.attrs.get("errors")


def staged_counts(
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
) -> Record:
    """Dask task: write rows [start, stop) of every column (exactly one row shard) from the
    staged rows of the frames they belong to; returns the record of the files written."""
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
    return describe_rows(store, path, start, stop, columns)


def row_shard_size(group: zarr.Group, columns: Sequence[str]) -> int:
    """Rows a shard file of the ragged ``columns`` holds (one for all, as ``resize_rows``
    lays them out)."""
    sizes = {int(group[name].metadata.chunk_grid.chunk_shape[0]) for name in columns}
    if len(sizes) != 1:
        raise ValueError(f"{group.path}: ragged columns with different row shards {sizes}")
    return sizes.pop()


def remove_staging(store: str, staging: str) -> None:
    root = zarr.open_group(store, mode="r+")
    if staging in root:
        del root[staging]
    if STAGING in root and not list(root[STAGING].members()):
        del root[STAGING]


def resize_rows(group: zarr.Group, rows: int, shard_rows: int) -> None:
    """Re-create the ragged arrays with their final row count (zarr arrays have fixed shards)."""
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


def rows_done_map(group: zarr.Group, shards: int) -> np.ndarray:
    """The copy phase's completion map (one flag per row shard), created when missing or
    sized for another row count."""
    if "rows_done" not in group or group["rows_done"].shape[0] != shards:
        arr = group.create_array(
            "rows_done",
            shape=(max(1, shards),),
            dtype="bool",
            chunks=(1,),
            fill_value=False,
            overwrite=True,
        )
        arr[:] = False
    return np.asarray(group["rows_done"][:], dtype=bool)


def staging_path(group: zarr.Group) -> str:
    return f"{STAGING}/{group.path}"


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
