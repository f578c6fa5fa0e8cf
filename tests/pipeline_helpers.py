"""Run the hilda-prep stages on a dataset into a store (tests' shortcut)."""

from __future__ import annotations

from pathlib import Path

import zarr

from hilda.pipeline.ops.occupancy import OccupancyConfig
from hilda.pipeline.runner import ClusterConfig
from hilda.pipeline.stages.common import StageOptions
from hilda.pipeline.stages.index import IndexConfig, run_index
from hilda.pipeline.stages.occupancy import OccupancyStageConfig, run_occupancy
from hilda.pipeline.stages.pointmaps import PointmapConfig, run_pointmaps
from hilda.pipeline.stages.teacher import TeacherConfig, run_teacher

TEACHER = dict(teacher="random:vits14", layers="last2", image_size=(112, 56), name="vits")


def build_cache(
    dataset_root: Path,
    store: str,
    *,
    workers: int = 1,
    fps: int = 2,
    dataset: str = "nuscenes",
    split: str = "all",
    stages: tuple[str, ...] = ("index", "pointmaps", "occupancy", "teacher"),
    skip_bad: bool = False,
    teacher: dict | None = None,
) -> None:
    opts = StageOptions(cluster=ClusterConfig(workers=workers), skip_bad=skip_bad)
    if "index" in stages:
        run_index(
            IndexConfig(
                dataset=dataset,
                root=str(dataset_root),
                store=store,
                split=split,
                frames_per_shard=fps,
            ),
            opts,
        )
    if "pointmaps" in stages:
        run_pointmaps(PointmapConfig(store=store), opts)
    if "occupancy" in stages:
        run_occupancy(OccupancyStageConfig(store=store, occupancy=OccupancyConfig(grid=256)), opts)
    if "teacher" in stages:
        run_teacher(TeacherConfig(store=store, **(teacher or TEACHER)), opts)


def array_files(store: Path) -> dict[str, bytes]:
    """Every file of a local store except the root metadata (which holds run times)."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.relative_to(store) != Path("zarr.json")
    }


def arrays(store: str) -> dict[str, object]:
    """Every array of a store (any URL), read into memory."""
    root = zarr.open_group(store, mode="r")
    out = {}

    def walk(group: zarr.Group, prefix: str) -> None:
        for name, arr in group.arrays():
            out[prefix + name] = arr[...]
        for name, sub in group.groups():
            walk(sub, f"{prefix}{name}/")

    walk(root, "")
    return out
