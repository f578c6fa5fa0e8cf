"""The label-fraction protocols of the downstream runs, as the papers hilda is compared with
build them: SLidR's nuScenes scenes (every k-th train scene in table order, with all its
keyframes), SemanticKITTI's every 100th scan of the sorted train paths, and lists of frames
(ScaLR ships .npy lists); and what a result records of them."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.splits import create_splits_scenes

from hilda.datasets.io import DatasetError
from hilda.datasets.synthetic.generate import SyntheticConfig, make_synthetic
from hilda.errors import ConfigError
from hilda.eval.config import SegDataConfig
from hilda.eval.data import open_split, scene_subset

# Real per-sequence scan counts of SemanticKITTI's train sequences (19,130 in all).
KITTI_TRAIN_SCANS = {
    "00": 4541,
    "01": 1101,
    "02": 4661,
    "03": 801,
    "04": 271,
    "05": 2761,
    "06": 1101,
    "07": 1101,
    "09": 1591,
    "10": 1201,
}


@pytest.fixture(scope="module")
def trainval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic v1.0-trainval world of 11 train and 2 val scenes, 2 keyframes each, with
    tiny images (only the tables and sweeps matter here)."""
    out = tmp_path_factory.mktemp("trainval")
    cfg = SyntheticConfig(
        out=out,
        format="nuscenes",
        version="v1.0-trainval",
        scenes=13,
        frames_per_scene=2,
        seed=11,
        image_size=(32, 18),
    )
    make_synthetic(cfg)
    return out


def devkit_train_scenes(root: Path) -> tuple[NuScenes, list[dict]]:
    """The train split's scene records in the scene table's order, by the devkit itself."""
    with contextlib.redirect_stdout(io.StringIO()):
        nusc = NuScenes(version="v1.0-trainval", dataroot=str(root), verbose=False)
    train = set(create_splits_scenes(verbose=False)["train"])
    return nusc, [s for s in nusc.scene if s["name"] in train]


def lidar_tokens(nusc: NuScenes, scene: dict) -> list[str]:
    """Every keyframe's LIDAR_TOP sample_data token of a scene, in time order."""
    out, tok = [], scene["first_sample_token"]
    while tok:
        sample = nusc.get("sample", tok)
        out.append(sample["data"]["LIDAR_TOP"])
        tok = sample["next"]
    return out


def test_scene_rule_counts_from_one() -> None:
    scenes = tuple(f"s{i}" for i in range(1, 11))
    frame_scenes = [s for s in scenes for _ in range(2)]
    # k = 5: the 5th and 10th scene (SLidR increments its counter before the test).
    np.testing.assert_array_equal(scene_subset(scenes, frame_scenes, 0.2), [8, 9, 18, 19])
    np.testing.assert_array_equal(scene_subset(scenes, frame_scenes, 1.0), np.arange(20))
    assert len(scene_subset(scenes, frame_scenes, 0.01)) == 0


def test_nuscenes_fractions_keep_every_kth_train_scene(trainval: Path) -> None:
    nusc, train = devkit_train_scenes(trainval)
    assert len(train) == 11
    cfg = SegDataConfig(dataset="nuscenes", root=str(trainval), version="v1.0-trainval")
    assert cfg.subset_rule == "scenes"
    split = open_split(cfg, "train", fraction=0.2)
    want = lidar_tokens(nusc, train[4]) + lidar_tokens(nusc, train[9])
    assert [f.lidar_token for f in split.frames] == want
    assert split.subset == {
        "fraction": 0.2,
        "rule": "scenes",
        "k": 5,
        "scenes": [train[4]["name"], train[9]["name"]],
    }
    assert split.total == 22
    # The whole split: every frame, nothing to record but that.
    full = open_split(cfg, "train")
    assert len(full.frames) == 22 and full.subset == {"rule": "all"}
    # Too small a fraction for the split is an error that says what to do.
    with pytest.raises(DatasetError, match=r"data\.subset=frames"):
        open_split(cfg, "train", fraction=0.01)
    # The frame rule on request: every 5th frame of the split in order.
    frames = open_split(SegDataConfig(**{**vars(cfg), "subset": "frames"}), "train", fraction=0.2)
    assert [f.lidar_token for f in frames.frames] == [
        full.frames[i].lidar_token for i in range(0, 22, 5)
    ]
    assert frames.subset == {"fraction": 0.2, "rule": "frames", "k": 5}


def test_subset_files_name_frames_by_token_or_file(trainval: Path, tmp_path: Path) -> None:
    cfg = SegDataConfig(dataset="nuscenes", root=str(trainval), version="v1.0-trainval")
    full = open_split(cfg, "train")
    picked = [full.frames[i] for i in (7, 2, 15)]
    listed = tmp_path / "list.txt"
    listed.write_text(f"# three frames\n{picked[0].lidar_token}\n\n{picked[1].lidar_token}\n")
    listed.write_text(listed.read_text() + Path(picked[2].lidar_file).name + "\n")
    by_file = SegDataConfig(**{**vars(cfg), "subset": "file", "subset_file": str(listed)})
    split = open_split(by_file, "train", fraction=0.01)  # the list decides, not the fraction
    assert [f.lidar_token for f in split.frames] == [full.frames[i].lidar_token for i in (2, 7, 15)]
    assert split.subset["rule"] == "file" and split.subset["file"] == str(listed)
    assert len(split.subset["sha256"]) == 64
    # A .npy of sweep paths relative to the root, as ScaLR's lists hold them.
    npy = tmp_path / "list.npy"
    rel = [str(Path(f.lidar_file).relative_to(trainval)) for f in picked]
    np.save(npy, np.array(rel))
    split = open_split(SegDataConfig(**{**vars(by_file), "subset_file": str(npy)}), "train")
    assert len(split.frames) == 3
    listed.write_text("not-a-token\n")
    with pytest.raises(DatasetError, match="not-a-token"):
        open_split(by_file, "train")
    with pytest.raises(ConfigError, match="subset_file"):
        SegDataConfig(dataset="nuscenes", subset="file")
    with pytest.raises(ConfigError, match="subset"):
        SegDataConfig(dataset="nuscenes", subset="every")


def test_semantickitti_one_percent_is_every_100th_sorted_scan(tmp_path: Path) -> None:
    """Over a tree with the real per-sequence scan counts (empty scans, no labels read):
    1% of the train split is sorted(paths)[::100], 192 of the 19,130 scans."""
    for seq, n in KITTI_TRAIN_SCANS.items():
        folder = tmp_path / "sequences" / seq
        (folder / "velodyne").mkdir(parents=True)
        (folder / "labels").mkdir()
        (folder / "calib.txt").write_text("Tr: 1 0 0 0 0 1 0 0 0 0 1 0\n")
        (folder / "poses.txt").write_text("1 0 0 0 0 1 0 0 0 0 1 0\n" * n)
        for i in range(n):
            (folder / "velodyne" / f"{i:06d}.bin").touch()
            (folder / "labels" / f"{i:06d}.label").touch()
    cfg = SegDataConfig(dataset="semantickitti", root=str(tmp_path))
    assert cfg.subset_rule == "frames"
    split = open_split(cfg, "train", fraction=0.01)
    paths = sorted(str(p) for p in tmp_path.glob("sequences/*/velodyne/*.bin"))
    assert len(paths) == split.total == 19130
    assert [f.lidar_file for f in split.frames] == paths[::100]
    assert len(split.frames) == 192 and split.frames[1].lidar_token == "00/000100"
