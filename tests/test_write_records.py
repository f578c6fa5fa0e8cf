"""Nothing read that was not written: every stage records the files each shard wrote
(``hilda.store.written``), and a deleted, truncated or damaged shard file is an error in
``hilda-prep validate`` (sizes; content with ``--deep``), in ``hilda-train check`` and
``run``, in the stages that read the group, and in the reader itself, naming the group,
the shard and the command that rebuilds it. Zarr alone reads a missing chunk as zeros."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from hilda.cli.prep import app as prep_app
from hilda.cli.train import app as train_app
from hilda.store import INDEX, OCCUPANCY, POINTMAPS, POINTS
from hilda.store.reader import CacheReader
from hilda.store.validate import validate_store
from hilda.store.written import (
    RECORD,
    ROWS_RECORD,
    DamagedShardError,
    check_group,
    compare,
    describe,
    keys_of_rows,
    put_record,
    record_array,
)

TEACHER = "vits"  # the train cache's random ViT-S/14 group, 3 shards of 2 frames


@pytest.fixture
def store(train_store: str, tmp_path: Path) -> Path:
    """A copy of the training cache with one teacher group (the others are not needed)."""
    out = tmp_path / "c.zarr"

    def ignore(folder: str, names: list[str]) -> list[str]:
        if Path(folder).name != "teacher":
            return []
        return [n for n in names if (Path(folder) / n).is_dir() and n != TEACHER]

    shutil.copytree(train_store, out, ignore=ignore)
    return out


def _shard_file(store: Path, array: str, shard: int) -> Path:
    path = store / array / "c" / str(shard)
    if path.is_file():  # a 1-d array's chunk
        return path
    files = sorted(path.rglob("*"))
    files = [f for f in files if f.is_file()]
    assert len(files) == 1, files
    return files[0]


def _validate(store: Path, *extra: str):
    return CliRunner().invoke(prep_app, ["validate", "--store", str(store), *extra])


def _check(store: Path):
    args = ["check", "--config", "tiny_cpu", "--store", str(store)]
    return CliRunner().invoke(train_app, [*args, "--set", f"data.teacher={TEACHER}"])


def test_every_group_records_what_it_wrote(store: Path) -> None:
    root = zarr.open_group(str(store), mode="r")
    for path in ("points", "pointmaps"):
        group = root[path]
        assert RECORD in group.attrs and "offsets/c/0" in group.attrs[RECORD]
        rows = [json.loads(t) for t in np.asarray(group[ROWS_RECORD][:])]
        assert rows and all(rows), path
    for path in ("occupancy", f"teacher/{TEACHER}"):
        records = [json.loads(t) for t in np.asarray(root[path][RECORD][:])]
        assert len(records) == root[path]["done"].shape[0] == 3
        for shard, record in enumerate(records):
            assert record and all(f"/c/{shard}" in key for key in record), record
    assert set(root["index"].attrs[RECORD]) >= {"token/c/0", "lidar_to_ego/c/0/0/0"}
    assert _validate(store).exit_code == 0
    assert _validate(store, "--deep").exit_code == 0


def test_a_deleted_points_shard_is_refused_everywhere(store: Path) -> None:
    _shard_file(store, "points/data", 0).unlink()
    result = _validate(store)
    assert result.exit_code == 2, result.output
    assert "points/ row shard 0: data/c/0/0 is missing" in result.output
    assert "hilda-prep index --overwrite" in result.output
    check = _check(store)
    assert check.exit_code == 2 and "points/ row shard 0" in check.output, check.output
    reader = CacheReader(str(store), [INDEX, POINTS])  # opening is cheap; reading refuses
    with pytest.raises(DamagedShardError, match=r"points/ row shard 0: data/c/0/0 is missing"):
        reader.points(0)
    rebuild = CliRunner().invoke(
        prep_app, ["build-pointmaps", "--store", str(store), "--overwrite", "--workers", "1"]
    )
    assert rebuild.exit_code == 2 and "points/ row shard 0" in rebuild.output, rebuild.output
    assert bool(zarr.open_group(str(store), mode="r")["pointmaps"]["done"][:].all())


def test_a_deleted_teacher_shard_is_refused_and_the_others_read(store: Path) -> None:
    group = f"teacher/{TEACHER}"
    root = zarr.open_group(str(store), mode="r")
    block = int(root[group].attrs["blocks"][-1])
    _shard_file(store, f"{group}/layer_{block}", 1).unlink()
    result = _validate(store)
    assert result.exit_code == 2, result.output
    assert f"{group}/ shard 1: layer_{block}/c/1/0/0/0/0 is missing" in result.output
    assert "hilda-prep extract-teacher --overwrite" in result.output
    reader = CacheReader(str(store), [INDEX, POINTS])
    teacher = reader.teacher(TEACHER)
    assert np.abs(reader.teacher_block(teacher, block, 0)).sum() > 0  # shard 0 is whole
    with pytest.raises(DamagedShardError, match=rf"{group}/ shard 1"):
        reader.teacher_block(teacher, block, 2)  # frames 2-3: shard 1
    with pytest.raises(DamagedShardError, match=rf"{group}/ shard 1"):
        reader.cls(teacher, 3, block)  # its shard, through another array
    assert _check(store).exit_code == 2


def test_truncated_and_damaged_files_and_every_damaged_shard_is_listed(store: Path) -> None:
    bev = _shard_file(store, "occupancy/bev", 2)
    bev.write_bytes(bev.read_bytes()[:-5])  # truncated: found by sizes
    cls = _shard_file(store, f"teacher/{TEACHER}/cls", 0)
    data = bytearray(cls.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content: found by --deep only
    cls.write_bytes(bytes(data))
    sizes = _validate(store)
    assert sizes.exit_code == 2 and "(1 problems)" in sizes.output, sizes.output
    assert "occupancy/ shard 2: bev/c/2/0/0 is" in sizes.output
    deep = _validate(store, "--deep")
    assert deep.exit_code == 2 and "(2 problems)" in deep.output, deep.output
    assert f"teacher/{TEACHER}/ shard 0: cls/c/0/0/0/0 is damaged (CRC-32" in deep.output
    assert "occupancy/ shard 2" in deep.output
    reader = CacheReader(str(store), [INDEX, POINTS, OCCUPANCY])
    reader.occupancy(0)
    with pytest.raises(DamagedShardError, match="occupancy/ shard 2: bev/c/2/0/0 is"):
        reader.occupancy(5)


def test_a_finished_shard_without_its_record_is_refused(store: Path) -> None:
    record = _shard_file(store, "occupancy/written", 1)
    record.unlink()
    result = _validate(store)
    assert result.exit_code == 2, result.output
    assert "occupancy/ shard 1: finished but has no write record" in result.output
    reader = CacheReader(str(store), [INDEX, POINTS, OCCUPANCY])
    with pytest.raises(DamagedShardError, match="occupancy/ shard 1: it has no write record"):
        reader.occupancy(2)
    with pytest.raises(DamagedShardError, match="occupancy/ shard 1"):
        reader.occupancy_valid()  # read whole at start-up: every shard is checked


def test_a_lost_index_chunk_is_refused(store: Path) -> None:
    (store / "index" / "lidar_to_ego" / "c" / "0" / "0" / "0").unlink()
    result = _validate(store)
    assert result.exit_code == 2 and "index/ whole arrays: lidar_to_ego/c/0/0/0" in result.output
    reader = CacheReader(str(store), [INDEX, POINTS])
    with pytest.raises(DamagedShardError, match="index/ whole arrays"):
        reader.lidar_to_ego()
    reader.prev()  # another whole array: its own record, intact


def test_an_all_fill_shard_is_recorded_as_no_file(tmp_path: Path) -> None:
    """zarr writes no file for a shard that is all fill: its record says so, it validates and
    reads as the zeros it is; a file appearing there later is a difference."""
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    arr = group.create_array("x", shape=(4, 3), dtype="float32", chunks=(1, 3), shards=(2, 3))
    arr[0:2] = 1.0
    arr[2:4] = 0.0  # all fill: no file
    record_array(group, RECORD, 2)
    group.create_array("done", shape=(2,), dtype="bool", chunks=(1,), fill_value=False)
    for shard in (0, 1):
        keys = keys_of_rows(group, ["x"], 2 * shard, 2 * shard + 2)
        put_record(group, RECORD, shard, describe(group, keys))
        group["done"][shard] = True
    records = [json.loads(t) for t in np.asarray(group[RECORD][:])]
    assert records[1] == {"x/c/1/0": None} and records[0]["x/c/0/0"][0] > 0
    assert check_group(group) == [] and check_group(group, deep=True) == []
    assert compare({"x/c/1/0": None}, {"x/c/1/0": 12}) == [
        "x/c/1/0 exists (12 bytes) but was written as all fill (no file)"
    ]
    assert compare({"x/c/0/0": [40, 1]}, {"x/c/0/0": 40}) == []


def test_a_store_reached_through_validate_store_checks_only_when_asked(store: Path) -> None:
    """Every command's schema check stays cheap; the file check is opt-in (``files``) and the
    commands that read (stages, check, run, the reader) ask for it."""
    _shard_file(store, "points/data", 0).unlink()
    validate_store(str(store), require=["index", "points"])  # layout only: fine
    with pytest.raises(Exception, match="points/ row shard 0"):
        validate_store(str(store), files="sizes")
    validate_store(str(store), files="sizes", files_of=["occupancy"])  # another group: fine
    assert POINTMAPS.name in zarr.open_group(str(store), mode="r")


def test_a_group_built_before_records_is_read_with_a_note(store: Path) -> None:
    root = zarr.open_group(str(store), mode="r+")
    del root["occupancy"][RECORD]
    result = _validate(store)
    assert result.exit_code == 0, result.output
    assert "occupancy/ was built before write records" in result.output
    reader = CacheReader(str(store), [INDEX, POINTS, OCCUPANCY])
    assert reader.occupancy(0).shape == (256, 256)
