"""Writing a cache: stores, stage groups from the layout specs (created atomically for
readers), completion maps, provenance. The Zarr I/O edge of the write side.

A store is a local folder or any fsspec URL zarr accepts (``memory://``, ``s3://``, ...).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

import hilda
from hilda.data_schemas.records import Frame
from hilda.errors import HildaError
from hilda.store.schema import (
    BUILDING,
    INT8_SCALES,
    SCHEMA,
    SCHEMA_VERSION,
    SHARD_STATS,
    GroupSpec,
    array_layout,
    is_half_made,
    layer_array,
    num_shards,
    relative_to_root,
)
from hilda.store.validate import validate_store
from hilda.store.written import (
    RECORD,
    Record,
    data_arrays,
    describe_whole,
    put_record,
    put_whole_record,
)


def open_writable(store: str) -> zarr.Group:
    """An existing store's root, writable (FileNotFoundError / GroupNotFoundError if none)."""
    return zarr.open_group(store, mode="r+")


def init_store(
    url: str, *, dataset: str, version: str, split: str, overwrite: bool = False
) -> zarr.Group:
    """Create the root group with the schema attrs (``mode='w'`` only with ``overwrite``)."""
    attrs = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "dataset": dataset,
        "version": version,
        "split": split,
        "created_with": f"hilda {hilda.__version__}",
    }
    # One write of zarr.json with every attribute: a kill cannot leave a root without its
    # schema (attrs.update rewrites the file once per key).
    return zarr.create_group(store=url, overwrite=overwrite, attributes=attrs)


def create_group(
    root: zarr.Group,
    spec: GroupSpec,
    dims: Mapping[str, int],
    frames_per_shard: int,
    attrs: Mapping[str, Any],
    compressors: Mapping[str, Any] | None = None,
) -> zarr.Group:
    """Create ``spec``'s group with every array laid out per the spec, plus its completion map.
    ``compressors`` overrides zarr's default compressor for the named arrays.

    Atomic for readers: the group is created with its attributes and the ``BUILDING`` marker
    in one write, and the marker goes (one more write) only once every array exists. A group
    that still carries it was cut short while being created (``is_half_made``): the stage
    that builds it removes and rebuilds it, every other command says which stage repairs it.
    """
    group = root.create_group(spec.name, attributes={**attrs, BUILDING: True}, overwrite=True)
    for aspec in spec.arrays:
        kwargs = array_layout(aspec, dims, frames_per_shard, spec.driver_written)
        fill = "" if aspec.dtype == "str" else 0
        extra = (
            {"compressors": compressors[aspec.name]}
            if compressors and aspec.name in compressors
            else {}
        )
        group.create_array(**kwargs, fill_value=fill, overwrite=True, **extra)
    if spec.has_completion_map:
        shards = num_shards(dims["F"], frames_per_shard)
        done = group.create_array(
            name="done",
            shape=(shards,),
            dtype="bool",
            chunks=(1,),
            fill_value=False,
            overwrite=True,
        )
        done[:] = np.zeros(shards, dtype=bool)
    group.attrs.put(dict(attrs))  # one write: the attributes without the marker
    return group


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
        new = jsonable(new)
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


def jsonable(value: Any) -> Any:
    """The value as it reads back from JSON attrs (tuples become lists)."""
    return json.loads(json.dumps(value))


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


def mark_shard_done(
    group: zarr.Group,
    shard: int,
    skipped: Mapping[str, str] | None = None,
    stats: Mapping[str, Sequence[float]] | None = None,
    written: Record | None = None,
) -> None:
    """Record a finished frame shard: its skipped frames merged into the group's attributes
    (sorted, so they do not depend on the order workers finish), its statistics in its row
    of the ``shard_stats`` array, the record of its files (``hilda.store.written``), then
    its ``done`` flag, last."""
    if written is not None:
        put_record(group, RECORD, shard, written)
    if skipped:
        merged = {**dict(group.attrs.get("skipped", {})), **{str(k): v for k, v in skipped.items()}}
        group.attrs["skipped"] = by_index(merged)
    if stats:
        _write_shard_stats(group, shard, stats)
    group["done"][shard] = True


def _write_shard_stats(group: zarr.Group, shard: int, stats: Mapping[str, Sequence[float]]) -> None:
    """One shard's named statistics as its row of ``shard_stats`` (S, C) float64, one chunk a
    row: a shard writes only its own row, where rewriting one attribute that holds every
    shard's statistics would cost O(shards) a shard and O(shards^2) a stage."""
    widths = {key: len(stats[key]) for key in sorted(stats)}
    row = np.concatenate([np.asarray(stats[key], dtype=np.float64) for key in widths])
    if SHARD_STATS not in group:
        shards = group["done"].shape[0]
        array = group.create_array(
            SHARD_STATS, shape=(shards, len(row)), dtype="float64", chunks=(1, len(row)),
            fill_value=np.nan, attributes={"columns": widths},
        )  # fmt: skip
    else:
        array = group[SHARD_STATS]
        if dict(array.attrs["columns"]) != widths:
            raise HildaError(
                f"{group.path}: shard {shard} has statistics {widths}, the group's other "
                f"shards {dict(array.attrs['columns'])}"
            )
    array[shard] = row


def shard_stats(group: zarr.Group) -> dict[str, dict[str, list[float]]]:
    """Every recorded shard's statistics: shard -> name -> values (``mark_shard_done``)."""
    if SHARD_STATS not in group:
        return {}
    array = group[SHARD_STATS]
    rows, widths = np.asarray(array[:]), dict(array.attrs["columns"])
    out = {}
    for shard in np.flatnonzero(~np.isnan(rows).all(axis=1)):
        values, col = {}, 0
        for key, width in widths.items():
            values[key] = rows[shard, col : col + width].tolist()
            col += width
        out[str(shard)] = values
    return out


def by_index(entries: dict[str, Any]) -> dict[str, Any]:
    return dict(sorted(entries.items(), key=lambda kv: int(kv[0])))


def open_for_stage(
    store: str, require: tuple[str, ...], builds: str, dataset: str | None = None
) -> zarr.Group:
    """Validate then open the store writable, for a stage that builds group ``builds`` (not
    validated: the stage resumes, rebuilds or replaces it, ``prepare_group``). The groups it
    reads (``require``) must be as written: every file present with its recorded size."""
    validate_store(
        store, require=require, dataset=dataset, rebuild=builds, files="sizes", files_of=require
    )
    return zarr.open_group(store, mode="r+")


def write_index(group: zarr.Group, arrays: Mapping[str, np.ndarray]) -> None:
    """Every index array at once (the index is small: one row per keyframe), the record of
    their files, then its completion map."""
    for name, values in arrays.items():
        group[name][:] = values
    put_whole_record(group, describe_whole(group, data_arrays(group)))
    group["done"][:] = True


def write_frames(store: str, path: str, f0: int, f1: int, arrays: Mapping[str, Any]) -> None:
    """Rows [f0, f1) (one frame shard, so one shard file per array) of the named arrays of
    group ``path``: a worker's write."""
    group = zarr.open_group(store, mode="r+", path=path)
    for name, values in arrays.items():
        group[name][f0:f1] = values


def write_teacher_block(
    store: str, path: str, block: int, f0: int, f1: int, values: np.ndarray, scales
) -> None:
    """One block's encoded grids of frames [f0, f1): values, and an int8 grid's scales."""
    arrays = {layer_array(block): values}
    if scales is not None:
        arrays |= dict(zip((layer_array(block, p) for p in INT8_SCALES), scales, strict=True))
    write_frames(store, path, f0, f1, arrays)


def stage_config(root: zarr.Group, stage: str) -> dict[str, Any] | None:
    """The config a stage recorded in the store's provenance (``record_stage``), if any."""
    return dict(root.attrs.get("stages", {})).get(stage, {}).get("config")


def set_attr(group: zarr.Group, key: str, value: Any) -> None:
    group.attrs[key] = value


def index_arrays(frames: list[Frame], cameras: list[str], root: str) -> dict[str, np.ndarray]:
    """The index group's arrays for ``frames`` (pure; cameras in store order; file paths
    relative to the dataset ``root``)."""
    f, v = len(frames), len(cameras)

    cwd = os.getcwd()  # once: readers may name files relative to the working directory

    def rel(path: str | None) -> str:
        if path and not os.path.isabs(path):
            path = os.path.join(cwd, path)
        return relative_to_root(root, path or "")

    out = {
        "token": np.array([fr.token for fr in frames], dtype=object),
        "scene": np.array([fr.scene for fr in frames], dtype=object),
        "timestamp": np.array([fr.timestamp for fr in frames], dtype=np.int64),
        "prev": np.array([-1 if fr.prev is None else fr.prev for fr in frames], dtype=np.int32),
        "next": np.array([-1 if fr.next is None else fr.next for fr in frames], dtype=np.int32),
        "lidar_path": np.array([rel(fr.lidar_file) for fr in frames], dtype=object),
        "labels_path": np.array([rel(fr.labels_file) for fr in frames], dtype=object),
        "lidar_to_ego": np.stack([fr.lidar_to_ego for fr in frames]) if f else np.zeros((0, 4, 4)),
        "ego_to_global": np.stack([fr.ego_to_global for fr in frames])
        if f
        else np.zeros((0, 4, 4)),
        "cam_intrinsics": np.zeros((f, v, 3, 3)),
        "cam_to_ego": np.tile(np.eye(4), (f, v, 1, 1)),
        "cam_ego_to_global": np.tile(np.eye(4), (f, v, 1, 1)),
        "cam_timestamp": np.full((f, v), -1, dtype=np.int64),
        "image_size": np.zeros((f, v, 2), dtype=np.int32),
        "image_path": np.full((f, v), "", dtype=object),
    }
    for i, fr in enumerate(frames):
        for cam in fr.cameras:
            j = cameras.index(cam.name)
            out["cam_intrinsics"][i, j] = cam.intrinsics
            out["cam_to_ego"][i, j] = cam.cam_to_ego
            out["cam_ego_to_global"][i, j] = cam.ego_to_global
            out["cam_timestamp"][i, j] = cam.timestamp
            out["image_size"][i, j] = (cam.width, cam.height)
            out["image_path"][i, j] = rel(cam.image_file)
    return out
