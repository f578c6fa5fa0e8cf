"""Reliability findings not covered by test_lock / test_pipeline_resume / test_bad_input: a
cluster without workers, broken sample links with --skip-bad, images whose size differs from
their table, truncated label files found at prep, bad frames in build-pointmaps, the ragged
stages' progress counts and the index's root-relative paths. Every test synchronises on state
(no workers at all, files written), never on sleeps."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from hilda.cli.prep import app
from hilda.datasets import open_dataset
from hilda.datasets.io import DatasetError
from hilda.datasets.synthetic.generate import SyntheticConfig
from hilda.errors import FrameError
from hilda.pipeline.runner import ClusterConfig, NoWorkersError
from hilda.pipeline.stages.common import StageOptions
from hilda.pipeline.stages.index import IndexConfig, run_index
from hilda.pipeline.stages.pointmaps import PointmapConfig, run_pointmaps
from hilda.pipeline.stages.teacher import TeacherConfig, load_images, run_teacher
from hilda.store.ragged import frames_counted, row_shards
from hilda.store.schema import dataset_file
from hilda.store.written import data_arrays, describe_whole, put_whole_record
from tests.pipeline_helpers import build_cache

ORACLE = dict(teacher="oracle", layers="last2", image_size=(112, 56), name="oracle")


@pytest.fixture
def nusc_copy(nusc_cfg: SyntheticConfig, tmp_path: Path) -> Path:
    root = tmp_path / "nusc"
    shutil.copytree(nusc_cfg.out, root)
    return root


def _tables(root: Path, name: str) -> list[dict]:
    return json.loads((root / "v1.0-mini" / f"{name}.json").read_text())


def _write_tables(root: Path, name: str, rows: list[dict]) -> None:
    (root / "v1.0-mini" / f"{name}.json").write_text(json.dumps(rows))


def test_a_stage_without_workers_fails_within_its_timeout(
    nusc_cfg: SyntheticConfig, tmp_path: Path
) -> None:
    """An external scheduler with no worker at all (every worker gone): the stage says so
    after --no-worker-timeout instead of waiting for ever."""
    from distributed import LocalCluster

    store = str(tmp_path / "cache.zarr")
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        cluster_cfg = ClusterConfig(scheduler=cluster.scheduler_address, no_worker_timeout=2.0)
        start = time.monotonic()
        with pytest.raises(NoWorkersError, match=r"has had no workers for 2 s.*rerun resumes"):
            run_index(
                IndexConfig(
                    dataset="nuscenes", root=str(nusc_cfg.out), store=store, frames_per_shard=2
                ),
                StageOptions(cluster=cluster_cfg),
            )
        assert time.monotonic() - start < 120  # the timeout, not for ever
    # The same store then completes on a local cluster: nothing done before was lost.
    build_cache(nusc_cfg.out, store, stages=("index",))
    assert bool(np.all(zarr.open_group(store, mode="r")["points/done"][:]))


def test_the_no_worker_timeout_is_a_cli_option(nusc_cfg: SyntheticConfig, tmp_path: Path) -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        result = CliRunner().invoke(
            app,
            [
                "index",
                "--out",
                str(tmp_path / "c.zarr"),
                "--root",
                str(nusc_cfg.out),
                "--scheduler",
                cluster.scheduler_address,
                "--no-worker-timeout",
                "1",
            ],
        )
    assert result.exit_code != 0
    assert "no workers for 1 s" in result.output and "Traceback" not in result.output


def _break_second_link(root: Path) -> tuple[str, int]:
    """Re-point the first scene's first sample past the second; returns (scene, samples)."""
    samples = _tables(root, "sample")
    by_token = {s["token"]: s for s in samples}
    first = next(s for s in samples if not s["prev"])
    first["next"] = by_token[first["next"]]["next"]
    _write_tables(root, "sample", samples)
    scene = next(s for s in _tables(root, "scene") if s["token"] == first["scene_token"])
    return scene["name"], len(samples)


def test_broken_links_with_skip_bad_keep_the_reachable_samples_and_record_the_scene(
    nusc_copy: Path, tmp_path: Path
) -> None:
    scene, total = _break_second_link(nusc_copy)
    with pytest.raises(DatasetError, match=r"nbr_samples=3 .* rerun with --skip-bad"):
        open_dataset("nuscenes", str(nusc_copy))
    reader = open_dataset("nuscenes", str(nusc_copy), skip_bad=True)
    assert len(reader.frames) == total - 1
    assert list(reader.skipped) == [scene] and "2 reachable samples kept" in reader.skipped[scene]

    store = tmp_path / "cache.zarr"
    result = CliRunner().invoke(
        app, ["index", "--out", str(store), "--root", str(nusc_copy), "--skip-bad"]
    )
    assert result.exit_code == 0, result.output
    index = zarr.open_group(str(store), mode="r")["index"]
    assert list(index.attrs["skipped_scenes"]) == [scene]
    assert index.attrs["num_frames"] == total - 1


def test_an_image_whose_size_differs_from_its_table_is_an_error(
    nusc_copy: Path, tmp_path: Path
) -> None:
    frame = open_dataset("nuscenes", str(nusc_copy)).frames[1]
    cam = frame.cameras[0]
    with pytest.raises(
        DatasetError, match=rf"is {cam.width}x{cam.height} pixels but its dataset table says 7x5"
    ):
        load_images([cam.image_file], (112, 56), frame.token, expect=[(7, 5)])

    rows = _tables(nusc_copy, "sample_data")
    row = next(r for r in rows if nusc_copy / r["filename"] == Path(cam.image_file))
    row["width"] += 16  # the table says 16 pixels wider than the JPEG is
    _write_tables(nusc_copy, "sample_data", rows)
    store = str(tmp_path / "cache.zarr")
    build_cache(nusc_copy, store, stages=("index",))
    with pytest.raises(FrameError, match=rf"{frame.token}.*--skip-bad"):
        run_teacher(TeacherConfig(store=store, **ORACLE), StageOptions())
    run_teacher(TeacherConfig(store=store, **ORACLE), StageOptions(skip_bad=True, overwrite=True))
    group = zarr.open_group(store, mode="r")["teacher/oracle"]
    skipped = dict(group.attrs["skipped"])
    assert list(skipped) == ["1"] and "dataset table says" in skipped["1"]


def test_a_truncated_label_file_is_found_at_prep(nusc_copy: Path, tmp_path: Path) -> None:
    frame = open_dataset("nuscenes", str(nusc_copy)).frames[2]
    labels = Path(frame.labels_file)
    labels.write_bytes(labels.read_bytes()[: labels.stat().st_size // 2])
    store = str(tmp_path / "cache.zarr")
    with pytest.raises(FrameError, match=rf"label file has \d+ labels .*{labels.name}"):
        build_cache(nusc_copy, store, stages=("index",))
    build_cache(nusc_copy, store, stages=("index",), skip_bad=True)
    points = zarr.open_group(store, mode="r")["points"]
    assert list(points.attrs["skipped"]) == ["2"]


def test_build_pointmaps_skip_bad(nusc_cfg: SyntheticConfig, tmp_path: Path) -> None:
    store = str(tmp_path / "cache.zarr")
    build_cache(nusc_cfg.out, store, stages=("index",))
    index = zarr.open_group(store, mode="r+")["index"]
    bad = index["cam_to_ego"][3]
    bad[0, 0, 0] = np.nan
    index["cam_to_ego"][3] = bad
    # As if the index stage had read the NaN from the dataset: its write record is the
    # edited file's (otherwise the edit is a damaged file, refused before any frame).
    put_whole_record(index, describe_whole(index, data_arrays(index)))
    token = str(index["token"][3])
    with pytest.raises(FrameError, match=rf"frame {token} \(row 3\).*cam_to_ego holds NaN"):
        run_pointmaps(PointmapConfig(store=store), StageOptions())
    result = CliRunner().invoke(app, ["build-pointmaps", "--store", store, "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "skipped 1" in result.output
    group = zarr.open_group(store, mode="r")["pointmaps"]
    offsets = np.asarray(group["offsets"][:])
    assert offsets[4] == offsets[3] and list(group.attrs["skipped"]) == ["3"]


@pytest.mark.parametrize("shard_rows", [1, 3, 5, 100])
def test_ragged_progress_counts_every_frame_once(shard_rows: int) -> None:
    counts = np.array([4, 0, 7, 3, 0, 0, 5, 0])  # empty frames inside and at the end
    offsets = np.concatenate([[0], np.cumsum(counts)])
    rows = row_shards(int(offsets[-1]), shard_rows)
    counted = frames_counted(offsets, rows)
    assert len(counted) == len(rows) and sum(counted) == len(counts)


def test_the_index_stores_paths_relative_to_its_dataset_root(
    nusc_cfg: SyntheticConfig, tmp_path: Path
) -> None:
    store = str(tmp_path / "cache.zarr")
    build_cache(nusc_cfg.out, store, stages=("index",))
    index = zarr.open_group(store, mode="r")["index"]
    base = index.attrs["dataset_root"]
    assert base == os.path.abspath(nusc_cfg.out)
    paths = [
        *np.asarray(index["lidar_path"][:]),
        *np.asarray(index["labels_path"][:]),
        *np.asarray(index["image_path"][:]).ravel(),
    ]
    stored = [str(p) for p in paths if p]
    assert stored and not any(os.path.isabs(p) or p.startswith("..") for p in stored)
    assert all(os.path.isfile(dataset_file(base, p)) for p in stored)
