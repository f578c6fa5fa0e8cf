"""Frames a second one process reads from a Waymo v2 world (every LiDAR, both returns, the
TOP labels: what a segmentation loader worker does a frame), with the share spent in parquet
decoding and in the range image conversion. Prints a table; not a test.

    .venv/bin/python benchmarks/waymo_read.py [--root DIR] [--frames 20]

Without ``--root`` it writes a synthetic v2 world (``hilda-prep make-synthetic --format
waymo``: a TOP range image of 32 x 256 and four of 8 x 48, so about 9k points a frame against
a real frame's ~170k) under ``out/bench/`` once. The figure to take to a real release is the
conversion's cost a pixel (it is vectorised over the image) and the decoding's a byte.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from hilda.datasets import waymo
from hilda.datasets.labelled import WAYMO
from hilda.datasets.synthetic.generate import SyntheticConfig, make_synthetic


def world(frames: int) -> Path:
    out = Path(f"out/bench/waymo-{frames}")
    if not (out / "training" / "lidar").is_dir():
        make_synthetic(
            SyntheticConfig(format="waymo", out=out, scenes=3, frames_per_scene=frames, seed=0)
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path)
    ap.add_argument("--frames", type=int, default=20, help="frames a segment of the world")
    args = ap.parse_args()
    root = args.root or world(args.frames)
    split = WAYMO.open_split(str(root), "training", None)
    WAYMO.read(split, split.frames[0])  # opens the files (kept open per process)
    start = time.perf_counter()
    points = 0
    for frame in split.frames:
        xyz, _ = WAYMO.read(split, frame)
        points += len(xyz)
    total = time.perf_counter() - start
    # The conversion alone, on the frames' TOP range images (decoded once here).
    seg = waymo.Segment(str(root), "training", split.scenes[0])
    stamp = seg.labelled()[0]
    col = f"{waymo.LIDAR}.range_image_return1"
    row = seg.component("lidar").row(stamp, waymo.TOP, [f"{col}.values", f"{col}.shape"], "b")
    image = np.asarray(row[f"{col}.values"], np.float32).reshape(row[f"{col}.shape"])
    pose_col = f"{waymo.PIXEL_POSE}.range_image_return1"
    prow = seg.component("lidar_pose").row(
        stamp, waymo.TOP, [f"{pose_col}.values", f"{pose_col}.shape"], "b"
    )
    pose = np.asarray(prow[f"{pose_col}.values"], np.float64).reshape(prow[f"{pose_col}.shape"])
    incl = np.linspace(-0.3, 0.04, image.shape[0])[::-1]
    reps = 50
    t0 = time.perf_counter()
    for _ in range(reps):
        waymo.range_image_points(image, np.eye(4), incl, pose, np.eye(4))
    convert = (time.perf_counter() - t0) / reps
    pixels = image.shape[0] * image.shape[1]
    n = len(split.frames)
    print(f"world {root}: {n} labelled training frames, {points / n:.0f} points a frame")
    print("| frames/s (1 process) | ms a frame | TOP conversion ms (pixels) | ns a pixel |")
    print("|---:|---:|---:|---:|")
    print(
        f"| {n / total:.1f} | {1000 * total / n:.1f} | {1000 * convert:.2f} ({pixels:,}) | "
        f"{1e9 * convert / pixels:.0f} |"
    )


if __name__ == "__main__":
    main()
