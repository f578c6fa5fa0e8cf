"""The store layout as code, and validate_store, over a local folder and a memory:// URL."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from hilda.errors import HildaError
from hilda.store.schema import INDEX, OCCUPANCY, POINTS, array_layout, teacher_group
from hilda.store.validate import StoreValidationError, validate_store
from hilda.store.writer import create_group, done_map, init_store, mark_shard_done, shard_stats

F, V, FPS = 5, 6, 2


@pytest.fixture(params=["local", "memory"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "cache.zarr")
    return f"memory://hilda-test-{uuid.uuid4().hex}"


def _make(url: str) -> zarr.Group:
    root = init_store(url, dataset="nuscenes", version="v1.0-mini", split="all")
    dims = {"F": F, "V": V}
    attrs = {
        "cameras": [f"C{i}" for i in range(V)],
        "num_frames": F,
        "frames_per_shard": FPS,
        "dataset_root": "/data",
    }
    create_group(root, INDEX, dims, FPS, attrs)
    create_group(
        root, POINTS, {**dims, "P": 1000}, FPS, {"columns": ["x", "y", "z", "i"], "frame": "lidar"}
    )
    return root


def test_valid_store_passes(store_url: str) -> None:
    _make(store_url)
    root = validate_store(store_url, require=("index", "points"))
    assert root["index/cam_to_ego"].shape == (F, V, 4, 4)
    assert root["index/done"].shape == (3,)


def test_every_violation_reported_at_once(store_url: str) -> None:
    root = _make(store_url)
    root.attrs["schema_version"] = 999
    del root["points"]["offsets"]
    root["points"].create_array("offsets", shape=(F + 3,), dtype="int64", chunks=(F + 3,))
    del root["index"]["timestamp"]
    root["index"].create_array("timestamp", shape=(F,), dtype="float32", chunks=(1,))
    del root["index"]["cam_to_ego"]
    with pytest.raises(StoreValidationError) as info:
        validate_store(store_url, require=("index", "points", "occupancy"), teacher="dinov2_vits14")
    msg = str(info.value)
    assert "schema_version is 999" in msg
    assert "array index/cam_to_ego is missing" in msg
    assert "index/timestamp: dtype float32, expected int64" in msg
    assert "points/offsets: frames count mismatch" in msg
    assert "group occupancy/ is missing" in msg
    assert "teacher/dinov2_vits14/ is missing" in msg
    assert len(info.value.problems) == 6


def test_other_dataset_and_missing_store(tmp_path: Path, store_url: str) -> None:
    _make(store_url)
    with pytest.raises(StoreValidationError, match="built from dataset 'nuscenes', not 'av2'"):
        validate_store(store_url, dataset="av2")
    with pytest.raises(StoreValidationError, match="no Zarr group"):
        validate_store(str(tmp_path / "nope.zarr"))


def test_teacher_group_checked(store_url: str) -> None:
    root = _make(store_url)
    spec = teacher_group("vits", [10, 11])
    attrs = {k: 0 for k in spec.required_attrs} | {"blocks": [10, 11], "storage_dtype": "float16"}
    create_group(root, spec, {"F": F, "V": V, "h": 16, "w": 32, "D": 384}, FPS, attrs)
    validate_store(store_url, teacher="vits")
    del root["teacher/vits"]["layer_11"]
    root["teacher/vits"].create_array(
        "layer_11", shape=(F, V, 16, 31, 384), dtype="float16", chunks=(1, V, 16, 31, 384)
    )
    with pytest.raises(StoreValidationError, match="layer_11: axis 3 is 31, but w=32"):
        validate_store(store_url)


def test_layout_chunks_one_frame_and_shards() -> None:
    kw = array_layout(OCCUPANCY.array("bev"), {"F": 100, "H": 512, "W8": 64}, 32)
    assert kw["chunks"] == (1, 512, 64) and kw["shards"] == (32, 512, 64)
    small = array_layout(OCCUPANCY.array("valid"), {"F": 100}, 32)  # read whole at start-up
    assert small["chunks"] == (32,) and small["shards"] is None
    ragged = array_layout(POINTS.array("data"), {"F": 100, "P": 3_000_000}, 32)
    assert ragged["chunks"][0] == 1 << 16 and ragged["shards"][0] % ragged["chunks"][0] == 0
    assert np.dtype(array_layout(INDEX.array("token"), {"F": 3}, 32)["dtype"]).kind == "U"


def test_the_index_is_chunked_by_thousands_of_frames(tmp_path: Path) -> None:
    """The driver writes the index whole: a chunk holds 1024 frames (at least a shard's), so
    writing and reading F rows touches F / 1024 chunks (not F, as one frame a chunk would)."""
    kw = array_layout(INDEX.array("cam_to_ego"), {"F": 5000, "V": 6}, 32, driver_written=True)
    assert kw["chunks"] == (1024, 6, 4, 4) and kw["shards"] is None
    kw = array_layout(INDEX.array("token"), {"F": 5000}, 2048, driver_written=True)
    assert kw["chunks"] == (2048,)
    root = _make(str(tmp_path / "cache.zarr"))
    assert root["index/token"].chunks == (F,) and root["index/token"].shards is None
    root["index/timestamp"][:] = np.arange(F)
    assert len(list((tmp_path / "cache.zarr" / "index" / "timestamp" / "c").iterdir())) == 1


def test_shard_statistics_are_one_row_a_shard(tmp_path: Path) -> None:
    """A shard's statistics go to its own row (no attribute rewritten with every shard's),
    read back as recorded, in any order of completion; a shard with other statistics than
    the group's is refused."""
    root = _make(str(tmp_path / "cache.zarr"))
    occ = create_group(root, OCCUPANCY, {"F": F, "H": 8, "W8": 1}, FPS, {})
    for shard in (2, 0):
        mark_shard_done(occ, shard, None, {"layer_11": [shard + 0.5, 10.0, 0.9], "n": [shard]})
    assert list(done_map(occ)) == [True, False, True]
    assert shard_stats(occ) == {
        "0": {"layer_11": [0.5, 10.0, 0.9], "n": [0.0]},
        "2": {"layer_11": [2.5, 10.0, 0.9], "n": [2.0]},
    }
    assert "shard_stats" not in occ.attrs
    with pytest.raises(HildaError, match="shard 1 has statistics"):
        mark_shard_done(occ, 1, None, {"layer_11": [1.0, 2.0]})
    assert list(done_map(occ)) == [True, False, True]


def test_the_store_package_owns_the_format() -> None:
    """Only ``hilda.store`` knows the store's paths, and it depends on nothing above it: no
    module outside it holds a store path string, none inside imports pipeline, train, models,
    eval or cli."""
    import ast

    package = Path(__file__).resolve().parents[1] / "hilda"
    groups = ("index", "points", "pointmaps", "occupancy", "teacher", "_staging")
    above = ("hilda.pipeline", "hilda.train", "hilda.models", "hilda.eval", "hilda.cli")
    paths, imports = [], []
    for file in sorted(package.rglob("*.py")):
        inside = file.parent.name == "store"
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            if inside and isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                imports += [f"{file.name}: {n}" for n in names if n.startswith(above)]
            if not inside and isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.startswith(tuple(f"{g}/" for g in groups)):
                    paths.append(f"{file.relative_to(package)}:{node.lineno} {node.value!r}")
    assert not paths, paths
    assert not imports, imports
