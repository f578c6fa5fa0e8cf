"""The pipeline at the size of nuScenes trainval: every hilda-prep stage and 1,000 training
samples over synthetic worlds of 1k, 10k and 34k keyframes, with what grows with frames.

    .venv/bin/python benchmarks/scale.py [--sizes 1000 10000 34000] [--out out/bench/scale]
        [--workers 2] [--samples 1000] [--teacher-sizes 1000 10000 34000]

The world is ``hilda-prep make-synthetic --scale`` (850 scenes x 40 keyframes, 8-beam sweeps
of about 2k points, six 64x36 cameras, the full v1.0-trainval table set), written once under
``--out``; a smaller size reads the tables of its first scenes (a version folder of its own,
the sensor files linked). Each size runs in a child process, so its peak RSS is its own. Per
stage it reports:

- driver CPU milliseconds per frame (the driver process's CPU time, Dask's scheduler and the
  client's event loop included, the memory sampler's own thread excluded);
- frames/s (wall clock, the whole stage on ``--workers`` Dask workers);
- peak RSS of the driver and of the largest worker process (sampled every 50 ms);

then the store's files and bytes, the cost of ``hilda-prep validate`` and ``validate
--deep`` (the write records, ``hilda.store.written``), the training loader's start-up
(config check, sample index, dataset, first sample) and its samples/s over ``--samples``
random samples in the driver. The teacher is the oracle at 112x56 (a cheap teacher that
still reads every image's class map, writes int8 grids and their CLS tokens).
Prints a table; not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

FRAMES_PER_SCENE = 40
VERSION = "v1.0-trainval"


def write_world(out: Path, frames: int, workers: int) -> tuple[Path, float]:
    """The scale world of at least ``frames`` keyframes (written once); its seconds."""
    from hilda.datasets.synthetic.generate import make_synthetic, scale_config

    scenes = math.ceil(frames / FRAMES_PER_SCENE)
    for marker in sorted(out.glob("world-*/written.json")):  # a bigger world serves too
        written = json.loads(marker.read_text())
        if written["frames"] >= scenes * FRAMES_PER_SCENE:
            return marker.parent, written["seconds"]
    root = out / f"world-{scenes}"
    shutil.rmtree(root, ignore_errors=True)
    print(f"writing the scale world: {scenes} scenes x {FRAMES_PER_SCENE} keyframes -> {root}")
    start = time.perf_counter()
    make_synthetic(scale_config(root, scenes=scenes, workers=workers))
    seconds = time.perf_counter() - start
    (root / "written.json").write_text(
        json.dumps({"seconds": seconds, "frames": scenes * FRAMES_PER_SCENE})
    )
    return root, seconds


def subset_world(full: Path, frames: int) -> Path:
    """A dataset root whose tables hold the first scenes of ``full`` (their samples, sample
    data, poses, calibration, logs, lidarseg rows); sensor folders are links to ``full``'s."""
    scenes = math.ceil(frames / FRAMES_PER_SCENE)
    root = full.parent / f"subset-{scenes}"
    if (root / VERSION / "scene.json").exists():
        return root
    tables = {p.stem: json.loads(p.read_text()) for p in (full / VERSION).glob("*.json")}
    keep = tables["scene"][:scenes]
    scene_toks = {s["token"] for s in keep}
    logs = {s["log_token"] for s in keep}
    samples = [s for s in tables["sample"] if s["scene_token"] in scene_toks]
    sample_toks = {s["token"] for s in samples}
    data = [d for d in tables["sample_data"] if d["sample_token"] in sample_toks]
    data_toks = {d["token"] for d in data}
    poses = {d["ego_pose_token"] for d in data}
    calib = {d["calibrated_sensor_token"] for d in data}
    tables.update(
        scene=keep,
        sample=samples,
        sample_data=data,
        log=[r for r in tables["log"] if r["token"] in logs],
        ego_pose=[r for r in tables["ego_pose"] if r["token"] in poses],
        calibrated_sensor=[r for r in tables["calibrated_sensor"] if r["token"] in calib],
        lidarseg=[r for r in tables["lidarseg"] if r["sample_data_token"] in data_toks],
        map=[{**m, "log_tokens": [t for t in m["log_tokens"] if t in logs]} for m in tables["map"]],
    )
    (root / VERSION).mkdir(parents=True, exist_ok=True)
    for name in ("samples", "maps"):
        link = root / name
        if not link.exists():
            link.symlink_to((full / name).resolve())
    # The devkit counts the label files against the lidarseg records: link the kept ones.
    (root / "lidarseg" / VERSION).mkdir(parents=True, exist_ok=True)
    for rec in tables["lidarseg"]:
        link = root / rec["filename"]
        if not link.exists():
            link.symlink_to((full / rec["filename"]).resolve())
    for name, rows in tables.items():
        (root / VERSION / f"{name}.json").write_text(json.dumps(rows))
    return root


class PeakRss:
    """Peak resident memory of this process and of its largest descendant (a Dask worker),
    sampled in a thread."""

    def __init__(self, period: float = 0.05) -> None:
        self.period, self.me = period, psutil.Process()
        self.driver = self.worker = 0
        self.cpu = 0.0  # this thread's own CPU seconds, not the driver's work
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        children, listed = [], 0.0
        while not self._stop.is_set():
            self.driver = max(self.driver, self.me.memory_info().rss)
            if time.monotonic() - listed > 1.0:  # listing /proc is the costly part
                children, listed = self.me.children(recursive=True), time.monotonic()
            for child in children:
                try:
                    self.worker = max(self.worker, child.memory_info().rss)
                except psutil.Error:  # exited since the listing
                    pass
            self.cpu = time.thread_time()
            self._stop.wait(self.period)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measured(fn, frames: int) -> dict[str, float]:
    """Run one stage; its driver CPU per frame, frames/s and peak RSS (MiB)."""
    cpu, wall = time.process_time(), time.perf_counter()
    with PeakRss() as rss:
        fn()
    cpu, wall = time.process_time() - cpu - rss.cpu, time.perf_counter() - wall
    return {
        "driver ms/frame": 1000 * cpu / frames,
        "frames/s": frames / wall,
        "seconds": wall,
        "driver MiB": rss.driver / 2**20,
        "worker MiB": rss.worker / 2**20,
    }


def store_files(store: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _, names in os.walk(store):
        files += len(names)
        size += sum(os.path.getsize(os.path.join(dirpath, n)) for n in names)
    return files, size


def loader(store: str, samples: int) -> dict[str, float]:
    """Start-up seconds (config check, sample index, dataset, first sample) and samples/s of
    the training loader's dataset in this process (the path each loader worker runs)."""
    from hilda.engine.config_io import load_config
    from hilda.store import OCCUPANCY
    from hilda.store.reader import CacheReader
    from hilda.train.config import TrainConfig
    from hilda.train.data import CacheDataset, check_cache, collate, sample_index

    start = time.perf_counter()
    grid = CacheReader(store, [OCCUPANCY]).occupancy_attrs()["grid"]
    grid = grid[0] if isinstance(grid, list) else grid
    sets = ["data.num_workers=0", f"model.bev_grid={grid}", "data.teacher=oracle"]
    cfg = load_config(TrainConfig, None, sets)
    info = check_cache(store, cfg)
    index = sample_index(store, info, needs_occupancy=True)
    ds = CacheDataset(cfg, info, index)
    collate([ds[(0, 0)]])
    startup = time.perf_counter() - start
    picks = np.random.default_rng(0).integers(0, len(index.frames), samples)
    start = time.perf_counter()
    for k in picks:
        collate([ds[(int(k), 0)]])
    return {"startup s": startup, "samples/s": samples / (time.perf_counter() - start)}


def validate_costs(store: str) -> dict[str, float]:
    """Seconds of ``hilda-prep validate`` (every file's size against its write record) and
    of ``validate --deep`` (every file read and its CRC-32 compared), in this process. The
    store was just written, so its files are in the page cache: the deep figure is the
    CRC's and zarr's cost, not the disk's."""
    from hilda.store.validate import validate_store

    out = {}
    for name, files in (("sizes s", "sizes"), ("deep s", "deep")):
        start = time.perf_counter()
        validate_store(store, files=files)
        out[name] = time.perf_counter() - start
    return out


def one_size(dataset: Path, store: Path, frames: int, workers: int, samples: int, teacher: bool):
    """Every stage on one shared cluster, as ``hilda-prep all`` runs them; JSON on stdout."""
    from hilda.pipeline.ops.occupancy import OccupancyConfig
    from hilda.pipeline.runner import ClusterConfig
    from hilda.pipeline.stages.common import StageOptions
    from hilda.pipeline.stages.index import IndexConfig, run_index
    from hilda.pipeline.stages.occupancy import OccupancyStageConfig, run_occupancy
    from hilda.pipeline.stages.pointmaps import PointmapConfig, run_pointmaps
    from hilda.pipeline.stages.prepare import shared_cluster
    from hilda.pipeline.stages.teacher import TeacherConfig, run_teacher

    shutil.rmtree(store, ignore_errors=True)
    out: dict[str, object] = {"frames": frames}
    with shared_cluster(ClusterConfig(workers=workers), str(store), gpu=False) as cluster:
        opts = StageOptions(cluster=cluster)
        stages = {
            "index": lambda: run_index(
                IndexConfig("nuscenes", str(dataset), str(store), VERSION), opts
            ),
            "build-pointmaps": lambda: run_pointmaps(PointmapConfig(str(store)), opts),
            "build-occupancy": lambda: run_occupancy(
                OccupancyStageConfig(str(store), OccupancyConfig()), opts
            ),
        }
        if teacher:
            stages["extract-teacher (oracle)"] = lambda: run_teacher(
                TeacherConfig(str(store), "oracle", "last2", image_size=(112, 56), name="oracle"),
                opts,
            )
        for name, fn in stages.items():
            out[name] = measured(fn, frames)
            print(f"  {frames} frames, {name}: {out[name]}", file=sys.stderr, flush=True)
    out["store files"], out["store bytes"] = store_files(store)
    out["validate"] = validate_costs(str(store))
    if teacher:
        out["loader"] = loader(str(store), samples)
    out["peak driver MiB (process)"] = psutil.Process().memory_info().rss / 2**20
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 34000])
    ap.add_argument("--teacher-sizes", type=int, nargs="*", default=[1000, 10000, 34000])
    ap.add_argument("--out", type=Path, default=Path("out/bench/scale"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--keep", action="store_true", help="keep each size's store under --out")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one size
    ap.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        store = args.out / f"cache-{args.one}.zarr"
        teacher = args.one in args.teacher_sizes
        one_size(args.dataset, store, args.one, args.workers, args.samples, teacher)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    full, world_s = write_world(args.out, max(args.sizes), os.cpu_count() or 1)
    results = []
    for size in sorted(args.sizes):
        dataset = (
            full
            if math.ceil(size / FRAMES_PER_SCENE) * FRAMES_PER_SCENE
            >= len(json.loads((full / VERSION / "sample.json").read_text()))
            else subset_world(full, size)
        )
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(size),
            "--dataset",
            str(dataset),
            "--out",
            str(args.out),
            "--workers",
            str(args.workers),
            "--samples",
            str(args.samples),
            "--teacher-sizes",
            *map(str, args.teacher_sizes),
        ]
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if not args.keep:
            shutil.rmtree(args.out / f"cache-{size}.zarr", ignore_errors=True)
    frames = max(args.sizes)
    print(
        f"\nscale world: {world_s:.0f} s for {math.ceil(frames / 40) * 40} keyframes "
        f"({1000 * world_s / frames:.1f} ms a keyframe, {os.cpu_count()} processes)"
    )
    print(f"{args.workers} Dask workers, {os.cpu_count()} cores\n")
    print("| frames | stage | driver ms/frame | frames/s | driver peak MiB | worker peak MiB |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in results:
        for name, m in r.items():
            if isinstance(m, dict) and "frames/s" in m and name != "loader":
                print(
                    f"| {r['frames']:,} | {name} | {m['driver ms/frame']:.3f} | "
                    f"{m['frames/s']:.1f} | {m['driver MiB']:.0f} | {m['worker MiB']:.0f} |"
                )
    print("\n| frames | store files | store GiB | loader start-up s | loader samples/s |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        lo = r.get("loader", {})
        print(
            f"| {r['frames']:,} | {r['store files']:,} | {r['store bytes'] / 2**30:.2f} | "
            f"{lo.get('startup s', float('nan')):.2f} | {lo.get('samples/s', float('nan')):.1f} |"
        )
    print("\n| frames | validate s | ms/frame | validate --deep s | ms/frame | deep MB/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        v, n = r["validate"], r["frames"]
        print(
            f"| {n:,} | {v['sizes s']:.2f} | {1000 * v['sizes s'] / n:.3f} | {v['deep s']:.2f} | "
            f"{1000 * v['deep s'] / n:.3f} | {r['store bytes'] / 2**20 / v['deep s']:.0f} |"
        )


if __name__ == "__main__":
    main()
