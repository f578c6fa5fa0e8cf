"""The Zarr training-cache layout (docs/design.md, "The store") written down as code.

Every group, array, dtype, symbolic shape and chunk rule of the cache lives here, so the
pipeline creates arrays from these specs and ``validate_store`` checks a store against the
same specs. Layout summary (F keyframes, V cameras, P points, Q point-pixel pairs,
K stored teacher blocks, (h, w) patch grid, D teacher dim, (H, W) BEV grid):

    index/      token (F) str, scene (F) str, timestamp (F) i64, prev/next (F) i32 (-1 = none),
                lidar_path (F) str, labels_path (F) str ("" = none), lidar_to_ego (F,4,4) f64,
                ego_to_global (F,4,4) f64, cam_intrinsics (F,V,3,3) f64, cam_to_ego (F,V,4,4) f64,
                cam_ego_to_global (F,V,4,4) f64, cam_timestamp (F,V) i64, image_size (F,V,2) i32
                (width, height), image_path (F,V) str; the file paths are relative to the
                index's ``dataset_root`` attribute (``dataset_file``)
    points/     data (P,4) f32 (x, y, z, intensity in the LiDAR frame), offsets (F+1) i64
    pointmaps/  point (Q) i32, cam (Q) u8, uv (Q,2) f32, depth (Q) f16, offsets (F+1) i64
    teacher/<name>/  layer_<k> (F,V,h,w,D), cls (F,V,K,D)
    occupancy/  bev (F,H,W/8) u8 bit-packed, valid (F) bool

Per-frame arrays are chunked one frame per chunk and sharded ``frames_per_shard`` frames per
shard file; ragged arrays (CSR ``data`` + ``offsets``) are chunked by rows. Each stage group
has a ``done (S)`` completion map, one element (and one chunk file) per shard, so workers
that finish different shards never write the same file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hilda.store.teacher_record import REQUIRED_ATTRS

SCHEMA = "hilda-cache"
SCHEMA_VERSION = 1
DEFAULT_FRAMES_PER_SHARD = 32
RAGGED_ROW_CHUNK = 1 << 16  # rows per chunk of a ragged array
RAGGED_ROWS_PER_SHARD = 1 << 20  # 16 chunks

ROOT_ATTRS = ("schema", "schema_version", "dataset", "version", "split", "created_with")

# A dimension is an int (fixed), or a symbol resolved against the store:
# "F" frames, "F+1", "V" cameras, "S" shards, or a free symbol ("P", "Q", "h", ...) that must
# only be consistent between the arrays of one group.
Dim = int | str


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtype: str  # numpy dtype string, or "str" for variable-length UTF-8
    shape: tuple[Dim, ...]
    ragged: bool = False  # chunked by rows (CSR data), not one frame per chunk
    # A few bytes a frame, read whole (the loader's start-up): one chunk a frame shard, not
    # one a frame (34k frames: 1k chunks to decode instead of 34k; still one file a shard).
    small: bool = False

    def resolve_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape of this array given values for its symbolic dims."""
        return tuple(resolve_dim(d, dims) for d in self.shape)


# Frames a chunk of a driver-written group's per-frame arrays (the index): zarr's cost is
# per chunk (~1 ms to encode or decode one), and a stage task reads a few index rows, so
# about a thousand rows (~1 MB of camera matrices) a chunk.
DRIVER_CHUNK_ROWS = 1024

# Per-shard statistics a stage records with each shard's done flag (hilda.store.writer):
# (S, C) float64, one row a shard, its column names and widths in the array's attributes.
SHARD_STATS = "shard_stats"

# Attribute of a group being created (hilda.store.writer.create_group); present only in
# a group whose creation was cut short.
BUILDING = "_building"


def is_half_made(group: Any) -> bool:
    """Whether a stage group's creation was cut short (it still carries ``BUILDING``)."""
    return bool(group.attrs.get(BUILDING, False))


def stage_command(group: str) -> str:
    """The ``hilda-prep`` command that builds a group (``teacher/<name>`` included)."""
    commands = {"index": "index", "points": "index", "pointmaps": "build-pointmaps"}
    commands |= {"occupancy": "build-occupancy", "teacher": "extract-teacher"}
    return f"hilda-prep {commands.get(group.split('/')[0], group)}"


@dataclass(frozen=True)
class GroupSpec:
    name: str
    arrays: tuple[ArraySpec, ...]
    required_attrs: tuple[str, ...] = ()
    has_completion_map: bool = True
    # Written whole by the driver (the index), not shard by shard by workers: its per-frame
    # arrays are chunked DRIVER_CHUNK_ROWS frames a chunk, so writing or reading F rows
    # encodes F / 1024 chunks, not F (34k frames: 34 chunks an array instead of 34k).
    driver_written: bool = False

    def array(self, name: str) -> ArraySpec:
        for spec in self.arrays:
            if spec.name == name:
                return spec
        raise KeyError(f"group {self.name!r} has no array {name!r}")


def resolve_dim(dim: Dim, dims: Mapping[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    if dim == "F+1":
        return dims["F"] + 1
    if dim not in dims:
        raise KeyError(f"dimension {dim!r} is not known; pass it in dims")
    return dims[dim]


INDEX = GroupSpec(
    name="index",
    arrays=(
        ArraySpec("token", "str", ("F",)),
        ArraySpec("scene", "str", ("F",)),
        ArraySpec("timestamp", "int64", ("F",)),
        ArraySpec("prev", "int32", ("F",)),
        ArraySpec("next", "int32", ("F",)),
        ArraySpec("lidar_path", "str", ("F",)),
        ArraySpec("labels_path", "str", ("F",)),
        ArraySpec("lidar_to_ego", "float64", ("F", 4, 4)),
        ArraySpec("ego_to_global", "float64", ("F", 4, 4)),
        ArraySpec("cam_intrinsics", "float64", ("F", "V", 3, 3)),
        ArraySpec("cam_to_ego", "float64", ("F", "V", 4, 4)),
        ArraySpec("cam_ego_to_global", "float64", ("F", "V", 4, 4)),
        ArraySpec("cam_timestamp", "int64", ("F", "V")),
        ArraySpec("image_size", "int32", ("F", "V", 2)),
        ArraySpec("image_path", "str", ("F", "V")),
    ),
    required_attrs=("cameras", "num_frames", "frames_per_shard", "dataset_root"),
    driver_written=True,
)

POINTS = GroupSpec(
    name="points",
    arrays=(
        ArraySpec("data", "float32", ("P", 4), ragged=True),
        ArraySpec("offsets", "int64", ("F+1",)),
    ),
    required_attrs=("columns", "frame"),
)

POINTS_COLUMNS = ("data",)  # the ragged arrays a stage writes
POINTS_ATTRS = {"columns": ["x", "y", "z", "intensity"], "frame": "lidar"}
POINTMAPS_COLUMNS = ("point", "cam", "uv", "depth")

POINTMAPS = GroupSpec(
    name="pointmaps",
    arrays=(
        ArraySpec("point", "int32", ("Q",), ragged=True),
        ArraySpec("cam", "uint8", ("Q",), ragged=True),
        ArraySpec("uv", "float32", ("Q", 2), ragged=True),
        ArraySpec("depth", "float16", ("Q",), ragged=True),
        ArraySpec("offsets", "int64", ("F+1",)),
    ),
    required_attrs=("occlusion", "min_depth", "border_px"),
)

TEACHER_ATTRS = REQUIRED_ATTRS  # defined with the record they belong to


TEACHERS = "teacher"  # the group holding one subgroup per extracted teacher


def teacher_path(name: str) -> str:
    """The store path of teacher group ``name``."""
    return f"{TEACHERS}/{name}"


def layer_array(block: int, part: str = "") -> str:
    """Name of a teacher block's grid (``part`` "": the values; "_scale", "_token_scale": an
    int8 grid's channel and token scales)."""
    return f"layer_{block}{part}"


INT8_SCALES = ("_scale", "_token_scale")


def teacher_group(name: str, blocks: Iterable[int], dtype: str = "float16") -> GroupSpec:
    """Spec of ``teacher/<name>`` for the given stored block indices and storage dtype
    (float16, float32 for bit-rounded features, or int8 with per-channel ``_scale`` arrays)."""
    blocks = tuple(blocks)
    arrays = tuple(ArraySpec(layer_array(k), dtype, ("F", "V", "h", "w", "D")) for k in blocks)
    if dtype == "int8":
        for k in blocks:
            arrays += (
                ArraySpec(layer_array(k, "_scale"), "float32", ("F", "V", "D")),
                ArraySpec(layer_array(k, "_token_scale"), "float32", ("F", "V", "h", "w")),
            )
    arrays += (ArraySpec("cls", "float32", ("F", "V", len(blocks), "D")),)
    return GroupSpec(name=teacher_path(name), arrays=arrays, required_attrs=TEACHER_ATTRS)


OCCUPANCY = GroupSpec(
    name="occupancy",
    arrays=(
        ArraySpec("bev", "uint8", ("F", "H", "W8")),
        ArraySpec("valid", "bool", ("F",), small=True),
    ),
    required_attrs=("grid", "cell", "range", "ground_rule", "horizon"),
)

STAGE_GROUPS: tuple[GroupSpec, ...] = (INDEX, POINTS, POINTMAPS, OCCUPANCY)


# The index arrays that name dataset files (relative to its ``dataset_root``).
PATH_ARRAYS = ("lidar_path", "labels_path", "image_path")


def relative_to_root(dataset_root: str, path: str) -> str:
    """A dataset file's path as the index stores it: relative to the dataset root it records,
    so a store stays readable when the dataset moves with its root ("" stays "")."""
    if not path:
        return ""
    prefix = dataset_root.rstrip(os.sep) + os.sep
    if path.startswith(prefix) and os.path.normpath(path) == path:  # the usual case, cheap
        return path[len(prefix) :]
    return os.path.relpath(path, dataset_root)


def dataset_file(dataset_root: str, stored: str) -> str:
    """The path of a file named in the index (``stored``: relative to ``dataset_root``; an
    absolute path, as early stores wrote, is kept as it is). "" stays "" (no such file)."""
    return os.path.join(dataset_root, stored) if stored else ""


def normalize_store(url: str) -> str:
    """``file://`` URLs become plain paths (zarr's LocalStore creates folders; fsspec's local
    filesystem does not); other URLs (s3://, gs://, memory://, ...) pass through to fsspec."""
    return url.removeprefix("file://") if url.startswith("file://") else url


def num_shards(num_frames: int, frames_per_shard: int) -> int:
    return max(1, math.ceil(num_frames / frames_per_shard))


def array_layout(
    spec: ArraySpec, dims: Mapping[str, int], frames_per_shard: int, driver_written: bool = False
) -> dict[str, Any]:
    """Keyword arguments for ``zarr.Group.create_array`` that realise ``spec``.

    Per-frame arrays: one frame per chunk, ``frames_per_shard`` frames per shard (the last
    shard may be partial), so workers write disjoint shard files; in a ``driver_written``
    group, ``DRIVER_CHUNK_ROWS`` frames (at least a shard's) per chunk and no shards; a
    ``small`` array, one frame shard per chunk. Ragged arrays:
    ``RAGGED_ROW_CHUNK`` rows per chunk.
    """
    shape = spec.resolve_shape(dims)
    if spec.shape and spec.shape[0] == "F" and driver_written:
        rows = max(frames_per_shard, DRIVER_CHUNK_ROWS)
        chunks = (max(1, min(rows, shape[0])), *shape[1:])
        shards = None
    elif spec.shape and spec.shape[0] == "F" and spec.small:
        chunks = (max(1, min(frames_per_shard, shape[0])), *shape[1:])
        shards = None
    elif spec.ragged:
        rows = max(1, min(RAGGED_ROW_CHUNK, shape[0]))
        chunks = (rows, *shape[1:])
        shards = (max(rows, min(RAGGED_ROWS_PER_SHARD, math.ceil(shape[0] / rows) * rows)),)
        shards = (shards[0], *shape[1:])
    elif spec.shape and spec.shape[0] == "F":
        chunks = (1, *shape[1:])
        shards = (frames_per_shard, *shape[1:])
    else:  # small whole arrays (offsets, completion maps)
        chunks = (max(1, shape[0]), *shape[1:]) if shape else ()
        shards = None
    dtype: Any = str if spec.dtype == "str" else spec.dtype
    return {"name": spec.name, "shape": shape, "dtype": dtype, "chunks": chunks, "shards": shards}
