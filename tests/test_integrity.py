"""Nothing read that was not written, nothing kept that failed: a frame error is not
remembered after its cause is fixed (and ``--skip-bad`` then drops nothing), a result is
never silently replaced, and an unreachable scheduler changes nothing in the store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from hilda.cli.prep import app as prep_app
from hilda.datasets.synthetic.generate import SyntheticConfig, make_synthetic


@pytest.fixture
def small_world(tmp_path: Path) -> Path:
    cfg = SyntheticConfig(
        format="nuscenes", out=tmp_path / "w", scenes=1, frames_per_scene=2, image_size=(224, 112)
    )
    make_synthetic(cfg)
    return cfg.out


def _index(world: Path, store: Path, *extra: str):
    args = ["index", "--root", str(world), "--out", str(store), "--frames-per-shard", "2"]
    return CliRunner().invoke(prep_app, [*args, *extra])


def test_a_fixed_frame_is_read_again_and_skip_bad_drops_nothing(
    small_world: Path, tmp_path: Path
) -> None:
    sweep = sorted((small_world / "samples" / "LIDAR_TOP").glob("*.bin"))[0]
    whole = sweep.read_bytes()
    sweep.write_bytes(whole[:-7])
    store = tmp_path / "s.zarr"
    first = _index(small_world, store)
    assert first.exit_code == 2 and "truncated" in first.output, first.output
    sweep.write_bytes(whole)  # the cause is fixed
    again = _index(small_world, store)
    assert again.exit_code == 0, again.output  # read again, not the remembered error
    points = zarr.open_group(str(store), mode="r")["points"]
    assert dict(points.attrs["skipped"]) == {}
    skip = _index(small_world, store, "--skip-bad")
    assert skip.exit_code == 0 and "skipped 0" in skip.output, skip.output


def test_skip_bad_records_what_is_bad_now(small_world: Path, tmp_path: Path) -> None:
    sweep = sorted((small_world / "samples" / "LIDAR_TOP").glob("*.bin"))[0]
    store = tmp_path / "s.zarr"
    whole = sweep.read_bytes()
    sweep.write_bytes(whole[:-7])
    assert _index(small_world, store).exit_code == 2
    result = _index(small_world, store, "--skip-bad")  # still bad: recorded, the rest kept
    assert result.exit_code == 0 and "skipped 1" in result.output, result.output


def test_an_unreachable_scheduler_changes_nothing(small_world: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    assert _index(small_world, store).exit_code == 0
    before = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    result = _index(small_world, store, "--scheduler", "tcp://127.0.0.1:9", "--overwrite")
    assert result.exit_code == 2, result.output
    assert "cannot reach the Dask scheduler tcp://127.0.0.1:9" in result.output
    assert "nothing in the store was changed" in result.output
    after = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    assert after == before
    assert bool(zarr.open_group(str(store), mode="r")["points"]["done"][:].all())


def test_a_result_is_not_replaced_without_overwrite(nusc_cfg, tmp_path: Path) -> None:
    from hilda.errors import ConfigError
    from hilda.eval.probe import run_segmentation
    from tests.test_eval import seg_config, tiny_backbone

    path = tiny_backbone(tmp_path / "backbone.pt")
    out = tmp_path / "lp.json"
    cfg = seg_config(nusc_cfg.out, optim__max_steps=1)
    first = run_segmentation(cfg, path, out=out)
    kept = out.read_bytes()
    other = seg_config(nusc_cfg.out, optim__max_steps=2)
    with pytest.raises(ConfigError, match=rf"{out} holds a result already: pass --overwrite"):
        run_segmentation(other, path, out=out)
    assert out.read_bytes() == kept
    again = run_segmentation(other, path, out=out, overwrite=True)
    assert again["steps"] == 2 and first["steps"] == 1


# --- tables that contradict themselves, files of another layout ------------------------------


def test_a_token_given_twice_is_an_error_not_the_later_record(nusc_copy: Path) -> None:
    from hilda.datasets import open_dataset
    from hilda.datasets.io import DatasetError
    from tests.test_bad_input import _tables, _write_tables

    poses = _tables(nusc_copy, "ego_pose")
    far = {**poses[0], "translation": [p + 999.0 for p in poses[0]["translation"]]}
    _write_tables(nusc_copy, "ego_pose", [*poses, far])
    with pytest.raises(
        DatasetError, match=rf"ego_pose\.json holds token {poses[0]['token']} twice"
    ):
        open_dataset("nuscenes", str(nusc_copy))


def test_a_reference_to_no_record_names_table_token_and_field(nusc_copy: Path) -> None:
    from hilda.datasets import open_dataset
    from hilda.datasets.io import DatasetError
    from tests.test_bad_input import _tables, _write_tables

    samples = _tables(nusc_copy, "sample")
    samples[1]["scene_token"] = "e" * 32
    _write_tables(nusc_copy, "sample", samples)
    match = rf"sample\.json record {samples[1]['token']}: scene_token {'e' * 32} is no record"
    with pytest.raises(DatasetError, match=match):
        open_dataset("nuscenes", str(nusc_copy))


def test_keyframe_time_going_backwards_is_an_error_or_a_damaged_scene(nusc_copy: Path) -> None:
    from hilda.datasets import open_dataset
    from hilda.datasets.io import DatasetError
    from tests.test_bad_input import _tables, _write_tables

    samples = _tables(nusc_copy, "sample")
    by_token = {s["token"]: s for s in samples}
    second = by_token[samples[0]["next"]]
    second["timestamp"] = samples[0]["timestamp"] - 1
    _write_tables(nusc_copy, "sample", samples)
    with pytest.raises(DatasetError, match=rf"go backwards along 'next': sample {second['token']}"):
        open_dataset("nuscenes", str(nusc_copy))
    reader = open_dataset("nuscenes", str(nusc_copy), skip_bad=True)
    assert any("backwards" in why for why in reader.skipped.values())


def test_a_sweep_of_another_layout_is_named(nusc_copy: Path) -> None:
    import numpy as np

    from hilda.datasets.io import DatasetError, read_sweep

    frame = open_dataset_first(nusc_copy)
    points = np.fromfile(frame.lidar_file, dtype=np.float32).reshape(-1, 5)[:, :4]
    n = len(points) - len(points) % 5  # 4 floats a point, a length that is a multiple of 5
    points[:n].tofile(frame.lidar_file)
    with pytest.raises(DatasetError, match=r"not a nuScenes sweep .* ring index .* another layout"):
        read_sweep(frame.lidar_file, frame.token)


def open_dataset_first(root: Path):
    from hilda.datasets import open_dataset

    return open_dataset("nuscenes", str(root)).frames[0]


@pytest.fixture
def nusc_copy(nusc_cfg, tmp_path: Path) -> Path:
    root = tmp_path / "nusc"
    shutil.copytree(nusc_cfg.out, root)
    return root


# --- every parse error names its file and field, every storage error its path -----------------


@pytest.mark.parametrize(
    "table, field, value, match",
    [
        ("ego_pose", "rotation", "abc", r"ego_pose\.json record \w+: rotation 'abc'"),
        ("sample_data", "width", "224px", r"sample_data\.json record \w+: width '224px'"),
    ],
)
def test_a_non_numeric_table_field_names_table_record_and_field(
    nusc_copy: Path, table: str, field: str, value: str, match: str
) -> None:
    from hilda.datasets import open_dataset
    from hilda.datasets.io import DatasetError
    from tests.test_bad_input import _tables, _write_tables

    rows = _tables(nusc_copy, table)
    for row in rows:
        if field in row and (table != "sample_data" or row.get("width")):
            row[field] = value
    _write_tables(nusc_copy, table, rows)
    with pytest.raises(DatasetError, match=match):
        open_dataset("nuscenes", str(nusc_copy))


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("calib.txt", "Tr: 1 0 0 0 0 1 0 0 0 0 one 0\n", r"calib\.txt, line 1 \(Tr\): not numbers"),
        ("calib.txt", "Tr: 0 0 0 0 0 0 0 0 0 0 0 0\n", r"calib\.txt, line 1: Tr is singular"),
        ("poses.txt", "1 0 0 0 0 1 0 0 0 0 1\n", r"poses\.txt, line 1: a pose is 12 .* got 11"),
    ],
)
def test_semantickitti_calibration_and_poses_errors_name_file_and_line(
    tmp_path: Path, name: str, text: str, match: str
) -> None:
    from hilda.datasets.io import DatasetError
    from hilda.datasets.semantickitti import read_calib, read_poses

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DatasetError, match=match):
        (read_calib if name == "calib.txt" else read_poses)(path)


def test_a_stray_file_in_an_av2_sensor_folder_is_named(av2_cfg, tmp_path: Path) -> None:
    from hilda.datasets import open_dataset
    from hilda.datasets.io import DatasetError

    root = tmp_path / "av2"
    shutil.copytree(av2_cfg.out, root)
    lidar = next((root / "train").glob("*/sensors/lidar"))
    stray = lidar / f"._{next(lidar.glob('*.feather')).name}"
    stray.write_bytes(b"\x00\x05resource fork")
    with pytest.raises(DatasetError, match=rf"{stray} is not named <timestamp_ns>\.feather"):
        open_dataset("av2", str(root), split="train")


def test_a_truncated_store_metadata_file_is_named(small_world: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    assert _index(small_world, store).exit_code == 0
    meta = store / "zarr.json"
    meta.write_text(meta.read_text()[:20])
    result = CliRunner().invoke(prep_app, ["validate", "--store", str(store)])
    assert result.exit_code == 2 and "zarr.json) is not valid JSON" in result.output


def test_a_full_disk_is_one_line_naming_the_path() -> None:
    import errno

    from hilda.pipeline.stages.common import StageOptions, StoreIOError, locked_stage

    @locked_stage("extract-teacher")
    def stage(cfg, options):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/c.zarr/teacher/x/c/0")

    class Cfg:
        store = "memory://full"

    with pytest.raises(StoreIOError, match=r"No space left on device writing /data/c\.zarr/"):
        stage(Cfg(), StageOptions())
