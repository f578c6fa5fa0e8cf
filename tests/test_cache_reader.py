"""The cache reader: its reads equal the arrays the stages wrote (one gathered round trip or
one read at a time, float16 and int8 teachers), teacher selection, the schema and
completeness checks, and reopening after a fork."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from hilda.cache import CacheMismatchError, CacheReader
from hilda.pipeline.ops import codecs
from hilda.pipeline.ops.occupancy import unpack
from hilda.pipeline.runner import ClusterConfig
from hilda.pipeline.stages.common import StageOptions
from hilda.pipeline.stages.teacher import TeacherConfig, run_teacher
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


def test_int8_teacher_is_decoded(train_store: str, tmp_path: Path) -> None:
    store = str(tmp_path / "int8.zarr")
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
