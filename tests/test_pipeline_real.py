"""The point-map stage on the real nuScenes keyframe, against nuscenes-devkit itself."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import zarr
from nuscenes.utils.data_classes import LidarPointCloud
from nuscenes.utils.geometry_utils import view_points
from pyquaternion import Quaternion

from .pipeline_helpers import build_cache
from .realdata import VERSION, write_real_keyframe_tables


def _devkit_chain_float64(nusc, raw, lidar_sd: dict, cam_sd: dict) -> np.ndarray:
    """map_pointcloud_to_image's steps, with the devkit's functions, on float64 points."""
    pc = LidarPointCloud(raw.points.astype(np.float64))
    cs = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])
    pc.rotate(Quaternion(cs["rotation"]).rotation_matrix)
    pc.translate(np.array(cs["translation"]))
    pose = nusc.get("ego_pose", lidar_sd["ego_pose_token"])
    pc.rotate(Quaternion(pose["rotation"]).rotation_matrix)
    pc.translate(np.array(pose["translation"]))
    pose = nusc.get("ego_pose", cam_sd["ego_pose_token"])
    pc.translate(-np.array(pose["translation"]))
    pc.rotate(Quaternion(pose["rotation"]).rotation_matrix.T)
    cs = nusc.get("calibrated_sensor", cam_sd["calibrated_sensor_token"])
    pc.translate(-np.array(cs["translation"]))
    pc.rotate(Quaternion(cs["rotation"]).rotation_matrix.T)
    return view_points(pc.points[:3], np.array(cs["camera_intrinsic"]), normalize=True)[:2]


def test_pairs_equal_devkit_and_occlusion_count(real_keyframe: Path, tmp_path: Path) -> None:
    from nuscenes.nuscenes import NuScenes

    calib = write_real_keyframe_tables(real_keyframe, tmp_path / "nusc")
    store = tmp_path / "real.zarr"
    build_cache(tmp_path / "nusc", str(store), stages=("index",))
    from hilda.pipeline.ops.occlusion import OcclusionRule
    from hilda.pipeline.runner import ClusterConfig
    from hilda.pipeline.stages.common import StageOptions
    from hilda.pipeline.stages.pointmaps import PointmapConfig, run_pointmaps

    opts = StageOptions(cluster=ClusterConfig(workers=1))
    run_pointmaps(PointmapConfig(store=str(store), occlusion=False), opts)
    root = zarr.open_group(str(store), mode="r")
    cams = root["index"].attrs["cameras"]
    cam, uv, point = (root[f"pointmaps/{k}"][:] for k in ("cam", "uv", "point"))
    assert len(cam) == 22_103

    with contextlib.redirect_stdout(io.StringIO()):
        nusc = NuScenes(version=VERSION, dataroot=str(tmp_path / "nusc"), verbose=False)
    sample = nusc.get("sample", calib["sample_token"])
    lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    raw = LidarPointCloud.from_file(str(tmp_path / "nusc" / lidar_sd["filename"]))
    for v, name in enumerate(cams):
        ref, _, _ = nusc.explorer.map_pointcloud_to_image(
            sample["data"]["LIDAR_TOP"], sample["data"][name]
        )
        mine = uv[cam == v]
        assert len(mine) == ref.shape[1], name
        # The devkit computes in float32 through global coordinates (~1 km): ~0.02 px of error.
        np.testing.assert_allclose(mine, ref[:2].T, atol=0.05)
        # The devkit's own chain (its rotate/translate/view_points) in float64: within 1e-3 px.
        exact = _devkit_chain_float64(
            nusc, raw, lidar_sd, nusc.get("sample_data", sample["data"][name])
        )
        np.testing.assert_allclose(mine, exact[:, point[cam == v]].T, atol=1e-3)
        assert np.all(np.diff(point[cam == v]) > 0)

    run_pointmaps(
        PointmapConfig(store=str(store), occlusion=True, rule=OcclusionRule()),
        StageOptions(cluster=ClusterConfig(workers=1), overwrite=True),
    )
    kept = int(zarr.open_group(str(store), mode="r")["pointmaps/offsets"][-1])
    removed = 22_103 - kept
    print(
        f"occlusion removes {removed} of 22103 pairs ({100 * removed / 22_103:.1f}%) "
        "on the real keyframe"
    )
    assert 0 < removed < 0.2 * 22_103
