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
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path

import numpy as np
from nuscenes.utils.splits import create_splits_scenes
from PIL import Image

from hilda.datasets.classes import GENERAL_CATEGORIES
from hilda.datasets.synthetic.generate import (
    SyntheticConfig,
    scene_world,
    simulate_scene,
    token,
    write_class_map,
)
from hilda.datasets.synthetic.world import ROAD_HALF_WIDTH, World, scene_road
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
    and val splits select the synthetic train and val scenes: the last fifth are val (at
    most as many as the version's val split holds: 850 trainval scenes split 700 / 150, as
    the real ones do)."""
    if version not in SPLIT_NAMES:
        raise ConfigError(f"synthetic nuScenes versions: {sorted(SPLIT_NAMES)}, got {version!r}")
    splits = create_splits_scenes(verbose=False)
    train, val = (list(splits[s]) for s in SPLIT_NAMES[version])
    n_val = min(len(val), scenes - 1, max(1, scenes // 5)) if scenes >= 2 else 0
    if scenes - n_val > len(train):
        more = " (use --version v1.0-trainval)" if version != "v1.0-trainval" else ""
        raise ConfigError(
            f"{version} has room for {len(train)} train and {len(val)} val scenes, not "
            f"{scenes}{more}"
        )
    return train[: scenes - n_val] + val[:n_val]


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
    """Write the world of ``cfg`` as a nuScenes dataset (tables, sweeps, JPEGs, lidarseg
    labels, map masks, class maps) under ``cfg.out``; returns what was written.

    Scenes are independent: with ``cfg.workers > 1`` they are simulated and written by a
    process pool (a one-off writer with no shared state, so a stdlib pool rather than a
    Dask cluster); their table rows are merged in scene order, so the output does not depend
    on the number of workers.
    """
    root, rig = Path(cfg.out), cfg.rig
    names = scene_names(cfg.version, cfg.scenes)
    channels = [rig.lidar.name] + [c.name for c in rig.cameras]
    for sub in ["maps", f"lidarseg/{cfg.version}", *(f"samples/{ch}" for ch in channels)]:
        (root / sub).mkdir(parents=True, exist_ok=True)
    tables = _static_tables(channels, rig.lidar.name)
    counts = {"scenes": 0, "samples": 0, "points": 0, "images": 0}
    for name, part, written in _map_scenes(cfg, names):
        for table, rows in part.items():
            tables[table].extend(rows)
        for key, value in written.items():
            counts[key] += value
        if progress:
            for k in range(cfg.frames_per_scene):
                progress(f"{name} keyframe {k + 1}/{cfg.frames_per_scene}")
    if cfg.shared_map:
        tables["map"].append(_write_shared_map(cfg, [row["token"] for row in tables["log"]]))
    table_dir = root / cfg.version
    table_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        (table_dir / f"{name}.json").write_text(json.dumps(rows, indent=0))
    return counts


def _map_scenes(
    cfg: SyntheticConfig, names: list[str]
) -> Iterator[tuple[str, dict[str, list[dict]], dict[str, int]]]:
    """(name, table rows, counts) of every scene, in scene order."""
    if cfg.workers <= 1:
        for si, name in enumerate(names):
            yield name, *write_scene(cfg, si, name)
        return
    # spawn, not fork: the parent may hold threads (BLAS, a progress bar).
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
        results = pool.map(write_scene, repeat(cfg), range(len(names)), names)
        for name, (part, written) in zip(names, results, strict=True):
            yield name, part, written


def _static_tables(channels: list[str], lidar: str) -> dict[str, list[dict]]:
    """Every table, with the rows that do not depend on the scenes filled in."""
    tables: dict[str, list[dict]] = {k: [] for k in (*TABLES, "lidarseg")}
    for i, name in enumerate(GENERAL_CATEGORIES):
        tables["category"].append(
            {"token": token("category", name), "name": name, "description": name, "index": i}
        )
    for i, level in enumerate(("v0-40", "v40-60", "v60-80", "v80-100"), start=1):
        tables["visibility"].append({"token": str(i), "level": level, "description": level})
    for ch in channels:
        modality = "lidar" if ch == lidar else "camera"
        tables["sensor"].append({"token": token("sensor", ch), "channel": ch, "modality": modality})
    return tables


def write_scene(
    cfg: SyntheticConfig, si: int, name: str
) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Simulate scene ``si`` and write its files; returns its table rows and counts."""
    writer = _SceneWriter(cfg)
    writer.scene(si, name)
    return writer.tables, writer.counts


def _write_shared_map(cfg: SyntheticConfig, log_tokens: list[str]) -> dict:
    """One semantic-prior mask for every log, as nuScenes has one map per city: the union of
    the scenes' drivable areas (the road band |lateral| <= ROAD_HALF_WIDTH, arc lengths
    -120..220 m), at 0.1 m per pixel with the origin at global (0, 0), y pointing up."""
    roads = [scene_road(cfg.seed, si) for si in range(cfg.scenes)]
    s = np.arange(-120.0, 220.0, 0.07)  # steps under a pixel, also on the outer edge
    lat = np.arange(-ROAD_HALF_WIDTH, ROAD_HALF_WIDTH + 1e-9, 0.07)
    ss, ll = (g.ravel() for g in np.meshgrid(s, lat))
    extent = max(float(np.ceil(r.point(s, 0.0).max() + 150.0)) for r in roads)
    size = int(extent / MAP_RESOLUTION)
    mask = np.zeros((size, size), dtype=np.uint8)
    for road in roads:
        px = np.floor(road.point(ss, ll) / MAP_RESOLUTION).astype(np.int64)  # (P, 2)
        ok = np.all((px >= 0) & (px < size), axis=1)
        mask[size - 1 - px[ok, 1], px[ok, 0]] = 255
    map_tok = token(cfg.seed, "map", "shared")
    Image.fromarray(mask).save(
        Path(cfg.out) / "maps" / f"{map_tok}.png", optimize=False, compress_level=1
    )
    return {
        "token": map_tok,
        "log_tokens": log_tokens,
        "category": "semantic_prior",
        "filename": f"maps/{map_tok}.png",
    }


class _SceneWriter:
    """One scene's table rows, and the files they name."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg, self.root, self.rig = cfg, Path(cfg.out), cfg.rig
        self.size = cfg.resolved_image_size  # (W, H)
        self.tables: dict[str, list[dict]] = {
            k: [] for k in ("log", "map", "calibrated_sensor", "sample", "ego_pose",
                            "sample_data", "lidarseg", "scene")
        }  # fmt: skip
        self.counts = {"scenes": 0, "samples": 0, "points": 0, "images": 0}
        self.channels = [self.rig.lidar.name] + [c.name for c in self.rig.cameras]

    def scene(self, si: int, name: str) -> None:
        cfg, frames = self.cfg, self.cfg.frames_per_scene
        start_us = SCENE_START_US + si * 3_600_000_000
        world = scene_world(cfg, si, start_us)
        stamp = datetime.fromtimestamp(start_us / 1e6, tz=UTC)
        logfile = f"syn{cfg.seed:03d}-{stamp:%Y-%m-%d-%H-%M-%S}+0000"
        log_tok = token(cfg.seed, "log", si)
        self._log_and_map(si, world, logfile, log_tok, stamp)
        calib = self._calibration(si)
        samples = [token(cfg.seed, "sample", si, k) for k in range(frames)]
        scene_tok = token(cfg.seed, "scene", si)
        rng = np.random.default_rng([cfg.seed, si, 7])
        for rec in simulate_scene(world, self.rig, frames, 1, self.size, rng):
            self._keyframe(si, rec, samples, scene_tok, logfile, calib)
        self.tables["scene"].append(
            {
                "token": scene_tok,
                "log_token": log_tok,
                "nbr_samples": frames,
                "first_sample_token": samples[0],
                "last_sample_token": samples[-1],
                "name": name,
                "description": f"synthetic world, seed {cfg.seed}, scene {si}",
            }
        )
        self.counts["scenes"] += 1

    def _log_and_map(self, si: int, world: World, logfile: str, log_tok: str, stamp) -> None:
        self.tables["log"].append(
            {
                "token": log_tok,
                "logfile": logfile,
                "vehicle": "synthetic",
                "location": "synthetic-city",
                "date_captured": f"{stamp:%Y-%m-%d}",
            }
        )
        if self.cfg.shared_map:  # written once for all logs by write_nuscenes
            return
        map_tok = token(self.cfg.seed, "map", si)
        _write_map(self.root / "maps" / f"{map_tok}.png", world)
        self.tables["map"].append(
            {
                "token": map_tok,
                "log_tokens": [log_tok],
                "category": "semantic_prior",
                "filename": f"maps/{map_tok}.png",
            }
        )

    def _calibration(self, si: int) -> dict[str, str]:
        """The scene's calibrated_sensor rows; channel -> token."""
        rig, seed = self.rig, self.cfg.seed
        calib = {ch: token(seed, "calib", si, ch) for ch in self.channels}
        rows = [(rig.lidar.name, _pose(rig.lidar.lidar_to_ego()), [])]
        rows += [
            (c.name, _pose(c.cam_to_ego()), c.intrinsics(*c.size(self.size)).tolist())
            for c in rig.cameras
        ]
        for ch, pose, intrinsic in rows:
            self.tables["calibrated_sensor"].append(
                {
                    "token": calib[ch],
                    "sensor_token": token("sensor", ch),
                    **pose,
                    "camera_intrinsic": intrinsic,
                }
            )
        return calib

    def _keyframe(self, si, rec, samples: list[str], scene_tok, logfile, calib) -> None:
        k, frames, seed = rec.keyframe, self.cfg.frames_per_scene, self.cfg.seed
        self.tables["sample"].append(
            {
                "token": samples[k],
                "timestamp": rec.t_us,
                "scene_token": scene_tok,
                "prev": samples[k - 1] if k > 0 else "",
                "next": samples[k + 1] if k + 1 < frames else "",
            }
        )
        shots = [(self.rig.lidar.name, rec.t_us, rec.ego_to_global, None)]
        shots += [(c.name, t, pose, img) for c, t, pose, img in rec.images]
        for ch, t, pose, img in shots:
            sd = [token(seed, "sd", si, ch, j) for j in (k - 1, k, k + 1)]
            pose_tok = token(seed, "pose", si, ch, k)
            self.tables["ego_pose"].append({"token": pose_tok, "timestamp": t, **_pose(pose)})
            ext = "pcd.bin" if img is None else "jpg"
            filename = f"samples/{ch}/{logfile}__{ch}__{t}.{ext}"
            self.tables["sample_data"].append(
                {
                    "token": sd[1],
                    "sample_token": samples[k],
                    "ego_pose_token": pose_tok,
                    "calibrated_sensor_token": calib[ch],
                    "timestamp": t,
                    "fileformat": "pcd" if img is None else "jpg",
                    "is_key_frame": True,
                    "height": 0 if img is None else int(img.rgb.shape[0]),
                    "width": 0 if img is None else int(img.rgb.shape[1]),
                    "filename": filename,
                    "prev": sd[0] if k > 0 else "",
                    "next": sd[2] if k + 1 < frames else "",
                }
            )
            if img is None:
                self._sweep(rec.sweep, sd[1], filename)
            else:
                Image.fromarray(img.rgb).save(self.root / filename, quality=self.cfg.jpeg_quality)
                write_class_map(self.root / filename, img.label)
                self.counts["images"] += 1
        self.counts["samples"] += 1

    def _sweep(self, sweep, sd: str, filename: str) -> None:
        """The .pcd.bin sweep (x, y, z, intensity, ring) and its lidarseg labels."""
        pts = np.column_stack([sweep.points, sweep.intensity, sweep.ring]).astype(np.float32)
        pts.tofile(self.root / filename)
        label_file = f"lidarseg/{self.cfg.version}/{sd}_lidarseg.bin"
        sweep.label.astype(np.uint8).tofile(self.root / label_file)
        self.tables["lidarseg"].append(
            {"token": sd, "sample_data_token": sd, "filename": label_file}
        )
        self.counts["points"] += len(pts)
