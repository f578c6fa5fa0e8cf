"""The real nuScenes keyframe (../shared/realdata) through the reader and the devkit chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hilda.datasets import open_dataset
from hilda.datasets.io import read_sweep
from hilda.pipeline.ops.projection import lidar_to_camera, project_points

from .realdata import VERSION, write_real_keyframe_tables


def test_reader_returns_the_real_calibration_and_points(
    real_keyframe: Path, tmp_path: Path
) -> None:
    calib = write_real_keyframe_tables(real_keyframe, tmp_path)
    frames = open_dataset("nuscenes", str(tmp_path), version=VERSION, split="all").frames
    assert len(frames) == 1
    frame = frames[0]
    assert frame.token == calib["sample_token"] and frame.prev is None and frame.next is None
    np.testing.assert_allclose(frame.lidar_to_ego, calib["lidar"]["lidar2ego"], atol=1e-6)
    np.testing.assert_allclose(frame.ego_to_global, calib["ego2global"], atol=1e-6)
    points = read_sweep(frame.lidar_file, frame.token)
    raw = np.fromfile(real_keyframe / calib["lidar"]["file"], dtype=np.float32).reshape(-1, 5)
    assert points.shape == (34_688, 4)
    np.testing.assert_array_equal(points, raw[:, :4])
    pairs = 0
    seen = np.zeros(len(points), dtype=bool)
    for cam in frame.cameras:
        ref = calib["cameras"][cam.name]
        assert (cam.width, cam.height) == (1600, 900)
        np.testing.assert_allclose(cam.intrinsics, ref["cam2img"], atol=1e-6)
        np.testing.assert_allclose(cam.cam_to_ego, ref["cam2ego"], atol=1e-6)
        chain = lidar_to_camera(
            frame.lidar_to_ego, frame.ego_to_global, cam.ego_to_global, cam.cam_to_ego
        )
        np.testing.assert_allclose(chain, ref["lidar2cam"], atol=1e-5)
        idx, _, _ = project_points(points, chain, cam.intrinsics, cam.width, cam.height)
        pairs += len(idx)
        seen[idx] = True
    # docs/design.md, measured with the devkit's map_pointcloud_to_image: 22,103 pairs, 58% seen.
    assert pairs == 22_103
    assert abs(seen.mean() - 0.58) < 0.01
