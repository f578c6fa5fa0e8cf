"""Bad input gives a clear error naming the file or frame, not a traceback from numpy."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hilda.cli.prep import app
from hilda.datasets import open_dataset
from hilda.datasets.io import DatasetError, read_image, read_lidarseg_labels, read_sweep
from hilda.datasets.synthetic.generate import SyntheticConfig


@pytest.fixture
def nusc_copy(nusc_cfg: SyntheticConfig, tmp_path: Path) -> Path:
    root = tmp_path / "nusc"
    shutil.copytree(nusc_cfg.out, root)
    return root


def _first_frame(root: Path):
    return open_dataset("nuscenes", str(root)).frames[0]


def test_truncated_sweep(nusc_copy: Path) -> None:
    frame = _first_frame(nusc_copy)
    data = Path(frame.lidar_file).read_bytes()
    Path(frame.lidar_file).write_bytes(data[: len(data) - 7])
    with pytest.raises(
        DatasetError,
        match=rf"truncated sweep.*{re.escape(Path(frame.lidar_file).name)} \(frame {frame.token}\)",
    ):
        read_sweep(frame.lidar_file, frame.token)


def test_empty_sweep(nusc_copy: Path) -> None:
    frame = _first_frame(nusc_copy)
    Path(frame.lidar_file).write_bytes(b"")
    with pytest.raises(DatasetError, match=rf"empty sweep.*{frame.token}"):
        read_sweep(frame.lidar_file, frame.token)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_points(nusc_copy: Path, bad: float) -> None:
    frame = _first_frame(nusc_copy)
    pts = np.fromfile(frame.lidar_file, dtype=np.float32).reshape(-1, 5)
    pts[10, 1] = bad
    pts.tofile(frame.lidar_file)
    with pytest.raises(
        DatasetError,
        match=rf"1 of {len(pts)} points with NaN or inf \(first at row 10\).*{frame.token}",
    ):
        read_sweep(frame.lidar_file, frame.token)


def test_non_finite_av2_points(av2_cfg: SyntheticConfig, tmp_path: Path) -> None:
    import pandas as pd
    from pyarrow import feather

    root = tmp_path / "av2"
    shutil.copytree(av2_cfg.out, root)
    frame = open_dataset("av2", str(root), split="train").frames[0]
    df = feather.read_feather(frame.lidar_file)
    df.loc[3, "z"] = np.float16(np.nan)
    feather.write_feather(pd.DataFrame(df), frame.lidar_file)
    with pytest.raises(DatasetError, match="NaN or inf"):
        read_sweep(frame.lidar_file, frame.token)
    Path(frame.lidar_file).write_bytes(b"not a feather file")
    with pytest.raises(DatasetError, match=rf"unreadable sweep.*{frame.token}"):
        read_sweep(frame.lidar_file, frame.token)


@pytest.mark.parametrize(
    "table,field", [("ego_pose", "translation"), ("calibrated_sensor", "rotation")]
)
def test_non_finite_calibration(nusc_copy: Path, table: str, field: str) -> None:
    path = nusc_copy / "v1.0-mini" / f"{table}.json"
    rows = json.loads(path.read_text())
    rows[0][field][1] = float("nan")  # json writes NaN, as a broken export would
    path.write_text(json.dumps(rows))
    # The message names the table, the record and whose pose it is, not a camera calibration.
    with pytest.raises(
        DatasetError,
        match=rf"{table}\.json record {rows[0]['token']} \(of \w+ sample_data \w+, frame \w+\) "
        "has NaN or inf in its rotation or translation",
    ):
        open_dataset("nuscenes", str(nusc_copy))


def test_missing_image(nusc_copy: Path) -> None:
    frame = _first_frame(nusc_copy)
    victim = Path(frame.cameras[2].image_file)
    victim.unlink()
    with pytest.raises(
        DatasetError,
        match=rf"missing CAM_BACK_RIGHT image: {re.escape(str(victim))} \(frame {frame.token}\)",
    ):
        open_dataset("nuscenes", str(nusc_copy))


def test_corrupt_image(nusc_copy: Path) -> None:
    frame = _first_frame(nusc_copy)
    path = Path(frame.cameras[0].image_file)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(
        DatasetError, match=rf"corrupt image.*{re.escape(path.name)} \(frame {frame.token}\)"
    ):
        read_image(path, frame.token)


def test_label_count_mismatch(nusc_copy: Path) -> None:
    frame = _first_frame(nusc_copy)
    with pytest.raises(DatasetError, match="labels for a sweep of 5 points"):
        read_lidarseg_labels(frame.labels_file, 5, frame.token)


def test_missing_version_folder(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError, match=rf"version folder {tmp_path}/v1.0-trainval does not exist"
    ):
        open_dataset("nuscenes", str(tmp_path), version="v1.0-trainval")
    with pytest.raises(DatasetError, match=r"split folder .*/val does not exist"):
        open_dataset("av2", str(tmp_path), split="val")


def test_cli_reports_one_clear_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["frames", "--root", str(tmp_path), "--version", "v1.0-test"])
    assert result.exit_code == 2
    assert "version folder" in result.output and "Traceback" not in result.output


def _tables(root: Path, name: str) -> list[dict]:
    return json.loads((root / "v1.0-mini" / f"{name}.json").read_text())


def _write_tables(root: Path, name: str, rows: list[dict]) -> None:
    (root / "v1.0-mini" / f"{name}.json").write_text(json.dumps(rows))


def test_a_link_to_a_missing_sample_names_the_tables_and_token(nusc_copy: Path) -> None:
    samples = _tables(nusc_copy, "sample")
    samples[0]["next"] = "f" * 32
    _write_tables(nusc_copy, "sample", samples)
    with pytest.raises(DatasetError, match=rf"links to sample {'f' * 32}, which sample\.json"):
        open_dataset("nuscenes", str(nusc_copy))


def test_a_chain_that_skips_a_sample_is_an_error_not_a_dropped_frame(nusc_copy: Path) -> None:
    samples = _tables(nusc_copy, "sample")
    by_token = {s["token"]: s for s in samples}
    first = next(s for s in samples if not s["prev"])
    second = by_token[first["next"]]
    first["next"] = second["next"]  # past the second sample
    _write_tables(nusc_copy, "sample", samples)
    with pytest.raises(DatasetError, match=r"nbr_samples=3 in scene\.json, but 2 samples"):
        open_dataset("nuscenes", str(nusc_copy))


def test_looping_samples_are_an_error(nusc_copy: Path) -> None:
    samples = _tables(nusc_copy, "sample")
    first = next(s for s in samples if not s["prev"])
    last = next(s for s in samples if s["scene_token"] == first["scene_token"] and not s["next"])
    last["next"] = first["token"]
    _write_tables(nusc_copy, "sample", samples)
    with pytest.raises(DatasetError, match=rf"loop back to sample {first['token']}"):
        open_dataset("nuscenes", str(nusc_copy))


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_an_unreadable_teacher_checkpoint_names_the_file(tmp_path: Path, content: bytes) -> None:
    from hilda.errors import ConfigError
    from hilda.teachers import build_teacher

    path = tmp_path / "dinov2_vits14_pretrain.pth"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"teacher checkpoint {re.escape(str(path))} cannot"):
        build_teacher(str(path))


@pytest.mark.parametrize(
    "override",
    [
        "optim.max_steps=-5",
        "optim.epochs=0",
        "optim.batch_size=0",
        "optim.lr=0",
        "run.checkpoint_every=0",
    ],
)
def test_check_refuses_what_run_would(override: str, train_store: str, tmp_path: Path) -> None:
    """`hilda-train check` and `hilda-train run` refuse the same value with the same line."""
    from typer.testing import CliRunner

    from hilda.cli.train import app

    key = override.split("=")[0]
    args = ["--config", "tiny_cpu", "--store", train_store, "--set", override]
    check = CliRunner().invoke(app, ["check", *args])
    run = CliRunner().invoke(app, ["run", *args, "--out", str(tmp_path / "run")])
    for result in (check, run):
        assert result.exit_code == 2, result.output
        assert key in result.output, result.output
    assert check.output.strip() == run.output.strip()
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "channel, name", [("LIDAR_TOP", "../../../../tmp/outside.bin"), ("CAM_FRONT", "/etc/passwd")]
)
def test_table_file_names_outside_the_root_are_refused(
    nusc_copy: Path, channel: str, name: str
) -> None:
    sensors = {s["token"]: s for s in _tables(nusc_copy, "sensor")}
    calibrated = {
        c["token"]: sensors[c["sensor_token"]] for c in _tables(nusc_copy, "calibrated_sensor")
    }
    rows = _tables(nusc_copy, "sample_data")
    row = next(r for r in rows if calibrated[r["calibrated_sensor_token"]]["channel"] == channel)
    row["filename"] = name
    _write_tables(nusc_copy, "sample_data", rows)
    with pytest.raises(
        DatasetError, match=rf"sample_data record {row['token']}: file name .* outside the dataset"
    ):
        open_dataset("nuscenes", str(nusc_copy))
