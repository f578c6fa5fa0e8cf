"""Cost of the synthetic world's sensors on this machine: one LiDAR sweep and one camera
image per rig, at a few image sizes. Prints a table; not a test.

    .venv/bin/python benchmarks/synthetic_world.py
"""

from __future__ import annotations

import time

import numpy as np

from hilda.datasets.synthetic.render import AV2_RIG, NUSCENES_RIG, render_camera, scan_lidar
from hilda.datasets.synthetic.world import make_world


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    world = make_world(seed=0, scene_index=0, duration_s=3.0, start_us=0)
    print(f"{'rig':10} {'sensor':22} {'size':>10} {'seconds':>8} {'points/pixels':>14}")
    for name, rig in (("nuscenes", NUSCENES_RIG), ("av2", AV2_RIG)):
        rng = np.random.default_rng(0)
        sweep = scan_lidar(world, rig, 1_000_000, rng)
        t = best_of(lambda rig=rig, rng=rng: scan_lidar(world, rig, 1_000_000, rng))
        beams = f"{rig.lidar.beams}x{rig.lidar.azimuths}"
        print(f"{name:10} {rig.lidar.name:22} {beams:>10} {t:8.3f} {len(sweep.points):>14,}")
        cam = rig.cameras[0]
        for size in ((400, 225), (800, 450), (1600, 900)):
            w, h = cam.size(size)
            t = best_of(lambda cam=cam, w=w, h=h: render_camera(world, cam, w, h, 1_000_000), 1)
            print(f"{name:10} {cam.name:22} {f'{w}x{h}':>10} {t:8.3f} {w * h:>14,}")


if __name__ == "__main__":
    main()
