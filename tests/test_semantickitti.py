"""SemanticKITTI: the reader on the synthetic world written in its layout (scans, labels
through the official learning map, poses through the calibration), and clear errors for a
missing sequence, a label file of another length, unknown label ids, a truncated scan."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from hilda.datasets.io import DatasetError
from hilda.datasets.semantickitti import (
    CLASSES,
    IGNORE,
    LEARNING_MAP,
    SPLITS,
    intensity_to,
    label_lut,
    open_split,
    read_labels,
    read_scan,
)
from hilda.datasets.synthetic.generate import SyntheticConfig, make_synthetic, scene_world
from hilda.datasets.synthetic.kitti_format import SCENE_START_US, sequence_names


@pytest.fixture(scope="module")
def kitti(tmp_path_factory: pytest.TempPathFactory) -> SyntheticConfig:
    """Two scenes: train sequence 00 and val sequence 08, three scans each."""
    cfg = SyntheticConfig(
        out=tmp_path_factory.mktemp("kitti"), format="semantickitti", scenes=2, frames_per_scene=3
    )
    make_synthetic(cfg)
    return cfg


def test_sequences_follow_the_official_split() -> None:
    assert sequence_names(11) == [*SPLITS["train"], "08"]
    assert sequence_names(2) == ["00", "08"] and sequence_names(1) == ["00"]
    assert SPLITS["val"] == ("08",) and len(SPLITS["train"]) == 10


def test_learning_map() -> None:
    lut = label_lut()
    assert len(CLASSES) == 19 and sorted(set(LEARNING_MAP.values())) == list(range(20))
    assert lut[10] == lut[252] == CLASSES.index("car")  # moving-car joins car
    assert lut[60] == CLASSES.index("road")  # lane-marking is road
    assert lut[0] == lut[1] == lut[52] == lut[99] == IGNORE
    assert lut[2] == -2  # not an id of the map
    assert intensity_to(255.0) == 255.0  # remission 0-1 onto nuScenes' 0-255


def test_reader_returns_what_the_world_holds(kitti: SyntheticConfig) -> None:
    train = open_split(kitti.out, "train", sequences=("00",))
    val = open_split(kitti.out, "val")
    assert [s.token for s in train] == ["00/000000", "00/000001", "00/000002"]
    assert [s.sequence for s in val] == ["08"] * 3
    points = read_scan(train[1].scan_file)
    labels = read_labels(train[1].label_file, len(points))
    assert points.dtype == np.float32 and points.shape[1] == 4
    assert 0.0 <= points[:, 3].min() and points[:, 3].max() <= 1.0  # remission
    present = {CLASSES[c] for c in np.unique(labels) if c >= 0}
    assert {"car", "road", "sidewalk", "building", "vegetation", "terrain"} <= present
    road = points[labels == CLASSES.index("road"), 2]
    assert abs(np.median(road) + 1.73) < 0.1  # the velodyne is 1.73 m above the road
    raw = np.fromfile(train[1].label_file, np.uint32) & 0xFFFF
    assert 252 in raw  # moving cars carry the moving id
    # Poses: the velodyne's motion between scans is the ego's (ego frame == LiDAR axes here).
    world = scene_world(kitti, 0, SCENE_START_US)
    lidar_to_ego = kitti.rig.lidar.lidar_to_ego()
    first, second = (world.ego_to_global(SCENE_START_US + k * 100_000) for k in (0, 1))
    want = np.linalg.inv(first @ lidar_to_ego) @ second @ lidar_to_ego
    np.testing.assert_allclose(train[1].lidar_pose, want, atol=1e-6)


def test_errors_name_the_file(kitti: SyntheticConfig, tmp_path: Path) -> None:
    root = tmp_path / "kitti"
    shutil.copytree(kitti.out, root)
    with pytest.raises(DatasetError, match=r"missing SemanticKITTI sequence folder .*/01"):
        open_split(root, "train")  # the official train split needs 00-07, 09, 10
    with pytest.raises(DatasetError, match=r"sequences \['08'\] are not in"):
        open_split(root, "train", sequences=("08",))
    scan = open_split(root, "train", sequences=("00",))[0]
    n = len(read_scan(scan.scan_file))
    with pytest.raises(DatasetError, match=f"holds {n} labels for a scan of {n + 1} points"):
        read_labels(scan.label_file, n + 1)
    raw = np.fromfile(scan.label_file, np.uint32)
    raw[5] = 7  # not a SemanticKITTI id
    raw.tofile(scan.label_file)
    with pytest.raises(DatasetError, match=r"unknown SemanticKITTI label ids \[7\]"):
        read_labels(scan.label_file, n)
    Path(scan.scan_file).write_bytes(Path(scan.scan_file).read_bytes()[:1002])
    with pytest.raises(DatasetError, match="truncated or empty scan"):
        read_scan(scan.scan_file)
