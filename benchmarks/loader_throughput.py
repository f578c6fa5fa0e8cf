"""Training samples per second per CPU core: assembled from the hilda-prep cache, against the
online path on the same frames (read both sweeps, decode and resize the 12 images, project
and occlusion-filter the point-pixel pairs, read the t+1 sweep and rasterise its occupancy;
teacher excluded), and the online path with the teacher's forward on CPU included. One
process on one thread; ratios from the same run. Prints tables; not a test.

    .venv/bin/python benchmarks/loader_throughput.py [--store out/demo/cache.zarr] [--rounds 2]
        [--real-jpegs DIR]
    .venv/bin/python benchmarks/loader_throughput.py --codecs --store out/demo/cache.zarr

The synthetic world's images are 640x360. With ``--real-jpegs`` (default: the real nuScenes
keyframe beside the checkout, ``../shared/realdata/nuscenes-keyframe``, when present) the
online path also runs on real 1600x900 nuScenes JPEGs: each frame's camera reads the real
keyframe's image of that camera instead of the synthetic one (the cache path reads the same
stored features either way). It also reports Zarr round trips per cached sample, where the
cache path's time goes (a profile summary), and the CPU decode of one real frame's six
JPEGs with 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import pstats
import time
from pathlib import Path

import numpy as np
import torch

from hilda.datasets.io import read_sweep
from hilda.engine import augment
from hilda.engine.config_io import load_config
from hilda.pipeline.ops.occlusion import visible_mask
from hilda.pipeline.ops.occupancy import OccupancyConfig, ego_compensate, future_occupancy
from hilda.pipeline.ops.projection import frame_pairs
from hilda.pipeline.stages.pointmaps import BORDER_PX, MIN_DEPTH, PointmapConfig
from hilda.pipeline.stages.teacher import load_images
from hilda.store import INDEX, OCCUPANCY, teacher_path
from hilda.store.reader import CacheReader
from hilda.teachers import MultiLayerTeacher, build_teacher, parse_layers, preprocess
from hilda.train.config import TrainConfig
from hilda.train.data import CacheDataset, check_cache, collate, sample_index


class Online:
    """One training sample computed from the raw dataset files, as a trainer without the
    cache would (the same augmentation and alignment as the cached path)."""

    def __init__(
        self, store: str, cfg: TrainConfig, teacher: bool, jpegs: dict[str, str] | None = None
    ) -> None:
        reader = CacheReader(store, [INDEX, OCCUPANCY])
        self.index = reader.index()
        occ = reader.occupancy_attrs()
        grid = occ["grid"][0] if isinstance(occ["grid"], list) else occ["grid"]
        self.occ = OccupancyConfig(grid=int(grid), cell=float(occ["cell"]))
        t = reader.teacher()
        self.image_size = tuple(reader.teacher_attrs(t.name)["image_size"])
        if jpegs is not None:  # every frame's camera reads the real keyframe's image
            real = [jpegs[c] for c in reader.cameras]
            self.index["image_path"] = np.array([real] * len(self.index["image_path"]))
        self.cfg = cfg
        self.visible = functools.partial(visible_mask, rule=PointmapConfig(store=store).rule)
        self.teacher = None
        if teacher:
            model, info = build_teacher(t.model_id)
            self.teacher = MultiLayerTeacher(model, parse_layers("last2", info.depth)).eval()

    def pairs(self, f: int, points: np.ndarray) -> tuple[np.ndarray, ...]:
        i = self.index
        return frame_pairs(
            points, i["lidar_to_ego"][f], i["ego_to_global"][f], i["cam_intrinsics"][f],
            i["cam_to_ego"][f], i["cam_ego_to_global"][f], i["image_size"][f],
            visible=self.visible, min_depth=MIN_DEPTH, border=BORDER_PX,
        )  # fmt: skip

    def sample(self, f: int, p: int, seed: int) -> dict:
        i = self.index
        now = read_sweep(str(i["lidar_path"][f]))
        before = read_sweep(str(i["lidar_path"][p]))
        pairs = [self.pairs(p, before), self.pairs(f, now)]
        images = [
            load_images([str(x) for x in i["image_path"][g]], self.image_size, str(g))
            for g in (p, f)
        ]
        if self.teacher is not None:
            with torch.inference_mode():
                for imgs in images:
                    self.teacher(preprocess(imgs))
        g = int(i["next"][f])
        future = read_sweep(str(i["lidar_path"][g]))
        transforms = (i["lidar_to_ego"][g], i["ego_to_global"][g], i["lidar_to_ego"][f],
                      i["ego_to_global"][f])  # fmt: skip
        target = future_occupancy(future, transforms, self.occ, seed=f)
        l2e, e2g = i["lidar_to_ego"], i["ego_to_global"]
        before[:, :3] = ego_compensate(before, l2e[p], e2g[p], l2e[f], e2g[f])
        a = self.cfg.data.augment
        d = augment.draw(a, np.random.default_rng(seed))
        clouds = [augment.apply_points(before, d, a, 0), augment.apply_points(now, d, a, 1)]
        return {"points": clouds, "pairs": pairs,
                "target": augment.apply_grid(target, d, self.occ.cell)}  # fmt: skip


def rate(fn, items: list, rounds: int) -> float:
    fn(*items[0])  # warm-up: imports, first-call allocations
    start = time.perf_counter()
    for _ in range(rounds):
        for item in items:
            fn(*item)
    return rounds * len(items) / (time.perf_counter() - start)


def real_jpegs(path: Path) -> dict[str, str] | None:
    """Camera name -> the real keyframe's JPEG of that camera (None when absent)."""
    files = sorted(path.glob("*__CAM_*__*.jpg")) if path.is_dir() else []
    return {f.name.split("__")[1]: str(f) for f in files} or None


def round_trips(reader: CacheReader, fn) -> int:
    """Zarr round trips (``CacheReader.gather`` calls) made by ``fn()``."""
    calls, gather = [0], reader.gather

    def counting(*reads):
        calls[0] += 1
        return gather(*reads)

    reader.gather = counting
    try:
        fn()
    finally:
        del reader.gather
    return calls[0]


def profile_summary(fn, items: list, top: int = 8) -> str:
    """The functions the cache path spends its time in (cumulative, this process)."""
    prof = cProfile.Profile()
    prof.enable()
    for item in items:
        fn(*item)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in text.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return "\n".join(lines[start : start + top + 1])


def decode_rates(jpegs: dict[str, str], size: tuple[int, int], repeats: int = 5) -> list[float]:
    """Frames/s of decoding + resizing one frame's six real JPEGs, with 1 and 2 threads."""
    paths = list(jpegs.values())
    out = []
    for threads in (1, 2):
        load_images(paths, size, "bench", threads)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            load_images(paths, size, "bench", threads)
        out.append(repeats / (time.perf_counter() - start))
    return out


def teacher_bytes_per_frame(store: str, name: str) -> float:
    """Stored bytes of one frame of ``teacher/<name>/`` (every array: grids, scales, CLS)."""
    from hilda.store.info import store_info

    return float(store_info(store)["groups"][teacher_path(name)]["bytes_per_frame"])


def codec_comparison(store: str, rounds: int) -> None:
    """Samples/s per core and teacher bytes read per sample, float16 against int8, on one
    run: a copy of ``store`` gets the int8 group of its (float16) teacher, then the cached
    path assembles the same samples from each (the int8 grids as stored, for the device)."""
    import shutil
    import tempfile

    from hilda.pipeline.stages.common import StageOptions
    from hilda.pipeline.stages.teacher import TeacherConfig, run_teacher

    reader = CacheReader(store, [OCCUPANCY])
    t = reader.teacher()
    if t.int8:
        raise SystemExit(f"{store}: teacher/{t.name}/ is int8 already; give a float16 cache")
    attrs = reader.teacher_attrs(t.name)
    grid = reader.occupancy_attrs()["grid"]
    grid = grid[0] if isinstance(grid, list) else grid
    with tempfile.TemporaryDirectory() as tmp:
        copy = str(Path(tmp) / "cache.zarr")
        shutil.copytree(store, copy)
        cfg = TeacherConfig(
            store=copy,
            teacher=t.model_id,
            layers=",".join(str(b) for b in t.blocks),
            image_size=tuple(attrs["image_size"]),
            codec="int8",
            name="int8",
        )
        run_teacher(cfg, StageOptions())
        datasets, bytes_read = {}, {}
        for name in (t.name, "int8"):
            sets = ["data.num_workers=0", f"model.bev_grid={grid}", f"data.teacher={name}"]
            train = load_config(TrainConfig, None, sets)
            info = check_cache(copy, train)
            samples = sample_index(copy, info, needs_occupancy=True)
            datasets[name] = CacheDataset(train, info, samples)
            bytes_read[name] = 2 * teacher_bytes_per_frame(copy, name)  # t-1 and t0
        items = [(k,) for k in range(len(samples.frames))]
        # The codecs alternate round by round (this machine's speed drifts over seconds);
        # each figure is the median over rounds.
        rates: dict[str, dict[str, list[float]]] = {n: {"warm": [], "cold": []} for n in datasets}
        for r in range(rounds):
            for name in (t.name, "int8") if r % 2 == 0 else ("int8", t.name):
                ds = datasets[name]
                fn = lambda k, ds=ds: collate([ds[(k, 0)]])  # noqa: E731
                rates[name]["warm"].append(rate(fn, items, 1))
                rates[name]["cold"].append(cold_rate(fn, items, 1, copy))
        rows = {
            n: (float(np.median(v["warm"])), float(np.median(v["cold"])), bytes_read[n])
            for n, v in rates.items()
        }
    (f16, f16_cold, f16_bytes), (i8, i8_cold, i8_bytes) = rows[t.name], rows["int8"]
    print(
        f"\nteacher codec, {t.model_id} blocks {list(t.blocks)}, {len(items)} samples, 1 thread, "
        f"median of {rounds} alternating rounds"
    )
    print(
        "| codec | samples/s per core, page cache | from the disk | teacher KiB read per "
        "sample | vs float16 (cache; disk; bytes) |"
    )
    print("|---|---:|---:|---:|---|")
    print(
        f"| float16 | {f16:.2f} | {f16_cold:.2f} | {f16_bytes / 1024:,.0f} | 1.00x; 1.00x; 1.00x |"
    )
    print(
        f"| int8 (dequantised on the device) | {i8:.2f} | {i8_cold:.2f} | "
        f"{i8_bytes / 1024:,.0f} | {i8 / f16:.2f}x; {i8_cold / f16_cold:.2f}x; "
        f"{i8_bytes / f16_bytes:.2f}x |"
    )


def evict(store: str) -> None:
    """Drop the store's files from the OS page cache (``posix_fadvise`` DONTNEED, no root
    needed): the next reads come from the disk, as a cache too big for memory is read."""
    for dirpath, _, names in os.walk(store):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cold_rate(fn, items: list, rounds: int, store: str) -> float:
    """Samples/s with the store evicted from the page cache before every sample (the
    eviction is not timed)."""
    fn(*items[0])
    total = 0.0
    for _ in range(rounds):
        for item in items:
            evict(store)
            start = time.perf_counter()
            fn(*item)
            total += time.perf_counter() - start
    return rounds * len(items) / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="out/demo/cache.zarr")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--codecs", action="store_true", help="only: float16 against int8 on a copy of --store"
    )
    here = Path(__file__).resolve().parents[2] / "shared/realdata/nuscenes-keyframe"
    ap.add_argument("--real-jpegs", type=Path, default=here)
    args = ap.parse_args()
    torch.set_num_threads(1)  # per core
    if args.codecs:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        codec_comparison(args.store, args.rounds)
        return
    jpegs = real_jpegs(args.real_jpegs)
    decode = decode_rates(jpegs, (448, 224)) if jpegs is not None else None  # before pinning
    if hasattr(os, "sched_setaffinity"):  # Zarr decodes in threads: keep them on one core too
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    grid = CacheReader(args.store, [OCCUPANCY]).occupancy_attrs()["grid"]
    grid = grid[0] if isinstance(grid, list) else grid
    # The paper's data settings (every pair, both distilled blocks) on the store's BEV grid.
    cfg = load_config(TrainConfig, None, ["data.num_workers=0", f"model.bev_grid={grid}"])
    info = check_cache(args.store, cfg)
    samples = sample_index(args.store, info, needs_occupancy=True)
    ds = CacheDataset(cfg, info, samples)
    frames, prevs = samples.frames.tolist(), samples.prev.tolist()
    items = list(zip(frames, prevs, range(len(frames)), strict=True))

    def cached(f: int, p: int, k: int) -> None:
        collate([ds[(k, 0)]])

    results = {"cache (teacher features read)": rate(cached, items, args.rounds)}
    online = Online(args.store, cfg, teacher=False)
    results["online, teacher excluded"] = rate(
        lambda f, p, k: online.sample(f, p, k), items, args.rounds
    )
    if jpegs is not None:
        real = Online(args.store, cfg, teacher=False, jpegs=jpegs)
        results["online, teacher excluded, real 1600x900 JPEGs"] = rate(
            lambda f, p, k: real.sample(f, p, k), items, args.rounds
        )
    online_t = Online(args.store, cfg, teacher=True)
    results["online + teacher forward (CPU)"] = rate(
        lambda f, p, k: online_t.sample(f, p, k), items, 1
    )
    base = results["cache (teacher features read)"]
    trips = round_trips(ds.reader, lambda: ds[(0, 0)])
    print(f"{len(items)} samples (t-1, t0, t+1) of {args.store}, 1 thread")
    print(f"Zarr round trips per cached sample: {trips}")
    print("| path | samples/s per core | cache / path |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r:.2f} | {base / r:.1f}x |")
    print("\nwhere the cache path's time goes (top functions by own time):")
    print(profile_summary(cached, items))
    if decode is not None:
        one, two = decode
        print(
            f"\nCPU decode + resize of one real frame's {len(jpegs)} JPEGs (1600x900 -> "
            f"448x224; both cores): 1 thread {one:.2f} frames/s, 2 threads {two:.2f} frames/s "
            f"({two / one:.2f}x)"
        )


if __name__ == "__main__":
    main()
