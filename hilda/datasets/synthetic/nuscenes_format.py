"""Serialise synthetic scenes as a nuScenes version folder that nuscenes-devkit loads.

Writes the JSON tables (category with lidarseg indices, attribute, visibility, instance,
sensor, calibrated_sensor, ego_pose, log, scene, sample, sample_data, sample_annotation, map,
lidarseg), ``samples/LIDAR_TOP/*.pcd.bin`` (5 float32 per point: x, y, z, intensity, ring),
``samples/CAM_*/*.jpg``, ``lidarseg/<version>/<token>_lidarseg.bin`` (uint8 general-category
label per point) and a semantic-prior map mask per log. Keyframes only (2 Hz), no
intermediate sweeps; no 3D box annotations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from nuscenes.utils.splits import create_splits_scenes
from PIL import Image

from hilda.datasets.classes import GENERAL_CATEGORIES
from hilda.datasets.synthetic.generate import (
    SyntheticConfig,
    is_val_scene,
    scene_world,
    simulate_scene,
    token,
    write_class_map,
)
from hilda.datasets.synthetic.world import ROAD_HALF_WIDTH, World
from hilda.errors import ConfigError
from hilda.geometry import matrix_to_quat

SCENE_START_US = 1_532_402_900_000_000
MAP_RESOLUTION = 0.1  # metres per pixel of the semantic-prior mask, as in nuScenes

# The tables nuscenes-devkit's NuScenes() loads (lidarseg is optional, next to them).
TABLES = (
    "category",
    "attribute",
    "visibility",
    "instance",
    "sensor",
    "calibrated_sensor",
    "ego_pose",
    "log",
    "scene",
    "sample",
    "sample_data",
    "sample_annotation",
    "map",
)

SPLIT_NAMES = {"v1.0-mini": ("mini_train", "mini_val"), "v1.0-trainval": ("train", "val")}


def scene_names(version: str, scenes: int) -> list[str]:
    """Names of the synthetic scenes, taken from the devkit's split lists so that its train
    and val splits select the synthetic train and val scenes."""
    if version not in SPLIT_NAMES:
        raise ConfigError(f"synthetic nuScenes versions: {sorted(SPLIT_NAMES)}, got {version!r}")
    splits = create_splits_scenes(verbose=False)
    train, val = (list(splits[s]) for s in SPLIT_NAMES[version])
    names = []
    for i in range(scenes):
        pool = val if is_val_scene(i, scenes) else train
        if not pool:
            raise ConfigError(
                f"{version} has room for {len(splits[SPLIT_NAMES[version][0]])} train and "
                f"{len(splits[SPLIT_NAMES[version][1]])} val scenes; use --version v1.0-trainval "
                "for more scenes"
            )
        names.append(pool.pop(0))
    return names


def _pose(transform: np.ndarray) -> dict:
    return {
        "rotation": matrix_to_quat(transform[:3, :3]).tolist(),
        "translation": transform[:3, 3].tolist(),
    }


def _write_map(path: Path, world: World) -> None:
    """Drivable-area mask at 0.1 m per pixel, origin at global (0, 0), y pointing up."""
    corner = world.road.point(np.linspace(-100, 200, 64), 0.0)
    extent = float(np.ceil(corner.max() + 150.0))
    size = int(extent / MAP_RESOLUTION)
    mask = np.zeros((size, size), dtype=np.uint8)
    lo = np.clip(((corner.min(axis=0) - 20.0) / MAP_RESOLUTION).astype(int), 0, size)
    hi = np.clip(((corner.max(axis=0) + 20.0) / MAP_RESOLUTION).astype(int), 0, size)
    xs = (np.arange(lo[0], hi[0]) + 0.5) * MAP_RESOLUTION
    ys = (np.arange(lo[1], hi[1]) + 0.5) * MAP_RESOLUTION
    gx, gy = np.meshgrid(xs, ys)
    road = np.abs(world.road.lateral(np.stack([gx, gy], -1))) <= ROAD_HALF_WIDTH
    rows = size - 1 - np.arange(lo[1], hi[1])
    mask[rows[:, None], np.arange(lo[0], hi[0])[None, :]] = np.where(road, 255, 0)
    Image.fromarray(mask).save(path, optimize=False, compress_level=1)


def write_nuscenes(
    cfg: SyntheticConfig, progress: Callable[[str], None] | None = None
) -> dict[str, int]:
    root = Path(cfg.out)
    version = cfg.version
    rig = cfg.rig
    names = scene_names(version, cfg.scenes)
    width, height = cfg.resolved_image_size
    tables: dict[str, list[dict]] = {k: [] for k in (*TABLES, "lidarseg")}
    for i, name in enumerate(GENERAL_CATEGORIES):
        tables["category"].append(
            {"token": token("category", name), "name": name, "description": name, "index": i}
        )
    for i, level in enumerate(("v0-40", "v40-60", "v60-80", "v80-100"), start=1):
        tables["visibility"].append({"token": str(i), "level": level, "description": level})
    channels = [rig.lidar.name] + [c.name for c in rig.cameras]
    for ch in channels:
        modality = "lidar" if ch == rig.lidar.name else "camera"
        tables["sensor"].append({"token": token("sensor", ch), "channel": ch, "modality": modality})
    for sub in ["maps", f"lidarseg/{version}", *(f"samples/{ch}" for ch in channels)]:
        (root / sub).mkdir(parents=True, exist_ok=True)

    counts = {"scenes": 0, "samples": 0, "points": 0, "images": 0}
    for si, scene_name in enumerate(names):
        start_us = SCENE_START_US + si * 3_600_000_000
        world = scene_world(cfg, si, start_us)
        stamp = datetime.fromtimestamp(start_us / 1e6, tz=UTC)
        logfile = f"syn{cfg.seed:03d}-{stamp:%Y-%m-%d-%H-%M-%S}+0000"
        log_tok, scene_tok = token(cfg.seed, "log", si), token(cfg.seed, "scene", si)
        map_tok = token(cfg.seed, "map", si)
        tables["log"].append(
            {
                "token": log_tok,
                "logfile": logfile,
                "vehicle": "synthetic",
                "location": "synthetic-city",
                "date_captured": f"{stamp:%Y-%m-%d}",
            }
        )
        _write_map(root / "maps" / f"{map_tok}.png", world)
        tables["map"].append(
            {
                "token": map_tok,
                "log_tokens": [log_tok],
                "category": "semantic_prior",
                "filename": f"maps/{map_tok}.png",
            }
        )
        calib = {}
        lidar_cal = _pose(rig.lidar.lidar_to_ego())
        calib[rig.lidar.name] = token(cfg.seed, "calib", si, rig.lidar.name)
        tables["calibrated_sensor"].append(
            {
                "token": calib[rig.lidar.name],
                "sensor_token": token("sensor", rig.lidar.name),
                **lidar_cal,
                "camera_intrinsic": [],
            }
        )
        for cam in rig.cameras:
            calib[cam.name] = token(cfg.seed, "calib", si, cam.name)
            tables["calibrated_sensor"].append(
                {
                    "token": calib[cam.name],
                    "sensor_token": token("sensor", cam.name),
                    **_pose(cam.cam_to_ego()),
                    "camera_intrinsic": cam.intrinsics(*cam.size((width, height))).tolist(),
                }
            )
        sample_toks = [token(cfg.seed, "sample", si, k) for k in range(cfg.frames_per_scene)]
        sd_toks = {
            ch: [token(cfg.seed, "sd", si, ch, k) for k in range(cfg.frames_per_scene)]
            for ch in channels
        }
        rng = np.random.default_rng([cfg.seed, si, 7])
        for rec in simulate_scene(world, rig, cfg.frames_per_scene, 1, (width, height), rng):
            k = rec.keyframe
            tables["sample"].append(
                {
                    "token": sample_toks[k],
                    "timestamp": rec.t_us,
                    "scene_token": scene_tok,
                    "prev": sample_toks[k - 1] if k > 0 else "",
                    "next": sample_toks[k + 1] if k + 1 < cfg.frames_per_scene else "",
                }
            )
            shots = [(rig.lidar.name, rec.t_us, rec.ego_to_global, None)]
            shots += [(c.name, t, pose, img) for c, t, pose, img in rec.images]
            for ch, t, pose, img in shots:
                sd = sd_toks[ch][k]
                pose_tok = token(cfg.seed, "pose", si, ch, k)
                tables["ego_pose"].append({"token": pose_tok, "timestamp": t, **_pose(pose)})
                ext = "pcd.bin" if img is None else "jpg"
                filename = f"samples/{ch}/{logfile}__{ch}__{t}.{ext}"
                tables["sample_data"].append(
                    {
                        "token": sd,
                        "sample_token": sample_toks[k],
                        "ego_pose_token": pose_tok,
                        "calibrated_sensor_token": calib[ch],
                        "timestamp": t,
                        "fileformat": "pcd" if img is None else "jpg",
                        "is_key_frame": True,
                        "height": 0 if img is None else int(img.rgb.shape[0]),
                        "width": 0 if img is None else int(img.rgb.shape[1]),
                        "filename": filename,
                        "prev": sd_toks[ch][k - 1] if k > 0 else "",
                        "next": sd_toks[ch][k + 1] if k + 1 < cfg.frames_per_scene else "",
                    }
                )
                if img is None:
                    sw = rec.sweep
                    pts = np.column_stack([sw.points, sw.intensity, sw.ring]).astype(np.float32)
                    pts.tofile(root / filename)
                    label_file = f"lidarseg/{version}/{sd}_lidarseg.bin"
                    sw.label.astype(np.uint8).tofile(root / label_file)
                    tables["lidarseg"].append(
                        {"token": sd, "sample_data_token": sd, "filename": label_file}
                    )
                    counts["points"] += len(pts)
                else:
                    Image.fromarray(img.rgb).save(root / filename, quality=cfg.jpeg_quality)
                    write_class_map(root / filename, img.label)
                    counts["images"] += 1
            counts["samples"] += 1
            if progress:
                progress(f"{scene_name} keyframe {k + 1}/{cfg.frames_per_scene}")
        tables["scene"].append(
            {
                "token": scene_tok,
                "log_token": log_tok,
                "nbr_samples": cfg.frames_per_scene,
                "first_sample_token": sample_toks[0],
                "last_sample_token": sample_toks[-1],
                "name": scene_name,
                "description": f"synthetic world, seed {cfg.seed}, scene {si}",
            }
        )
        counts["scenes"] += 1
    table_dir = root / version
    table_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        (table_dir / f"{name}.json").write_text(json.dumps(rows, indent=0))
    return counts
