"""Write a one-sample nuScenes table set around the real keyframe in ../shared (its files are
linked, never copied), from the calibration mmdetection3d recorded in ``calib.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from hilda.datasets.classes import GENERAL_CATEGORIES
from hilda.datasets.synthetic.nuscenes_format import TABLES
from hilda.geometry import invert, matrix_to_quat

VERSION = "v1.0-mini"


def _pose(t: np.ndarray) -> dict:
    return {"rotation": matrix_to_quat(t[:3, :3]).tolist(), "translation": t[:3, 3].tolist()}


def camera_ego_to_global(calib: dict, cam: dict) -> np.ndarray:
    """The ego pose at the camera's timestamp, recovered from lidar2cam:
    lidar2cam = inv(cam2ego) inv(ego2global_cam) ego2global_lidar lidar2ego."""
    lidar2ego = np.array(calib["lidar"]["lidar2ego"])
    ego2global = np.array(calib["ego2global"])
    return (
        ego2global
        @ lidar2ego
        @ invert(np.array(cam["lidar2cam"]))
        @ invert(np.array(cam["cam2ego"]))
    )


def write_real_keyframe_tables(src: Path, root: Path) -> dict:
    calib = json.loads((src / "calib.json").read_text())
    tables: dict[str, list] = {k: [] for k in TABLES}
    tables["category"] = [
        {"token": f"c{i}", "name": n, "description": n, "index": i}
        for i, n in enumerate(GENERAL_CATEGORIES)
    ]
    (root / "maps").mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "maps" / "m.png")
    tables["log"] = [
        {
            "token": "log",
            "logfile": "n015-2018-07-24-11-22-45+0800",
            "vehicle": "n015",
            "date_captured": "2018-07-24",
            "location": "singapore-onenorth",
        }
    ]
    tables["map"] = [
        {
            "token": "map",
            "log_tokens": ["log"],
            "category": "semantic_prior",
            "filename": "maps/m.png",
        }
    ]
    sample = calib["sample_token"]
    ts = round(calib["timestamp_s"] * 1e6)
    tables["scene"] = [
        {
            "token": "scene",
            "log_token": "log",
            "nbr_samples": 1,
            "first_sample_token": sample,
            "last_sample_token": sample,
            "name": "scene-0061",
            "description": "real keyframe",
        }
    ]
    tables["sample"] = [
        {"token": sample, "timestamp": ts, "prev": "", "next": "", "scene_token": "scene"}
    ]
    shots = [
        (
            "LIDAR_TOP",
            calib["lidar"]["file"],
            ts,
            np.array(calib["lidar"]["lidar2ego"]),
            np.array(calib["ego2global"]),
            [],
            "lidar",
            "lidar-sd",
            0,
            0,
        )
    ]
    for name, cam in calib["cameras"].items():
        shots.append(
            (
                name,
                cam["file"],
                round(cam["timestamp_s"] * 1e6),
                np.array(cam["cam2ego"]),
                camera_ego_to_global(calib, cam),
                cam["cam2img"],
                "camera",
                cam["sample_data_token"],
                1600,
                900,
            )
        )
    for ch, file, t, sensor_to_ego, ego_to_global, k, modality, sd, w, h in shots:
        folder = root / "samples" / ch
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(src / file, folder / file)
        tables["sensor"].append({"token": f"s-{ch}", "channel": ch, "modality": modality})
        tables["calibrated_sensor"].append(
            {
                "token": f"cs-{ch}",
                "sensor_token": f"s-{ch}",
                **_pose(sensor_to_ego),
                "camera_intrinsic": k,
            }
        )
        tables["ego_pose"].append({"token": f"ep-{ch}", "timestamp": t, **_pose(ego_to_global)})
        tables["sample_data"].append(
            {
                "token": sd,
                "sample_token": sample,
                "ego_pose_token": f"ep-{ch}",
                "calibrated_sensor_token": f"cs-{ch}",
                "timestamp": t,
                "fileformat": "jpg" if w else "pcd",
                "is_key_frame": True,
                "height": h,
                "width": w,
                "filename": f"samples/{ch}/{file}",
                "prev": "",
                "next": "",
            }
        )
    (root / VERSION).mkdir()
    for name, rows in tables.items():
        (root / VERSION / f"{name}.json").write_text(json.dumps(rows))
    return calib
