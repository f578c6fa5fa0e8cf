"""Both readers return exactly the geometry the generator wrote, through the real devkits."""

from __future__ import annotations

import numpy as np
import pytest

from hilda.datasets import neighbour_stats, open_dataset
from hilda.datasets.classes import COARSE_CLASSES
from hilda.datasets.io import read_lidarseg_labels, read_sweep
from hilda.datasets.synthetic.av2_format import SCENE_START_NS
from hilda.datasets.synthetic.generate import SyntheticConfig, scene_world
from hilda.datasets.synthetic.nuscenes_format import SCENE_START_US
from hilda.datasets.synthetic.render import scan_lidar


def _expected_sweep(cfg: SyntheticConfig, scene: int, key: int, start_us: int, sweeps_per_key: int):
    """Re-simulate the scene up to the keyframe's sweep (the LiDAR RNG is sequential)."""
    world = scene_world(cfg, scene, start_us)
    rng = np.random.default_rng([cfg.seed, scene, 7 if cfg.format == "nuscenes" else 11])
    period = cfg.rig.keyframe_period_us // sweeps_per_key
    for j in range(key * sweeps_per_key + 1):
        sweep = scan_lidar(world, cfg.rig, start_us + j * period, rng)
    return world, sweep


def test_nuscenes_reader_geometry(nusc_cfg: SyntheticConfig) -> None:
    reader = open_dataset("nuscenes", str(nusc_cfg.out), version="v1.0-mini", split="all")
    frames = reader.frames
    assert len(frames) == nusc_cfg.scenes * nusc_cfg.frames_per_scene
    w, h = nusc_cfg.resolved_image_size
    for i, frame in enumerate(frames):
        scene, key = divmod(i, nusc_cfg.frames_per_scene)
        start = SCENE_START_US + scene * 3_600_000_000
        world, sweep = _expected_sweep(nusc_cfg, scene, key, start, 1)
        assert frame.timestamp == start + key * 500_000
        np.testing.assert_allclose(
            frame.ego_to_global, world.ego_to_global(frame.timestamp), atol=1e-6
        )
        np.testing.assert_allclose(frame.lidar_to_ego, nusc_cfg.rig.lidar.lidar_to_ego(), atol=1e-6)
        assert frame.camera_names == tuple(c.name for c in nusc_cfg.rig.cameras)
        for cam, spec in zip(frame.cameras, nusc_cfg.rig.cameras, strict=True):
            assert cam.timestamp == frame.timestamp + spec.time_offset_us
            np.testing.assert_allclose(cam.intrinsics, spec.intrinsics(w, h), atol=1e-6)
            np.testing.assert_allclose(cam.cam_to_ego, spec.cam_to_ego(), atol=1e-6)
            np.testing.assert_allclose(
                cam.ego_to_global, world.ego_to_global(cam.timestamp), atol=1e-6
            )
            assert (cam.width, cam.height) == (w, h)
        points = read_sweep(frame.lidar_file, frame.token)
        assert points.shape == (len(sweep.points), 4) and points.dtype == np.float32
        np.testing.assert_allclose(points[:, :3], sweep.points, atol=1e-5)
        labels = read_lidarseg_labels(frame.labels_file, len(points), frame.token)
        np.testing.assert_array_equal(labels, sweep.label)
        assert frame.prev == (i - 1 if key > 0 else None)
        assert frame.next == (i + 1 if key + 1 < nusc_cfg.frames_per_scene else None)


def test_nuscenes_splits_and_labels(nusc_cfg: SyntheticConfig) -> None:
    train = open_dataset("nuscenes", str(nusc_cfg.out), split="mini_train")
    val = open_dataset("nuscenes", str(nusc_cfg.out), split="mini_val")
    assert {f.scene for f in train.frames} == {"scene-0061"}
    assert {f.scene for f in val.frames} == {"scene-0103"}
    stats = neighbour_stats(train.frames)
    assert stats == {"frames": 3, "with_prev": 2, "with_next": 2, "with_both": 1}
    lut = train.coarse_label_lut
    assert COARSE_CLASSES[lut[17]] == "car" and COARSE_CLASSES[lut[24]] == "driveable_surface"
    assert lut[0] == 0 and lut[31] == 0  # noise and ego are ignored
    with pytest.raises(ValueError, match="unknown nuScenes split 'nope'"):
        open_dataset("nuscenes", str(nusc_cfg.out), split="nope")
    with pytest.raises(ValueError, match="split 'test' has no scenes"):
        open_dataset("nuscenes", str(nusc_cfg.out), split="test")


def test_av2_reader_geometry(av2_cfg: SyntheticConfig) -> None:
    from hilda.datasets.synthetic.av2_format import log_id_of

    reader = open_dataset(
        "av2", str(av2_cfg.out), split="train", keyframe_every=av2_cfg.keyframe_every
    )
    frames = reader.frames
    assert len(frames) == av2_cfg.frames_per_scene  # one train log
    assert {f.scene for f in frames} == {log_id_of(av2_cfg.seed, 0)}
    w, h = av2_cfg.resolved_image_size
    start_us = SCENE_START_NS // 1000
    for key, frame in enumerate(frames):
        world, sweep = _expected_sweep(av2_cfg, 0, key, start_us, av2_cfg.keyframe_every)
        assert frame.timestamp == start_us + key * 500_000
        np.testing.assert_array_equal(frame.lidar_to_ego, np.eye(4))
        np.testing.assert_allclose(
            frame.ego_to_global, world.ego_to_global(frame.timestamp), atol=1e-6
        )
        assert len(frame.cameras) == 7
        for cam, spec in zip(frame.cameras, av2_cfg.rig.cameras, strict=True):
            assert cam.name == spec.name
            assert cam.timestamp == frame.timestamp + spec.time_offset_us
            assert (cam.width, cam.height) == spec.size((w, h))
            np.testing.assert_allclose(
                cam.intrinsics, spec.intrinsics(*spec.size((w, h))), atol=1e-6
            )
            np.testing.assert_allclose(cam.cam_to_ego, spec.cam_to_ego(), atol=1e-6)
            np.testing.assert_allclose(
                cam.ego_to_global, world.ego_to_global(cam.timestamp), atol=1e-6
            )
        points = read_sweep(frame.lidar_file, frame.token)
        assert len(points) == len(sweep.points)
        ego = (
            sweep.points @ av2_cfg.rig.lidar.lidar_to_ego()[:3, :3].T
            + av2_cfg.rig.lidar.lidar_to_ego()[:3, 3]
        )
        np.testing.assert_allclose(
            points[:, :3], ego.astype(np.float16), atol=1e-6
        )  # AV2 stores fp16
        assert frame.prev == (key - 1 if key > 0 else None)
    val = open_dataset("av2", str(av2_cfg.out), split="val")
    assert {f.scene for f in val.frames} == {log_id_of(av2_cfg.seed, 1)}
