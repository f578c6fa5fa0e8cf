"""Frames per second of each hilda-prep stage with 1 and 2 Dask workers on the synthetic
world, the ratio (measured in one run), and the cluster start, timed apart from the stages
(every stage runs on one shared cluster, as ``hilda-prep all`` does). Prints a table; not a
test.

    .venv/bin/python benchmarks/prep_stages.py [--dataset DIR] [--frames 48] [--frames-per-shard 4]

Without ``--dataset`` it writes a synthetic nuScenes world of ``--frames`` keyframes (640x360
cameras) under ``out/bench/`` once and reuses it. The CPU teacher gives each worker
cpu_count / workers torch threads, so 2 workers on 2 cores run one thread each and never
oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from hilda.datasets.synthetic.generate import SyntheticConfig, make_synthetic
from hilda.pipeline.ops.occupancy import OccupancyConfig
from hilda.pipeline.runner import ClusterConfig
from hilda.pipeline.stages.common import StageOptions
from hilda.pipeline.stages.index import IndexConfig, run_index
from hilda.pipeline.stages.occupancy import OccupancyStageConfig, run_occupancy
from hilda.pipeline.stages.pointmaps import PointmapConfig, run_pointmaps
from hilda.pipeline.stages.prepare import shared_cluster
from hilda.pipeline.stages.teacher import TeacherConfig, run_teacher

FRAMES_PER_SCENE = 8


def world(frames: int) -> Path:
    out = Path(f"out/bench/nuscenes-{frames}")
    if not (out / "v1.0-trainval" / "sample.json").exists():
        scenes = -(-frames // FRAMES_PER_SCENE)
        print(f"writing a synthetic world of {scenes * FRAMES_PER_SCENE} keyframes to {out}")
        make_synthetic(
            SyntheticConfig(
                out=out,
                format="nuscenes",
                version="v1.0-trainval",
                scenes=scenes,
                frames_per_scene=FRAMES_PER_SCENE,
                seed=1,
                image_size=(640, 360),
            )
        )
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_stages(dataset: Path, store: str, workers: int, fps: int) -> dict[str, float]:
    """Seconds of the cluster start and of each stage on that cluster."""
    times: dict[str, float] = {}
    start = time.perf_counter()
    with shared_cluster(ClusterConfig(workers=workers), store, gpu=False) as cluster:
        times["cluster start"] = time.perf_counter() - start
        opts = StageOptions(cluster=cluster)
        index = IndexConfig("nuscenes", str(dataset), store, "v1.0-trainval", frames_per_shard=fps)
        times["index"] = timed(lambda: run_index(index, opts))
        times["build-pointmaps"] = timed(lambda: run_pointmaps(PointmapConfig(store), opts))
        teacher = TeacherConfig(store, "random:vits14", "last2")
        times["extract-teacher vits14 448x224"] = timed(lambda: run_teacher(teacher, opts))
        occupancy = OccupancyStageConfig(store, OccupancyConfig())
        times["build-occupancy"] = timed(lambda: run_occupancy(occupancy, opts))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, default=None)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--frames-per-shard", type=int, default=4)
    args = parser.parse_args()
    dataset = args.dataset or world(args.frames)
    frames = len(json.loads((dataset / "v1.0-trainval" / "sample.json").read_text()))
    results = {}
    tmp = Path(tempfile.mkdtemp())
    try:
        for workers in (1, 2):
            store = str(tmp / f"w{workers}.zarr")
            results[workers] = run_stages(dataset, store, workers, args.frames_per_shard)
    finally:
        shutil.rmtree(tmp)
    print(
        f"{frames} frames, {args.frames_per_shard} frames per shard, {os.cpu_count()} cores; "
        "stage figures exclude the cluster start"
    )
    print("| stage | 1 worker, frames/s | 2 workers, frames/s | ratio |\n|---|---|---|---|")
    for stage in results[1]:
        if stage == "cluster start":
            continue
        one, two = frames / results[1][stage], frames / results[2][stage]
        print(f"| {stage} | {one:.2f} | {two:.2f} | {two / one:.2f} |")
    one, two = results[1]["cluster start"], results[2]["cluster start"]
    print(f"| cluster start (s) | {one:.2f} | {two:.2f} | |")


if __name__ == "__main__":
    main()
