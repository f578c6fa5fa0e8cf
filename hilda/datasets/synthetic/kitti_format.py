"""The synthetic world in the SemanticKITTI layout (``hilda.datasets.semantickitti``): a
64-beam velodyne at 10 Hz, every scan labelled with SemanticKITTI raw ids, sequences named so
the official split selects the synthetic train (00-07, 09, 10) and val (08) scenes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from hilda.datasets.classes import GENERAL_INDEX
from hilda.datasets.semantickitti import SPLITS
from hilda.datasets.synthetic.generate import SyntheticConfig, scene_world, simulate_scene
from hilda.errors import ConfigError

SCENE_START_US = 1_600_000_000_000_000
# velodyne -> camera 0 as in KITTI: camera x right (-y velo), y down (-z velo), z forward (x).
TR = np.array(
    [[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, -0.08], [1.0, 0.0, 0.0, -0.27], [0, 0, 0, 1.0]]
)
P = "7.188560e+02 0.0 6.071928e+02 0.0 0.0 7.188560e+02 1.852157e+02 0.0 0.0 0.0 1.0 0.0"
# The world's classes as SemanticKITTI raw ids (static, moving). Poles and tree trunks are
# labelled with their buildings / trees in the world, so they carry those ids here too; the
# cones, which KITTI has no class for, are "other-object" (ignored in evaluation).
RAW_IDS = {
    "flat.driveable_surface": (40, 40),
    "flat.sidewalk": (48, 48),
    "flat.terrain": (72, 72),
    "static.manmade": (50, 50),
    "static.vegetation": (70, 70),
    "vehicle.car": (10, 252),
    "vehicle.truck": (18, 258),
    "human.pedestrian.adult": (30, 254),
    "movable_object.barrier": (51, 51),
    "movable_object.trafficcone": (99, 99),
}


def raw_lut() -> tuple[np.ndarray, np.ndarray]:
    """(256,) uint32 general category -> static and moving raw id (0 = unlabelled)."""
    static, moving = np.zeros(256, np.uint32), np.zeros(256, np.uint32)
    for name, (s, m) in RAW_IDS.items():
        static[GENERAL_INDEX[name]], moving[GENERAL_INDEX[name]] = s, m
    return static, moving


def sequence_names(scenes: int) -> list[str]:
    """The sequence of each scene: the last scene (of two or more) is the val sequence 08, the
    others take the train sequences 00-07, 09, 10 in order (11 scenes fill the official
    split)."""
    train, val = list(SPLITS["train"]), SPLITS["val"][0]
    if scenes - (scenes >= 2) > len(train):
        raise ConfigError(
            f"the SemanticKITTI layout has room for {len(train)} train sequences and one val "
            f"sequence, not {scenes} scenes"
        )
    return [val if scenes >= 2 and i == scenes - 1 else train.pop(0) for i in range(scenes)]


def write_semantickitti(
    cfg: SyntheticConfig, progress: Callable[[str], None] | None = None
) -> dict[str, int]:
    """Write ``cfg.scenes`` sequences of ``cfg.frames_per_scene`` scans under
    ``cfg.out/sequences``; returns what was written."""
    counts = {"sequences": 0, "scans": 0, "points": 0}
    static, moving = raw_lut()
    for si, name in enumerate(sequence_names(cfg.scenes)):
        folder = Path(cfg.out) / "sequences" / name
        (folder / "velodyne").mkdir(parents=True, exist_ok=True)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        world = scene_world(cfg, si, SCENE_START_US + si * 3_600_000_000)
        movers = np.array([m.instance for m in world.movers])
        lidar_to_ego = cfg.rig.lidar.lidar_to_ego()
        rng = np.random.default_rng([cfg.seed, si, 13])
        poses = []
        for rec in simulate_scene(world, cfg.rig, cfg.frames_per_scene, 1, (16, 16), rng):
            sw, stem = rec.sweep, f"{rec.keyframe:06d}"
            remission = (sw.intensity / 255.0).astype(np.float32)
            scan = np.column_stack([sw.points.astype(np.float32), remission])
            scan.tofile(folder / "velodyne" / f"{stem}.bin")
            raw = np.where(np.isin(sw.instance, movers), moving[sw.label], static[sw.label])
            label = (sw.instance.astype(np.uint32) & 0xFFFF) << 16 | raw
            label.astype(np.uint32).tofile(folder / "labels" / f"{stem}.label")
            poses.append(rec.ego_to_global @ lidar_to_ego @ np.linalg.inv(TR))  # camera 0
            counts["scans"] += 1
            counts["points"] += len(scan)
            if progress:
                progress(f"sequence {name} scan {rec.keyframe + 1}/{cfg.frames_per_scene}")
        first = np.linalg.inv(poses[0])
        rows = [(first @ p)[:3].reshape(-1) for p in poses]
        np.savetxt(folder / "poses.txt", np.array(rows), fmt="%.9e")
        lines = [f"P{i}: {P}" for i in range(4)]
        lines.append("Tr: " + " ".join(f"{x:.9e}" for x in TR[:3].reshape(-1)))
        (folder / "calib.txt").write_text("\n".join(lines) + "\n")
        counts["sequences"] += 1
    return counts
