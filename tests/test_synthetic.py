"""The synthetic world: deterministic, real sensor rigs, dense sweeps, every class present;
the ray caster against an exhaustive reference; the scale mode's trainval-sized layout."""

from __future__ import annotations

import filecmp
import hashlib
from pathlib import Path

import numpy as np

from hilda.datasets.classes import GENERAL_INDEX
from hilda.datasets.synthetic.generate import SyntheticConfig, make_synthetic, scale_config
from hilda.datasets.synthetic.raycast import KIND_BOX, KIND_CYLINDER, cast
from hilda.datasets.synthetic.render import AV2_RIG, NUSCENES_RIG, render_camera, scan_lidar
from hilda.datasets.synthetic.world import make_world


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_deterministic_for_a_seed(tmp_path: Path, nusc_cfg: SyntheticConfig) -> None:
    again = SyntheticConfig(**{**nusc_cfg.__dict__, "out": tmp_path / "again"})
    make_synthetic(again)
    assert _digest(again.out) == _digest(nusc_cfg.out)
    other = SyntheticConfig(
        **{**nusc_cfg.__dict__, "out": tmp_path / "other", "seed": 99, "scenes": 1}
    )
    make_synthetic(other)
    a = sorted((nusc_cfg.out / "samples" / "LIDAR_TOP").iterdir())[0]
    b = sorted((other.out / "samples" / "LIDAR_TOP").iterdir())[0]
    assert not filecmp.cmp(a, b, shallow=False)


def test_rigs_match_the_datasets() -> None:
    assert len(NUSCENES_RIG.cameras) == 6 and len(AV2_RIG.cameras) == 7
    assert NUSCENES_RIG.lidar.beams >= 32 and AV2_RIG.lidar.beams >= 32
    front = AV2_RIG.cameras[0]
    assert front.name == "ring_front_center" and front.size((2048, 1550)) == (1550, 2048)
    for cam in NUSCENES_RIG.cameras + AV2_RIG.cameras:
        rot = cam.cam_to_ego()[:3, :3]
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
        # The optical axis (camera z) points along the camera's yaw, level with the ground.
        yaw = np.deg2rad(cam.yaw_deg)
        np.testing.assert_allclose(rot[:, 2], [np.cos(yaw), np.sin(yaw), 0.0], atol=1e-12)


def test_sweep_density_classes_and_intensity() -> None:
    world = make_world(seed=1, scene_index=0, duration_s=3.0, start_us=0)
    sweep = scan_lidar(world, NUSCENES_RIG, 1_000_000, np.random.default_rng(0))
    assert len(sweep.points) >= 10_000
    assert len(np.unique(sweep.ring)) == 32
    present = set(np.unique(sweep.label).tolist())
    for name in (
        "flat.driveable_surface",
        "flat.sidewalk",
        "static.manmade",
        "static.vegetation",
        "vehicle.car",
    ):
        assert GENERAL_INDEX[name] in present, name
    assert 0 <= sweep.intensity.min() and sweep.intensity.max() <= 255
    # Ground returns lie on z = 0 in the world: in the LiDAR frame, 1.84 m below the sensor.
    ground = sweep.label == GENERAL_INDEX["flat.driveable_surface"]
    assert np.abs(sweep.points[ground, 2] + 1.84).max() < 0.05


def test_ego_moves_along_the_road() -> None:
    world = make_world(seed=2, scene_index=1, duration_s=3.0, start_us=0)
    a, b = world.ego_to_global(0), world.ego_to_global(500_000)
    step = np.linalg.norm(b[:3, 3] - a[:3, 3])
    assert np.isclose(step, world.ego_speed * 0.5, rtol=1e-3)
    forward = a[:3, 0]  # ego x axis points along the direction of travel
    assert forward @ (b[:3, 3] - a[:3, 3]) / step > 0.99


def _reference_cast(origin, dirs, prims, max_range):
    """The caster one primitive at a time, all rays each: the nearest hit per ray (ties to
    the ground, then the lower row), by the textbook slab / quadric formulas."""
    n = len(dirs)
    t_best, prim = np.full(n, np.inf), np.full(n, -2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = -origin[2] / dirs[:, 2]
    ground = (dirs[:, 2] < -1e-9) & (t_ground > 1e-6) & (t_ground <= max_range)
    t_best[ground], prim[ground] = t_ground[ground], -1
    for i in range(len(prims)):
        c, s = prims.center[i], prims.size[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            if prims.kind[i] == KIND_BOX:
                cy, sy = np.cos(prims.yaw[i]), np.sin(prims.yaw[i])
                rot = np.array([[cy, sy, 0.0], [-sy, cy, 0.0], [0.0, 0.0, 1.0]])
                o, d = rot @ (origin - c), dirs @ rot.T
                t1, t2 = (-s - o) / d, (s - o) / d
                near = np.nan_to_num(np.minimum(t1, t2), nan=-np.inf).max(axis=1)
                far = np.nan_to_num(np.maximum(t1, t2), nan=np.inf).min(axis=1)
                t = np.where((far >= near) & (near > 1e-6), near, np.inf)
            elif prims.kind[i] == KIND_CYLINDER:
                o = origin - c
                a = dirs[:, 0] ** 2 + dirs[:, 1] ** 2
                b = 2 * (o[0] * dirs[:, 0] + o[1] * dirs[:, 1])
                disc = b * b - 4 * a * (o[0] ** 2 + o[1] ** 2 - s[0] ** 2)
                side = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
                z = o[2] + side * dirs[:, 2]
                side_ok = (disc >= 0) & (a > 1e-12) & (side > 1e-6) & (z >= 0) & (z <= s[1])
                cap = (s[1] - o[2]) / dirs[:, 2]
                px, py = o[0] + cap * dirs[:, 0], o[1] + cap * dirs[:, 1]
                cap_ok = (dirs[:, 2] < 0) & (cap > 1e-6) & (px * px + py * py <= s[0] ** 2)
                t = np.minimum(np.where(side_ok, side, np.inf), np.where(cap_ok, cap, np.inf))
            else:
                b = dirs @ (origin - c)
                disc = b * b - ((origin - c) @ (origin - c) - s[0] ** 2)
                t = -b - np.sqrt(np.maximum(disc, 0))
                t = np.where((disc >= 0) & (t > 1e-6), t, np.inf)
        closer = (t < t_best) & (t <= max_range)
        t_best[closer], prim[closer] = t[closer], i
    return t_best, prim


def test_the_caster_equals_one_primitive_at_a_time() -> None:
    """The pair caster (footprints, chunks, per-kind intersection) finds the nearest hit of
    every ray the exhaustive reference finds: LiDAR rays all around (the azimuth footprint,
    across the +-pi seam) and a camera's pixels (the clipped image footprint)."""
    world = make_world(seed=4, scene_index=2, duration_s=3.0, start_us=0)
    prims = world.primitives_at(1_000_000)
    pose = world.ego_to_global(1_000_000)
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(4000, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origin = pose[:3, 3] + [0.0, 0.0, 1.8]
    hits = cast(origin, dirs, prims, max_range=80.0)
    t_ref, prim_ref = _reference_cast(origin, dirs, prims, 80.0)
    assert (prim_ref >= 0).sum() > 1000  # the rays see objects, not only the ground
    np.testing.assert_array_equal(hits.prim, prim_ref)
    np.testing.assert_allclose(hits.t, t_ref, rtol=1e-9)
    cam = NUSCENES_RIG.cameras[1]
    image = render_camera(world, cam, 96, 54, 1_000_000)
    cam_to_global = pose @ cam.cam_to_ego()
    k = cam.intrinsics(96, 54)
    v, u = np.mgrid[0:54, 0:96]
    pix = np.stack(
        [(u + 0.5 - k[0, 2]) / k[0, 0], (v + 0.5 - k[1, 2]) / k[1, 1], np.ones((54, 96))]
    )
    pix = pix.reshape(3, -1).T
    dirs = (pix / np.linalg.norm(pix, axis=1, keepdims=True)) @ cam_to_global[:3, :3].T
    t_ref, prim_ref = _reference_cast(cam_to_global[:3, 3], dirs, prims, 150.0)
    np.testing.assert_allclose(image.depth.ravel(), t_ref, rtol=1e-9)
    inst = np.where(prim_ref >= 0, prims.instance[np.maximum(prim_ref, 0)], 0)
    np.testing.assert_array_equal(image.instance.ravel(), inst)


def test_scale_mode_writes_a_trainval_world(tmp_path: Path) -> None:
    """``make-synthetic --scale`` on a few scenes: v1.0-trainval tables nuscenes-devkit
    reads, few-beam sweeps, tiny images, one map for every log, train and val scenes; the
    same files with one process as with two."""
    from nuscenes.nuscenes import NuScenes

    from hilda.datasets import open_dataset

    cfg = scale_config(tmp_path / "two", scenes=3, frames_per_scene=2, workers=2)
    counts = make_synthetic(cfg)
    assert counts["samples"] == 6 and counts["images"] == 36
    assert 1_000 <= counts["points"] / 6 <= 2_600  # ~2k points a sweep
    nusc = NuScenes("v1.0-trainval", str(cfg.out), verbose=False)
    assert len(nusc.sample) == 6 and len(nusc.map) == 1
    assert sorted(nusc.map[0]["log_tokens"]) == sorted(r["token"] for r in nusc.log)
    assert all("map_token" in log for log in nusc.log)  # the devkit linked every log
    train = open_dataset("nuscenes", str(cfg.out), version="v1.0-trainval", split="train").frames
    val = open_dataset("nuscenes", str(cfg.out), version="v1.0-trainval", split="val").frames
    assert (len(train), len(val)) == (4, 2)
    cam = train[0].cameras[0]
    assert (cam.width, cam.height) == (64, 36) and len(train[0].cameras) == 6
    one = scale_config(tmp_path / "one", scenes=3, frames_per_scene=2, workers=1)
    make_synthetic(one)
    assert _digest(one.out) == _digest(cfg.out)
