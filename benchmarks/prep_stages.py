"""Frames per second of each hilda-prep stage with 1 and 2 Dask workers on the synthetic
world, and the ratio (measured in one run). Prints a table; not a test.

    .venv/bin/python benchmarks/prep_stages.py [--dataset out/demo/nuscenes] [--frames-per-shard 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from hilda.pipeline.ops.occupancy import OccupancyConfig
from hilda.pipeline.runner import ClusterConfig
from hilda.pipeline.stages.common import StageOptions
from hilda.pipeline.stages.index import IndexConfig, run_index
from hilda.pipeline.stages.occupancy import OccupancyStageConfig, run_occupancy
from hilda.pipeline.stages.pointmaps import PointmapConfig, run_pointmaps
from hilda.pipeline.stages.teacher import TeacherConfig, run_teacher


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_all(dataset: Path, store: str, workers: int, fps: int) -> tuple[int, dict[str, float]]:
    opts = StageOptions(cluster=ClusterConfig(workers=workers))
    times = {}
    summary = {}

    def index() -> None:
        summary.update(
            run_index(
                IndexConfig(
                    dataset="nuscenes", root=str(dataset), store=store, frames_per_shard=fps
                ),
                opts,
            )
        )

    times["index"] = timed(index)
    times["build-pointmaps"] = timed(lambda: run_pointmaps(PointmapConfig(store=store), opts))
    times["extract-teacher vits14 448x224"] = timed(
        lambda: run_teacher(
            TeacherConfig(store=store, teacher="random:vits14", layers="last2"), opts
        )
    )
    times["build-occupancy"] = timed(
        lambda: run_occupancy(OccupancyStageConfig(store=store, occupancy=OccupancyConfig()), opts)
    )
    return int(summary["frames"]), times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="out/demo/nuscenes")
    parser.add_argument("--frames-per-shard", type=int, default=2)
    args = parser.parse_args()
    results = {}
    tmp = Path(tempfile.mkdtemp())
    try:
        for workers in (1, 2):
            frames, results[workers] = run_all(
                Path(args.dataset), str(tmp / f"w{workers}.zarr"), workers, args.frames_per_shard
            )
    finally:
        shutil.rmtree(tmp)
    print(
        f"{frames} frames, {args.frames_per_shard} frames per shard; times include each stage's "
        "Dask cluster start (~2-4 s)"
    )
    print(f"{'stage':32} {'1 worker fps':>13} {'2 workers fps':>14} {'ratio':>6}")
    for stage in results[1]:
        one, two = frames / results[1][stage], frames / results[2][stage]
        print(f"{stage:32} {one:13.2f} {two:14.2f} {two / one:6.2f}")


if __name__ == "__main__":
    main()
