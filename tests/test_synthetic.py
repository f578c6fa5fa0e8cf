"""The synthetic world: deterministic, real sensor rigs, dense sweeps, every class present."""

from __future__ import annotations

import filecmp
import hashlib
from pathlib import Path

import numpy as np

from hilda.datasets.classes import GENERAL_INDEX
from hilda.datasets.synthetic.generate import SyntheticConfig, make_synthetic
from hilda.datasets.synthetic.render import AV2_RIG, NUSCENES_RIG, scan_lidar
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
