"""The cache reader: its reads equal the arrays the stages wrote (one gathered round trip or
one read at a time, float16 and int8 teachers), teacher selection, the schema and
completeness checks, and reopening after a fork."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from hilda.pipeline.runner import ClusterConfig
from hilda.pipeline.stages.common import StageOptions
from hilda.pipeline.stages.teacher import TeacherConfig, run_teacher
from hilda.store import codecs
from hilda.store.codecs import unpack
from hilda.store.reader import CacheMismatchError, CacheReader
from tests.train_helpers import IMAGE

FRAME = 3


def _direct(store: str, f: int, teacher: str, block: int) -> dict[str, np.ndarray]:
    """Frame ``f``'s arrays read with zarr directly, as the stages wrote them."""
    root = zarr.open_group(store, mode="r")
    a, b = root["points/offsets"][f : f + 2]
    c, d = root["pointmaps/offsets"][f : f + 2]
    g = f"teacher/{teacher}"
    return {
        "points": root["points/data"][a:b],
        "point": root["pointmaps/point"][c:d],
        "cam": root["pointmaps/cam"][c:d],
        "uv": root["pointmaps/uv"][c:d],
        "block": root[f"{g}/layer_{block}"][f],
        "cls": root[f"{g}/cls"][f][:, list(root[g].attrs["blocks"]).index(block)],
        "bev": unpack(root["occupancy/bev"][f]),
    }


def test_reads_equal_the_stored_arrays(train_store: str) -> None:
    reader = CacheReader(train_store, ["index", "points", "pointmaps", "occupancy"])
    t = reader.teacher("vitb")
    block = t.depth - 1
    want = _direct(train_store, FRAME, "vitb", block)
    gathered = reader.gather(
        reader.points_reads(FRAME),
        reader.pairs_reads(FRAME),
        reader.teacher_block_reads(t, block, FRAME),
        reader.cls_reads(t, FRAME, block),
        reader.occupancy_reads(FRAME),
    )
    one_by_one = [
        reader.points(FRAME),
        reader.pairs(FRAME),
        reader.teacher_block(t, block, FRAME),
        reader.cls(t, FRAME, block),
        reader.occupancy(FRAME),
    ]
    for points, pairs, grid, cls, bev in (gathered, one_by_one):
        np.testing.assert_array_equal(points, want["points"])
        assert points.dtype == np.float32 and points.shape[1] == 4
        np.testing.assert_array_equal(pairs.point, want["point"])
        np.testing.assert_array_equal(pairs.cam, want["cam"])
        np.testing.assert_array_equal(pairs.uv, want["uv"])
        np.testing.assert_array_equal(grid, want["block"])
        assert grid.shape == (len(reader.cameras), IMAGE[1] // 14, IMAGE[0] // 14, t.dim)
        np.testing.assert_array_equal(cls, want["cls"])
        np.testing.assert_array_equal(bev, want["bev"])
    # One camera's grid.
    np.testing.assert_array_equal(reader.teacher_block(t, block, (FRAME, 2)), want["block"][2])


@pytest.fixture(scope="module")
def int8_store(train_store: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The training cache plus teacher/q: the random ViT-S/14's last 2 blocks in int8."""
    store = str(tmp_path_factory.mktemp("int8") / "int8.zarr")
    shutil.copytree(train_store, store)
    cfg = TeacherConfig(
        store=store,
        teacher="random:vits14",
        layers="last2",
        image_size=IMAGE,
        name="q",
        codec="int8",
    )
    run_teacher(cfg, StageOptions(cluster=ClusterConfig(workers=1)))
    return store


def test_int8_teacher_is_decoded(int8_store: str) -> None:
    store = int8_store
    reader = CacheReader(store)
    t = reader.teacher("q")
    assert t.int8 and t.blocks == (10, 11)
    root = zarr.open_group(store, mode="r")
    g = root["teacher/q"]
    want = codecs.decode(
        g["layer_11"][FRAME], (g["layer_11_scale"][FRAME], g["layer_11_token_scale"][FRAME])
    )
    got = reader.teacher_block(t, 11, FRAME)
    np.testing.assert_array_equal(got, want)
    float16 = reader.teacher_block(reader.teacher("vits"), 11, FRAME).astype(np.float32)
    cos = codecs.token_cosines(float16, got)  # the same teacher, image size and block
    assert cos.min() > 0.99, cos.min()


def test_teacher_selection(train_store: str) -> None:
    reader = CacheReader(train_store)
    assert reader.teacher_names() == [
        "dinov3_vitb16",
        "dinov3_vitl16",
        "dinov3_vits16",
        "vitb",
        "vitl",
        "vits",
    ]
    assert reader.teacher(arch="vitl14").name == "vitl"
    with pytest.raises(CacheMismatchError, match="several teachers"):
        reader.teacher()
    with pytest.raises(
        CacheMismatchError, match=r"no teacher/nope/ \(present: dinov3_vitb16, .*, vits\)"
    ):
        reader.teacher("nope")


def test_schema_and_completeness_errors(train_store: str, tmp_path: Path) -> None:
    with pytest.raises(CacheMismatchError, match=r"no cache at .*: build it with `hilda-prep"):
        CacheReader(str(tmp_path / "missing.zarr"))
    store = str(tmp_path / "copy.zarr")
    shutil.copytree(train_store, store)
    root = zarr.open_group(store, mode="r+")
    root["occupancy/done"][0] = False
    with pytest.raises(
        CacheMismatchError, match=r"occupancy/ is incomplete .*`hilda-prep build-occupancy"
    ):
        CacheReader(store, ["index", "occupancy"])
    root.attrs["schema_version"] = 99
    with pytest.raises(CacheMismatchError, match="version 99, this hilda reads"):
        CacheReader(store)


_FORKED: list[CacheReader] = []  # the parent's reader, inherited (not pickled) by the child


def _points_in_child(frame: int) -> np.ndarray:
    return _FORKED[0].points(frame)


def test_reopens_after_fork(train_store: str) -> None:
    """A forked DataLoader worker reads through its own handles (the parent's are not
    reused), with the same result."""
    reader = CacheReader(train_store)
    want = reader.points(FRAME)  # handles opened in the parent
    _FORKED[:] = [reader]
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_points_in_child, (FRAME,)).get(timeout=120)
    np.testing.assert_array_equal(got, want)


def test_int8_grids_travel_as_stored_and_dequantise_on_the_device(int8_store: str) -> None:
    """The loader hands int8 grids over as stored (1 byte a value plus the scales); the
    model's dequantisation equals the codec's decode."""
    from hilda.engine.config_io import load_config
    from hilda.models.grid import QuantizedGrid
    from hilda.train.config import TrainConfig
    from hilda.train.data import CacheDataset, check_cache, collate, sample_index
    from tests.train_helpers import SMALL

    cfg = load_config(TrainConfig, "tiny_cpu", [*SMALL, "data.teacher=q"])
    info = check_cache(int8_store, cfg)
    dataset = CacheDataset(cfg, info, sample_index(int8_store, info, cfg.needs_occupancy))
    sample = dataset[(0, 0)]
    grid = collate([sample]).grids[0]  # offset 0: the last block, 11
    assert isinstance(grid, QuantizedGrid) and grid.values.dtype == torch.int8
    reader = CacheReader(int8_store)
    t = reader.teacher("q")
    clouds = (sample["prev"], sample["frame"])  # cloud 0 is t-1, cloud 1 is t0
    want = np.concatenate([reader.teacher_block(t, 11, f) for f in clouds])
    np.testing.assert_array_equal(grid.dequantize().numpy(), want)


def test_training_reads_an_int8_teacher(int8_store: str, tmp_path: Path) -> None:
    from hilda.engine.config_io import load_config
    from hilda.train.config import TrainConfig
    from hilda.train.loop import train
    from tests.train_helpers import SMALL

    cfg = load_config(TrainConfig, "tiny_cpu", [*SMALL, "data.teacher=q", "optim.max_steps=2"])
    result = train(cfg, int8_store, tmp_path / "run")
    assert result.steps == 2 and np.isfinite(result.final["distill"])
