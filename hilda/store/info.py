"""``hilda-prep info``: what a store holds (frames, stages complete, bytes per frame per group,
teacher provenance, codec fidelity)."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from hilda.store.schema import INDEX, OCCUPANCY, POINTMAPS, POINTS, TEACHERS, teacher_path
from hilda.store.teacher_record import SUMMARY_ATTRS
from hilda.store.validate import validate_store

# Teacher-group attrs that say which features a cache holds (printed by `hilda-prep info`).
TEACHER_SUMMARY_KEYS = SUMMARY_ATTRS


def _group_bytes(group: zarr.Group) -> int:
    """Stored (compressed) bytes of every array under ``group``."""
    total = 0
    for _, arr in group.arrays():
        total += int(arr.nbytes_stored())
    for _, sub in group.groups():
        total += _group_bytes(sub)
    return total


def store_info(store: str) -> dict[str, Any]:
    root = validate_store(store)
    index = root[INDEX.name]
    frames = int(index.attrs["num_frames"])
    out: dict[str, Any] = {
        "store": store,
        "dataset": root.attrs["dataset"],
        "version": root.attrs["version"],
        "split": root.attrs["split"],
        "schema_version": root.attrs["schema_version"],
        "frames": frames,
        "cameras": list(index.attrs["cameras"]),
        "groups": {},
    }
    groups = [(INDEX.name, index)] + [
        (n, root[n]) for n in (POINTS.name, POINTMAPS.name, OCCUPANCY.name) if n in root
    ]
    if TEACHERS in root:
        groups += [(teacher_path(n), g) for n, g in root[TEACHERS].groups()]
    for name, group in groups:
        done = np.asarray(group["done"][:]) if "done" in group else np.array([True])
        entry: dict[str, Any] = {
            "complete": bool(done.all()),
            "shards_done": f"{int(done.sum())}/{done.size}",
            "bytes_per_frame": _group_bytes(group) / max(frames, 1),
            "skipped": len(group.attrs.get("skipped", {})),
        }
        if name.startswith(teacher_path("")):
            attrs = dict(group.attrs)
            entry.update({k: attrs.get(k) for k in TEACHER_SUMMARY_KEYS})
            entry["fidelity"] = {
                layer: {"mean_cos": round(v["mean_cos"], 6), "min_cos": round(v["min_cos"], 6)}
                for layer, v in attrs.get("codec_fidelity", {}).items()
            }
        if name == OCCUPANCY.name:
            entry["valid"] = int(np.asarray(group["valid"][:]).sum())
        if name == POINTMAPS.name:
            entry["pairs"] = int(group["offsets"][-1])
        if name == POINTS.name:
            entry["points"] = int(group["offsets"][-1])
        out["groups"][name] = entry
    return out
