"""The oracle teacher: majority class per patch by hand, known features, the extract-teacher
stage on the synthetic world's class maps, and clear errors where class maps are missing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from hilda.datasets.io import class_map_path, read_class_map
from hilda.datasets.synthetic.generate import SyntheticConfig
from hilda.errors import ConfigError, HildaError
from hilda.pipeline.stages.teacher import load_class_maps
from hilda.store.reader import CacheReader
from hilda.teachers.oracle import OracleSpec, OracleTeacher, colour_statistics, majority_class
from tests.pipeline_helpers import build_cache

ORACLE = dict(teacher="oracle", layers="last2", image_size=(112, 56), name="oracle")


def test_majority_class_by_hand() -> None:
    labels = np.zeros((14, 28), dtype=np.uint8)
    labels[:, :14][:8] = 5  # patch 0: 8 rows of 5 (112 px) vs 6 rows of 0 (84 px) -> 5
    labels[:7, 14:] = 9  # patch 1: 98 px of 9 and 98 px of 0, a tie -> the smaller label
    assert majority_class(labels).tolist() == [[5, 0]]


def test_oracle_features_are_class_embeddings_plus_texture() -> None:
    spec = OracleSpec(dim=16, depth=12, texture=0.5, seed=0)
    oracle = OracleTeacher(spec, [10, 11])
    image = np.full((28, 28, 3), 100, np.uint8)
    classes = np.zeros((28, 28), np.uint8)
    classes[:, 14:] = 7
    patches, cls = oracle([image], [classes])
    assert patches.shape == (1, 2, 2, 2, 16) and cls.shape == (1, 2, 16)
    stats = colour_statistics(image)  # flat grey: the same texture term everywhere
    for k in range(2):
        np.testing.assert_allclose(
            patches[0, k, :, 0], oracle.embed[k][0] + stats[:, 0] @ oracle.project[k], rtol=1e-6
        )
        np.testing.assert_allclose(
            patches[0, k, :, 1], oracle.embed[k][7] + stats[:, 1] @ oracle.project[k], rtol=1e-6
        )
        np.testing.assert_allclose(cls[0, k], patches[0, k].mean(axis=(0, 1)), rtol=1e-6)
    assert not np.allclose(oracle.embed[0], oracle.embed[1])  # each block its own embedding
    # Same spec, same features; another seed, other features.
    np.testing.assert_array_equal(OracleTeacher(spec, [10, 11])([image], [classes])[0], patches)
    other = OracleTeacher(OracleSpec(dim=16, seed=1), [10, 11])([image], [classes])[0]
    assert not np.allclose(other, patches)
    assert spec.weights_hash() != OracleSpec(dim=16, seed=1).weights_hash()


def test_stage_writes_the_majority_class_embedding(nusc_cfg: SyntheticConfig, tmp_path) -> None:
    store = str(tmp_path / "cache.zarr")
    build_cache(nusc_cfg.out, store, stages=("index", "pointmaps", "teacher"), teacher=ORACLE)
    group = zarr.open_group(store, mode="r")["teacher/oracle"]
    assert group.attrs["arch"] == "oracle" and group.attrs["depth"] == 12
    assert group.attrs["blocks"] == [10, 11] and group.attrs["random_init"] is False
    path = CacheReader(store).image_path(0, 0)
    expect = majority_class(load_class_maps([path], (112, 56), "frame 0")[0])  # (4, 8)
    reader = CacheReader(store)
    stored = reader.teacher_block(reader.teacher("oracle"), 11, (0, 0))  # (4, 8, 384) decoded
    embed = OracleTeacher(OracleSpec(), [11]).embed[0]  # (256, 384) unit rows
    nearest = (stored @ embed.T).argmax(axis=-1)
    np.testing.assert_array_equal(nearest, expect)
    assert len(np.unique(expect)) > 1


def _world_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_class_map_names_the_file(nusc_cfg: SyntheticConfig, tmp_path: Path) -> None:
    world = _world_copy(nusc_cfg.out, tmp_path / "world")
    store = str(tmp_path / "cache.zarr")
    build_cache(world, store, stages=("index", "pointmaps"))
    paths = CacheReader(store).index()["image_path"]
    gone = class_map_path(str(paths[1, 2]))
    Path(gone).unlink()
    with pytest.raises(HildaError, match="no per-pixel class map.*" + re.escape(Path(gone).name)):
        build_cache(world, store, stages=("teacher",), teacher=ORACLE)
    build_cache(world, store, stages=("teacher",), teacher=ORACLE, skip_bad=True)
    skipped = zarr.open_group(store, mode="r")["teacher/oracle"].attrs["skipped"]
    assert list(skipped) == ["1"] and Path(gone).name in skipped["1"]


def test_oracle_refuses_a_dataset_without_class_maps(
    nusc_cfg: SyntheticConfig, tmp_path: Path
) -> None:
    world = _world_copy(nusc_cfg.out, tmp_path / "world")
    for path in world.rglob("*.classes.png"):
        path.unlink()
    store = str(tmp_path / "cache.zarr")
    build_cache(world, store, stages=("index",))
    with pytest.raises(ConfigError, match="synthetic worlds only"):
        build_cache(world, store, stages=("teacher",), teacher=ORACLE)


def test_class_map_reader_errors(tmp_path: Path) -> None:
    image = tmp_path / "cam.jpg"
    with pytest.raises(HildaError, match=r"cam\.classes\.png"):
        read_class_map(image, "frame-x")
    Path(class_map_path(image)).write_bytes(b"not a png")
    with pytest.raises(HildaError, match="corrupt class map"):
        read_class_map(image, "frame-x")


def test_teacher_probe_cli(nusc_cfg: SyntheticConfig, tmp_path: Path) -> None:
    """``hilda-eval teacher-probe`` on oracle caches of the train and val scenes: the JSON
    result, and a cache whose frames are not in the split is refused naming the frame."""
    from typer.testing import CliRunner

    from hilda.cli.eval import app

    stores = {}
    for split in ("mini_train", "mini_val"):
        stores[split] = str(tmp_path / f"{split}.zarr")
        build_cache(
            nusc_cfg.out,
            stores[split],
            split=split,
            stages=("index", "pointmaps", "teacher"),
            teacher=ORACLE,
        )
    out = tmp_path / "probe.json"
    common = ["--root", str(nusc_cfg.out), "--dataset", "synthetic"]
    sets = [
        "--set",
        "optim.epochs=20",
        "--set",
        "data.num_workers=0",
        "--set",
        "augment.enabled=false",
    ]
    args = ["teacher-probe", "--store", stores["mini_train"], "--val-store", stores["mini_val"]]
    result = CliRunner().invoke(app, [*args, *common, *sets, "--out", str(out)])
    assert result.exit_code == 0, result.output
    probe = json.loads(out.read_text())
    assert probe["protocol"] == "teacher-linear-probe" and probe["teacher"] == "oracle"
    assert probe["val_points"] > 0 and 0.0 <= probe["miou"] <= 1.0
    swapped = [*args[:2], stores["mini_val"], "--val-store", stores["mini_train"]]
    result = CliRunner().invoke(app, [*swapped, *common, *sets, "--out", str(out)])
    assert result.exit_code != 0 and "is not a labelled frame of the split" in result.output
