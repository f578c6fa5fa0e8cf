"""The Waymo Open Dataset v2 reader: the range image conversion against the official formulas
(a reference written here, one pixel at a time, from ``range_image_utils.py`` /
``transform_utils.py``) and the official unit test's values; a real v2 file Waymo's tools
wrote; the synthetic v2 world read back; the 1% rule; bad input named by segment, timestamp
and component; fine-tuning and the table's Waymo column."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hilda.datasets import waymo
from hilda.datasets.io import DatasetError
from hilda.datasets.labelled import IGNORE, WAYMO
from hilda.datasets.synthetic.generate import SyntheticConfig, make_synthetic
from hilda.eval.config import SegDataConfig
from hilda.eval.data import open_split
from tests.conftest import SHARED

REAL_POSE = SHARED / "realdata" / "waymo-v2-vehicle-pose"


# -- the official formulas, one pixel at a time ----------------------------------------------


def _rpy(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """transform_utils.get_rotation_matrix: r_yaw @ r_pitch @ r_roll."""
    cr, sr, cp, sp, cy, sy = (
        math.cos(roll), math.sin(roll), math.cos(pitch), math.sin(pitch), math.cos(yaw),
        math.sin(yaw),
    )  # fmt: skip
    r_roll = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    r_pitch = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    r_yaw = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    return r_yaw @ (r_pitch @ r_roll)


def reference_points(image, extrinsic, incl_min, incl_max, incl_values, pixel_pose, frame_pose):
    """convert_range_image_to_point_cloud as the official code computes it, per pixel."""
    height, width = image.shape[:2]
    if incl_values is None:  # compute_inclination
        incl = [(0.5 + i) / height * (incl_max - incl_min) + incl_min for i in range(height)]
    else:
        incl = list(incl_values)
    incl = incl[::-1]  # tf.reverse: row 0 is the highest beam
    az_correction = math.atan2(extrinsic[1][0], extrinsic[0][0])
    world_to_vehicle = np.linalg.inv(frame_pose) if frame_pose is not None else None
    out = []
    for i in range(height):
        for j in range(width):
            r = float(image[i, j, 0])
            if not r > 0:
                continue
            ratio = (width - j - 0.5) / width  # tf.range(width, 0, -1) - .5, over width
            az = (ratio * 2.0 - 1.0) * math.pi - az_correction
            p = np.array(
                [
                    math.cos(az) * math.cos(incl[i]) * r,
                    math.sin(az) * math.cos(incl[i]) * r,
                    math.sin(incl[i]) * r,
                ]
            )
            p = extrinsic[:3, :3] @ p + extrinsic[:3, 3]
            if pixel_pose is not None:
                roll, pitch, yaw, x, y, z = pixel_pose[i, j]
                p = _rpy(roll, pitch, yaw) @ p + np.array([x, y, z])
                p = world_to_vehicle[:3, :3] @ p + world_to_vehicle[:3, 3]
            out.append(p)
    return np.array(out).reshape(-1, 3)


def _extrinsic(yaw: float, pitch: float, t) -> np.ndarray:
    e = np.eye(4)
    e[:3, :3] = _rpy(0.0, pitch, yaw)
    e[:3, 3] = t
    return e


def test_the_official_unit_test_values() -> None:
    """v2/perception/utils/lidar_utils_test.py: a [3, 2, 4] range image of -12..11, per-pixel
    poses (pi/2, pi/2, pi/2, 1, 2, 3), identity extrinsic and frame pose, inclinations
    [-pi/2, 0, pi/2]."""
    image = np.arange(-12, 12, dtype=np.float64).reshape(3, 2, 4)
    pose = np.tile([np.pi / 2, np.pi / 2, np.pi / 2, 1, 2, 3], 6).reshape(3, 2, 6)
    incl = waymo.row_inclinations(-np.pi / 2, np.pi / 2, [-np.pi / 2, 0.0, np.pi / 2], 3)
    rot = waymo.rotation_rpy(pose[..., 0], pose[..., 1], pose[..., 2])
    expected_rot = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]])
    np.testing.assert_allclose(rot, np.broadcast_to(expected_rot, (3, 2, 3, 3)), atol=1e-7)
    cartesian = waymo.range_image_cartesian(image[..., 0], np.eye(4), incl, pose, np.eye(4))
    expected = [[-11, 2, 3], [-7, 2, 3], [1, -2, 3], [1, 2, 3], [-3, 2, 3], [-7, 2, 3]]
    np.testing.assert_allclose(cartesian, np.array(expected).reshape(3, 2, 3), atol=1e-6)
    points, pixels = waymo.range_image_points(image, np.eye(4), incl, pose, np.eye(4))
    np.testing.assert_allclose(points, [[-3, 2, 3], [-7, 2, 3]], atol=1e-6)
    assert pixels.tolist() == [4, 5]


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("per_pixel", [True, False])
def test_the_conversion_equals_the_official_formulas(uniform: bool, per_pixel: bool) -> None:
    rng = np.random.default_rng(3)
    height, width = 9, 17
    image = rng.uniform(0.5, 70.0, (height, width, 4))
    image[rng.random((height, width)) < 0.2, 0] = 0.0  # no return
    image[0, 0, 0] = -1.0  # negative ranges are not points either
    extrinsic = _extrinsic(yaw=2.6, pitch=-0.05, t=(1.43, 0.02, 2.18))
    lo, hi = -0.31, 0.04
    values = None if uniform else np.sort(rng.uniform(lo, hi, height))
    pose = frame = None
    if per_pixel:
        frame = _extrinsic(yaw=0.7, pitch=0.01, t=(1200.0, -340.0, 12.0))
        pose = np.zeros((height, width, 6))
        pose[..., 0] = rng.normal(0, 0.01, (height, width))
        pose[..., 1] = rng.normal(0, 0.01, (height, width))
        pose[..., 2] = 0.7 + np.linspace(-0.02, 0.02, width)[None, :]
        pose[..., 3:] = np.array([1200.0, -340.0, 12.0]) + rng.normal(0, 0.5, (height, width, 3))
    incl = waymo.row_inclinations(lo, hi, values, height)
    got, _ = waymo.range_image_points(image, extrinsic, incl, pose, frame)
    want = reference_points(image, extrinsic, lo, hi, values, pose, frame)
    assert got.shape == want.shape and len(got) > 100
    assert np.abs(got - want).max() < 1e-4


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = SyntheticConfig(
        format="waymo", out=tmp_path_factory.mktemp("waymo"), scenes=3, frames_per_scene=4
    )
    make_synthetic(cfg)
    return cfg.out


def test_the_synthetic_v2_world_reads_back(world: Path) -> None:
    split = WAYMO.open_split(str(world), "training", None)
    assert len(split.scenes) == 2 and len(split.frames) == 4  # every other frame labelled
    tokens = [f.token for f in split.frames]
    assert tokens == sorted(tokens, key=lambda t: (t.rpartition("/")[0], int(t.rpartition("/")[2])))
    name = split.scenes[0]
    seg = waymo.Segment(str(world), "training", name)
    assert len(seg.frames()) == 4 and seg.labelled() == seg.frames()[::2]
    poses = waymo.vehicle_poses(waymo.component_file(world, "training", "vehicle_pose", name))
    for stamp in seg.labelled():
        scan = waymo.read_frame(seg, stamp)
        lidar = seg.component("lidar").row(
            stamp, waymo.TOP, [f"{waymo.LIDAR}.range_image_return1.values"], "test"
        )
        top_first = (np.asarray(lidar[f"{waymo.LIDAR}.range_image_return1.values"])[::4] > 0).sum()
        assert ((scan.laser == waymo.TOP) & (scan.echo == 1)).sum() == top_first
        assert set(np.unique(scan.laser)) == set(waymo.LASERS)  # all five LiDARs
        assert (scan.echo == 2).any()  # and second returns
        # The road is the world's z = 0 plane: the first-return road points of the TOP LiDAR,
        # through their own per-pixel poses into the frame's vehicle frame, land on it.
        world_xyz = scan.points[:, :3].astype(np.float64) @ poses[stamp][:3, :3].T
        world_xyz += poses[stamp][:3, 3]
        road = (scan.labels == 18) & (scan.echo == 1)
        assert road.sum() > 100 and np.abs(world_xyz[road, 2]).max() < 1e-4
        assert (scan.labels[scan.laser != waymo.TOP] == -1).all()  # only TOP is labelled
        assert 0.0 <= scan.points[:, 3].min() and scan.points[:, 3].max() < 1.0  # tanh
    points, labels = WAYMO.read(split, split.frames[0])
    assert points.dtype == np.float32 and points.shape[1] == 4 and len(labels) == len(points)
    assert labels.min() == IGNORE and labels.max() < len(WAYMO.classes) == 22


def test_the_one_percent_rule_and_what_a_result_records(world: Path) -> None:
    cfg = SegDataConfig(dataset="waymo", root=str(world), fraction=0.5)
    assert cfg.resolved() == (None, "training", "validation") and cfg.subset_rule == "frames"
    full = open_split(cfg, "training")
    part = open_split(cfg, "training", fraction=cfg.fraction)
    assert [f.token for f in part.frames] == [f.token for f in full.frames][::2]
    assert part.subset == {"fraction": 0.5, "rule": "frames", "k": 2}
    val = open_split(cfg, "validation")
    assert len(val.frames) == 2 and val.frames[0].lidar_token == val.frames[0].token


@pytest.mark.skipif(not REAL_POSE.is_dir(), reason=f"the real v2 file is not at {REAL_POSE}")
def test_a_real_v2_file_written_by_waymos_tools() -> None:
    """The vehicle_pose component of a real segment: the key and column names, the list
    type (a fixed-size list of 16 float32) and a rigid row-major pose a frame."""
    path = next(REAL_POSE.glob("*.parquet"))
    poses = waymo.vehicle_poses(path)
    assert len(poses) == 199
    stamps = sorted(poses)
    assert all(b - a > 0 for a, b in itertools.pairwise(stamps))
    for pose in poses.values():
        rot = pose[:3, :3]
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-5)
        assert np.allclose(pose[3], [0, 0, 0, 1])
    real = pq.read_schema(path)
    column = f"{waymo.VEHICLE_POSE}.world_from_vehicle.transform"
    from hilda.datasets.synthetic.waymo_format import _schemas

    ours = _schemas()["vehicle_pose"]
    for name in (waymo.SEGMENT, waymo.TIMESTAMP, column):
        assert real.field(name).type == ours.field(name).type, name
    steps = np.linalg.norm(np.diff([poses[t][:3, 3] for t in stamps], axis=0), axis=1)
    assert 0.0 <= steps.max() < 5.0  # 10 Hz: metres a frame, not a unit mix-up


# -- bad input ------------------------------------------------------------------------------


def _copy_world(world: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "w"
    shutil.copytree(world, out)
    waymo.forget_open_files()
    return out


def _rewrite(path: Path, edit) -> None:
    table = pq.read_table(path)
    pq.write_table(edit(table), path, row_group_size=5)
    waymo.forget_open_files()


def _first_labelled(root: Path) -> tuple[waymo.Segment, int]:
    name = waymo.segments(root, "training")[0]
    seg = waymo.Segment(str(root), "training", name)
    return seg, seg.labelled()[0]


def test_a_segment_missing_a_component_is_named(world: Path, tmp_path: Path) -> None:
    root = _copy_world(world, tmp_path)
    name = waymo.segments(root, "training")[0]
    waymo.component_file(root, "training", "lidar_pose", name).unlink()
    with pytest.raises(DatasetError, match=rf"segment {name} \(training\) has no lidar_pose"):
        WAYMO.open_split(str(root), "training", None)


def test_a_frame_without_calibration_or_pose_is_named(world: Path, tmp_path: Path) -> None:
    root = _copy_world(world, tmp_path)
    seg, stamp = _first_labelled(root)
    path = waymo.component_file(root, "training", "vehicle_pose", seg.name)
    _rewrite(path, lambda t: t.filter(pa.compute.not_equal(t[waymo.TIMESTAMP], stamp)))
    with pytest.raises(DatasetError, match=rf"{seg.name}/{stamp} .*no vehicle_pose row"):
        waymo.read_frame(seg, stamp)
    path = waymo.component_file(root, "training", "lidar_calibration", seg.name)
    _rewrite(path, lambda t: t.filter(pa.compute.not_equal(t[waymo.LASER], 3)))
    stamp = seg.labelled()[1]
    with pytest.raises(DatasetError, match=rf"{stamp} .*SIDE_LEFT LiDAR: no lidar_calibration"):
        waymo.read_frame(seg, stamp)


def _edit_cell(table: pa.Table, column: str, row: int, value) -> pa.Table:
    values = table[column].to_pylist()
    values[row] = value
    index = table.schema.get_field_index(column)
    return table.set_column(index, column, pa.array(values, type=table.schema.field(column).type))


def _row_of(table: pa.Table, stamp: int, laser: int) -> int:
    stamps, lasers = table[waymo.TIMESTAMP].to_pylist(), table[waymo.LASER].to_pylist()
    keys = list(zip(stamps, lasers, strict=True))
    return keys.index((stamp, laser))


def test_range_and_label_images_that_do_not_fit_are_named(world: Path, tmp_path: Path) -> None:
    root = _copy_world(world, tmp_path)
    seg, stamp = _first_labelled(root)
    lidar = waymo.component_file(root, "training", "lidar", seg.name)
    col = f"{waymo.LIDAR}.range_image_return1.values"
    table = pq.read_table(lidar)
    row = _row_of(table, stamp, waymo.TOP)
    _rewrite(lidar, lambda t: _edit_cell(t, col, row, t[col][row].as_py()[:-5]))
    with pytest.raises(DatasetError, match=rf"{stamp} .*TOP LiDAR: .*range_image_return1 holds"):
        waymo.read_frame(seg, stamp)
    labels = waymo.component_file(root, "training", "lidar_segmentation", seg.name)
    shape = f"{waymo.SEGMENTATION}.range_image_return1.shape"
    values = f"{waymo.SEGMENTATION}.range_image_return1.values"
    stamp2 = seg.labelled()[1]
    table = pq.read_table(labels)
    row = _row_of(table, stamp2, waymo.TOP)
    h, w, c = table[shape][row].as_py()

    def other_shape(t: pa.Table) -> pa.Table:
        t = _edit_cell(t, shape, row, [h // 2, w * 2, c])
        return t

    _rewrite(labels, other_shape)
    with pytest.raises(DatasetError, match=rf"{stamp2} .*label image is \[{h // 2}, {w * 2}, 2\]"):
        waymo.read_frame(seg, stamp2)
    _rewrite(labels, lambda t: _edit_cell(t, shape, row, [h, w, c]))
    ranges = seg.component("lidar").row(stamp2, waymo.TOP, [col], "test")[col][::4]
    hit = next(i for i, r in enumerate(ranges) if r > 0)  # a pixel that is a point
    bad = list(pq.read_table(labels)[values][row].as_py())
    bad[2 * hit + 1] = 40  # a class id outside Segmentation.Type
    _rewrite(labels, lambda t: _edit_cell(t, values, row, bad))
    with pytest.raises(DatasetError, match=rf"{stamp2} .*semantic class 40 is outside"):
        waymo.read_frame(seg, stamp2)


# -- the evaluation on it ---------------------------------------------------------------------


def test_finetune_and_the_tables_waymo_column(world: Path, tmp_path: Path) -> None:
    from hilda.cli.eval import app
    from tests.test_eval import tiny_backbone

    backbone = tiny_backbone(tmp_path / "backbone.pt")
    quick = ["data.num_workers=0", "device=cpu", "log_every=1"]
    args = ["finetune", "--backbone", str(backbone), "--dataset", "waymo", "--root", str(world)]
    args += ["--fraction", "0.5", "--config", "eval/tiny_finetune"]
    for o in [*quick, "optim.max_steps=1", "optim.batch_size=2"]:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "backbone.waymo.finetune-50pct.json").read_text())
    assert result["dataset"] == "waymo" and len(result["iou"]) == 22
    assert result["subset"] == {"fraction": 0.5, "rule": "frames", "k": 2}
    assert result["intensity"]["factor"] == 255.0
    assert len(result["train_tokens"]) == 2
    table = ["table", "--backbone", str(backbone), "--waymo-root", str(world)]
    table += ["--waymo-fractions", "0.5", "--finetune-config", "eval/tiny_finetune"]
    table += ["--linear-config", "eval/tiny_linear_probe"]
    for o in [*quick, "finetune.optim.max_steps=1", "optim.batch_size=2"]:
        table += ["--set", o]
    res = CliRunner().invoke(app, table)
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "backbone.table" / "table.json").read_text())
    assert "Waymo 50%" in out["columns"] and out["rows"]["pretrained"]["Waymo 50%"] is not None
    assert out["rows"]["pretrained"]["nuScenes LP"] is None  # no nuScenes root
    assert out["subsets"] == {"Waymo 50%": "frames"}
