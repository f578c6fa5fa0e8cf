"""Creating cache stores and groups from the layout specs (the Zarr I/O edge).

A store is a local folder or any fsspec URL zarr accepts (``memory://``, ``s3://``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

import hilda
from hilda.data_schemas.store import (
    BUILDING,
    SCHEMA,
    SCHEMA_VERSION,
    GroupSpec,
    array_layout,
    num_shards,
)


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
        kwargs = array_layout(aspec, dims, frames_per_shard)
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
