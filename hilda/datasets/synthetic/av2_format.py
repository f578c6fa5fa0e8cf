"""Serialise synthetic scenes as Argoverse 2 sensor-dataset logs that av2 loads.

Layout per log: ``<split>/<log_id>/sensors/lidar/<ts_ns>.feather`` (x, y, z float16 in the
ego frame, intensity u8, laser_number u8, offset_ns u32), ``sensors/cameras/<cam>/<ts_ns>.jpg``,
``city_SE3_egovehicle.feather`` (a pose at every LiDAR and camera timestamp),
``calibration/intrinsics.feather``, ``calibration/egovehicle_SE3_sensor.feather`` and a
``map/log_map_archive_*.json``. Sweeps are 10 Hz; ring-camera images are written only at
keyframe sweeps (every ``keyframe_every`` sweeps), which is all the readers use; sweeps are
instantaneous, so ``offset_ns`` is 0.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pyarrow import feather

from hilda.datasets.synthetic.generate import (
    SyntheticConfig,
    is_val_scene,
    scene_world,
    simulate_scene,
    token,
    write_class_map,
)
from hilda.geometry import apply, matrix_to_quat

SCENE_START_NS = 315_969_000_000_000_000


def _pose_row(transform: np.ndarray) -> dict:
    q = matrix_to_quat(transform[:3, :3])
    t = transform[:3, 3]
    return {
        "qw": q[0],
        "qx": q[1],
        "qy": q[2],
        "qz": q[3],
        "tx_m": t[0],
        "ty_m": t[1],
        "tz_m": t[2],
    }


def log_id_of(seed: int, scene: int) -> str:
    return str(uuid.UUID(token(seed, "av2-log", scene)))


def write_av2(
    cfg: SyntheticConfig, progress: Callable[[str], None] | None = None
) -> dict[str, int]:
    """Write the world of ``cfg`` as Argoverse 2 sensor logs (feather sweeps, poses and
    calibration, JPEGs, class maps) under ``cfg.out/{train,val}``; returns what was written."""
    counts = {"scenes": 0, "sweeps": 0, "keyframes": 0, "points": 0, "images": 0}
    for si in range(cfg.scenes):
        split = "val" if is_val_scene(si, cfg.scenes) else "train"
        log_dir = Path(cfg.out) / split / log_id_of(cfg.seed, si)
        for sub in ("calibration", "sensors/lidar", "map"):
            (log_dir / sub).mkdir(parents=True, exist_ok=True)
        for cam in cfg.rig.cameras:
            (log_dir / "sensors" / "cameras" / cam.name).mkdir(parents=True, exist_ok=True)
        _write_calibration(cfg, log_dir)
        _write_log(cfg, si, log_dir, counts, progress)
        counts["scenes"] += 1
    return counts


def _write_calibration(cfg: SyntheticConfig, log_dir: Path) -> None:
    """Extrinsics, intrinsics and an empty vector map of one log."""
    rig = cfg.rig
    # The AV2 roof carries two stacked 32-beam LiDARs, the lower one mounted upside down;
    # their merged sweep is what the simulated 64-beam LiDAR produces.
    down = rig.lidar.lidar_to_ego() @ np.diag([1.0, -1.0, -1.0, 1.0])
    down[2, 3] -= 0.1
    extr = [
        {"sensor_name": "up_lidar", **_pose_row(rig.lidar.lidar_to_ego())},
        {"sensor_name": "down_lidar", **_pose_row(down)},
    ]
    intr = []
    for cam in rig.cameras:
        extr.append({"sensor_name": cam.name, **_pose_row(cam.cam_to_ego())})
        w, h = cam.size(cfg.resolved_image_size)
        k = cam.intrinsics(w, h)
        intr.append(
            {
                "sensor_name": cam.name,
                "fx_px": k[0, 0],
                "fy_px": k[1, 1],
                "cx_px": k[0, 2],
                "cy_px": k[1, 2],
                "k1": 0.0,
                "k2": 0.0,
                "k3": 0.0,
                "height_px": h,
                "width_px": w,
            }
        )
    calibration = log_dir / "calibration"
    feather.write_feather(pd.DataFrame(extr), calibration / "egovehicle_SE3_sensor.feather")
    feather.write_feather(pd.DataFrame(intr), calibration / "intrinsics.feather")
    (log_dir / "map" / f"log_map_archive_{log_dir.name}____SYN_city_00000.json").write_text(
        json.dumps({"lane_segments": {}, "pedestrian_crossings": {}, "drivable_areas": {}})
    )


def _write_log(
    cfg: SyntheticConfig,
    si: int,
    log_dir: Path,
    counts: dict[str, int],
    progress: Callable[[str], None] | None,
) -> None:
    """Every 10 Hz sweep of scene ``si``, the keyframes' images, and the poses of both."""
    start_ns = SCENE_START_NS + si * 3_600_000_000_000
    world = scene_world(cfg, si, start_ns // 1000)
    poses: dict[int, np.ndarray] = {}
    rng = np.random.default_rng([cfg.seed, si, 11])
    lidar_to_ego = cfg.rig.lidar.lidar_to_ego()
    # AV2 sweeps are 10 Hz: a keyframe every k sweeps is k * 100 ms apart.
    per_key = cfg.keyframe_every
    rig = replace(cfg.rig, keyframe_period_us=per_key * cfg.rig.sweep_period_us)
    size = cfg.resolved_image_size
    for rec in simulate_scene(world, rig, cfg.frames_per_scene, per_key, size, rng):
        ts_ns = rec.t_us * 1000
        poses[ts_ns] = rec.ego_to_global
        sw = rec.sweep
        xyz = apply(lidar_to_ego, sw.points).astype(np.float16)  # AV2 sweeps: ego frame, fp16
        df = pd.DataFrame(
            {
                "x": xyz[:, 0],
                "y": xyz[:, 1],
                "z": xyz[:, 2],
                "intensity": sw.intensity.astype(np.uint8),
                "laser_number": sw.ring.astype(np.uint8),
                "offset_ns": np.zeros(len(xyz), dtype=np.uint32),
            }
        )
        feather.write_feather(df, log_dir / "sensors" / "lidar" / f"{ts_ns}.feather")
        counts["sweeps"] += 1
        counts["points"] += len(xyz)
        for cam, t_us, pose, img in rec.images:
            poses[t_us * 1000] = pose
            path = log_dir / "sensors" / "cameras" / cam.name / f"{t_us * 1000}.jpg"
            Image.fromarray(img.rgb).save(path, quality=cfg.jpeg_quality)
            write_class_map(path, img.label)
            counts["images"] += 1
        if rec.keyframe is not None:
            counts["keyframes"] += 1
            if progress:
                progress(f"{log_dir.name} keyframe {rec.keyframe + 1}/{cfg.frames_per_scene}")
    rows = [{"timestamp_ns": ts, **_pose_row(poses[ts])} for ts in sorted(poses)]
    feather.write_feather(pd.DataFrame(rows), log_dir / "city_SE3_egovehicle.feather")
