"""Training samples per second per CPU core: assembled from the hilda-prep cache, against the
online path on the same frames (read both sweeps, decode and resize the 12 images, project
and occlusion-filter the point-pixel pairs, read the t+1 sweep and rasterise its occupancy;
teacher excluded), and the online path with the teacher's forward on CPU included. One
process on one thread; ratios from the same run. Prints a table; not a test.

    .venv/bin/python benchmarks/loader_throughput.py [--store out/demo/cache.zarr] [--rounds 2]
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch

from hilda.cache import CacheReader
from hilda.datasets.io import read_sweep
from hilda.models.teacher import MultiLayerTeacher, build_teacher, parse_layers, preprocess
from hilda.pipeline.ops.occlusion import visible_mask
from hilda.pipeline.ops.occupancy import OccupancyConfig, ego_compensate, future_occupancy
from hilda.pipeline.ops.projection import frame_pairs
from hilda.pipeline.stages.pointmaps import BORDER_PX, MIN_DEPTH, PointmapConfig
from hilda.pipeline.stages.teacher import load_images
from hilda.train import augment
from hilda.train.config import TrainConfig
from hilda.train.config_io import load_config
from hilda.train.data import CacheDataset, check_cache, collate, sample_index


class Online:
    """One training sample computed from the raw dataset files, as a trainer without the
    cache would (the same augmentation and alignment as the cached path)."""

    def __init__(self, store: str, cfg: TrainConfig, teacher: bool) -> None:
        reader = CacheReader(store, ["index", "occupancy"])
        self.index = reader.index()
        occ = reader.attrs("occupancy")
        grid = occ["grid"][0] if isinstance(occ["grid"], list) else occ["grid"]
        self.occ = OccupancyConfig(grid=int(grid), cell=float(occ["cell"]))
        t = reader.teacher()
        self.image_size = tuple(reader.attrs(f"teacher/{t.name}")["image_size"])
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="out/demo/cache.zarr")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)  # per core
    grid = CacheReader(args.store, ["occupancy"]).attrs("occupancy")["grid"]
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
    online_t = Online(args.store, cfg, teacher=True)
    results["online + teacher forward (CPU)"] = rate(
        lambda f, p, k: online_t.sample(f, p, k), items, 1
    )
    base = results["cache (teacher features read)"]
    print(f"{len(items)} samples (t-1, t0, t+1) of {args.store}, 1 thread")
    print("| path | samples/s per core | cache / path |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r:.2f} | {base / r:.1f}x |")


if __name__ == "__main__":
    main()
