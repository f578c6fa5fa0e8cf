"""``hilda-prep all``: every stage in order (index, pointmaps, teacher, occupancy) on one Dask
cluster, each resumable as when run alone (finished shards are skipped on a rerun)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from hilda.pipeline.runner import ClusterConfig
from hilda.pipeline.stages.common import StageOptions
from hilda.pipeline.stages.index import IndexConfig, run_index
from hilda.pipeline.stages.occupancy import OccupancyStageConfig, run_occupancy
from hilda.pipeline.stages.pointmaps import PointmapConfig, run_pointmaps
from hilda.pipeline.stages.teacher import TeacherConfig, run_teacher
from hilda.store import INDEX, OCCUPANCY, POINTMAPS, teacher_path
from hilda.store.lock import writer_lock


@dataclass(frozen=True)
class PrepareConfig:
    """One configuration per stage; they all name the same store."""

    index: IndexConfig
    pointmaps: PointmapConfig | None
    teacher: TeacherConfig | None  # None: a config that distils nothing needs no teacher
    occupancy: OccupancyStageConfig | None  # None: no occupancy target

    def __post_init__(self) -> None:
        stages = (self.index, self.pointmaps, self.teacher, self.occupancy)
        stores = {s.store for s in stages if s is not None}
        if len(stores) != 1:
            raise ValueError(f"the stages name different stores: {sorted(stores)}")


@contextlib.contextmanager
def shared_cluster(cluster: ClusterConfig, store: str, gpu: bool) -> Iterator[ClusterConfig]:
    """One local cluster for every stage (its start is paid once), or the given scheduler.
    memory:// stores keep their per-stage in-process workers."""
    if cluster.scheduler is not None or store.startswith("memory://"):
        yield cluster
        return
    import os

    from distributed import LocalCluster

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    kwargs: dict[str, Any] = {"resources": {"GPU": 1}} if gpu else {}
    with LocalCluster(
        n_workers=cluster.workers,
        threads_per_worker=1,
        dashboard_address=None,
        silence_logs=logging.CRITICAL,
        **kwargs,
    ) as local:
        yield replace(cluster, scheduler=local.scheduler_address, gpu_workers=gpu)


def run_all(cfg: PrepareConfig, options: StageOptions) -> dict[str, dict[str, Any]]:
    """Every stage in order; returns each stage's summary."""
    gpu = cfg.teacher is not None and cfg.teacher.device == "cuda"
    # The store's writer lock for the whole run, not only stage by stage: no other writer
    # gets in between two stages.
    lock = writer_lock(cfg.index.store, "hilda-prep all")
    with lock, shared_cluster(options.cluster, cfg.index.store, gpu) as cluster:
        opts = replace(options, cluster=cluster)
        out = {INDEX.name: run_index(cfg.index, opts)}
        if cfg.pointmaps is not None:
            out[POINTMAPS.name] = run_pointmaps(cfg.pointmaps, opts)
        if cfg.teacher is not None:
            out[teacher_path(cfg.teacher.group_name())] = run_teacher(cfg.teacher, opts)
        if cfg.occupancy is not None:
            out[OCCUPANCY.name] = run_occupancy(cfg.occupancy, opts)
        return out
