"""Resumption and bad input: a killed stage resumes to a byte-identical store; bad frames
fail clearly or, with --skip-bad, are recorded and skipped; nothing written before is lost."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from hilda.datasets import open_dataset
from hilda.datasets.synthetic.generate import SyntheticConfig
from hilda.errors import FrameError
from hilda.pipeline.runner import ClusterConfig
from hilda.pipeline.stages.common import StageOptions
from hilda.pipeline.stages.teacher import TeacherConfig, run_teacher

from .pipeline_helpers import array_files, build_cache

KILL_TEACHER = [
    "--teacher",
    "random:vits14",
    "--layers",
    "last2",
    "--image-size",
    "448x224",
    "--name",
    "big",
    "--batch-size",
    "2",
]


def _prep(*args: str) -> list[str]:
    return [sys.executable, "-c", "from hilda.cli.prep import app; app()", *args]


def test_killed_stage_resumes_byte_identical(nusc_cfg: SyntheticConfig, tmp_path: Path) -> None:
    base = tmp_path / "base.zarr"
    build_cache(nusc_cfg.out, str(base), stages=("index",))
    reference, killed = tmp_path / "reference.zarr", tmp_path / "killed.zarr"
    shutil.copytree(base, reference)
    shutil.copytree(base, killed)
    run_teacher(
        TeacherConfig(
            store=str(reference),
            teacher="random:vits14",
            image_size=(448, 224),
            name="big",
            batch_size=2,
        ),
        StageOptions(cluster=ClusterConfig(workers=1)),
    )
    proc = subprocess.Popen(
        _prep("extract-teacher", "--store", str(killed), *KILL_TEACHER),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    done = None
    while time.time() < deadline and proc.poll() is None:
        try:
            done = zarr.open_group(str(killed), mode="r")["teacher/big/done"][:]
        except (KeyError, FileNotFoundError, ValueError):
            done = None
        if done is not None and done.any():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the stage finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Dask workers, mid-run
    proc.wait()
    assert done is not None and 0 < done.sum() < len(done)
    result = subprocess.run(
        _prep("extract-teacher", "--store", str(killed), *KILL_TEACHER),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert array_files(killed) == array_files(reference)


def _copy_dataset(cfg: SyntheticConfig, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(cfg.out, root)
    return root


def test_truncated_sweep_fails_or_is_skipped(nusc_cfg: SyntheticConfig, tmp_path: Path) -> None:
    root = _copy_dataset(nusc_cfg, tmp_path)
    frames = open_dataset("nuscenes", str(root)).frames
    victim = frames[4]
    Path(victim.lidar_file).write_bytes(Path(victim.lidar_file).read_bytes()[:1001])
    store = tmp_path / "cache.zarr"
    with pytest.raises(FrameError, match=rf"truncated sweep.*\(frame {victim.token}\).*--skip-bad"):
        build_cache(root, str(store), stages=("index",))
    index = zarr.open_group(str(store), mode="r")["index"]
    assert index["done"][:].all()  # the index written before the failure is kept
    build_cache(root, str(store), stages=("index", "pointmaps", "occupancy"), skip_bad=True)
    cache = zarr.open_group(str(store), mode="r")
    assert list(cache["points"].attrs["skipped"]) == ["4"]
    offsets = cache["points/offsets"][:]
    assert offsets[5] == offsets[4] and np.all(np.diff(offsets)[[0, 1, 2, 3, 5]] > 0)
    assert cache["pointmaps/offsets"][5] == cache["pointmaps/offsets"][4]
    # Frame 3's future is frame 4 (no points): recorded as skipped, not silently empty.
    assert not cache["occupancy/valid"][3] and "3" in cache["occupancy"].attrs["skipped"]


def test_corrupt_image_fails_or_is_skipped(nusc_cfg: SyntheticConfig, tmp_path: Path) -> None:
    root = _copy_dataset(nusc_cfg, tmp_path)
    frames = open_dataset("nuscenes", str(root)).frames
    victim = frames[5]
    image = Path(victim.cameras[1].image_file)
    image.write_bytes(image.read_bytes()[:200])
    store = tmp_path / "cache.zarr"
    build_cache(root, str(store), stages=("index",))
    with pytest.raises(FrameError, match=rf"corrupt image.*{image.name[:20]}.*{victim.token}"):
        build_cache(root, str(store), stages=("teacher",))
    group = zarr.open_group(str(store), mode="r")["teacher/vits"]
    assert group["done"][:].tolist() == [True, True, False]  # shards before the bad one are kept
    build_cache(root, str(store), stages=("teacher",), skip_bad=True)
    group = zarr.open_group(str(store), mode="r")["teacher/vits"]
    assert group["done"][:].all() and list(group.attrs["skipped"]) == ["5"]
    assert not np.any(group["layer_11"][5]) and np.any(group["layer_11"][4])


class CutShort(Exception):
    """Stands for a kill while a group is being created."""


def test_a_group_cut_short_in_creation_is_rebuilt(
    nusc_cfg: SyntheticConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between the group's metadata and its arrays: every command names the stage
    that repairs it, and rerunning that stage (plain or --overwrite) gives the store an
    uninterrupted run gives, byte for byte."""
    from hilda.pipeline.ops.occupancy import OccupancyConfig
    from hilda.pipeline.stages.occupancy import OccupancyStageConfig, run_occupancy
    from hilda.store import writer as store_io
    from hilda.store.validate import StoreValidationError, validate_store

    base = tmp_path / "base.zarr"
    build_cache(nusc_cfg.out, str(base), stages=("index", "pointmaps"))
    reference, cut = tmp_path / "reference.zarr", tmp_path / "cut.zarr"
    shutil.copytree(base, reference)
    shutil.copytree(base, cut)
    opts = StageOptions(cluster=ClusterConfig(workers=1))

    def occupancy(store: Path, options: StageOptions = opts) -> None:
        cfg = OccupancyStageConfig(store=str(store), occupancy=OccupancyConfig(grid=256))
        run_occupancy(cfg, options)

    occupancy(reference)
    real, calls = store_io.array_layout, []

    def dies_at_the_second_array(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise CutShort
        return real(*args, **kwargs)

    monkeypatch.setattr(store_io, "array_layout", dies_at_the_second_array)
    with pytest.raises(CutShort):
        occupancy(cut)
    monkeypatch.setattr(store_io, "array_layout", real)
    with pytest.raises(StoreValidationError, match=r"occupancy/ is half-made.*build-occupancy"):
        validate_store(str(cut))
    occupancy(cut)  # a plain rerun rebuilds it
    assert array_files(cut) == array_files(reference)
    # --overwrite after a cut-short creation, the same.
    monkeypatch.setattr(store_io, "array_layout", dies_at_the_second_array)
    calls.clear()
    with pytest.raises(CutShort):
        occupancy(cut, StageOptions(cluster=ClusterConfig(workers=1), overwrite=True))
    monkeypatch.setattr(store_io, "array_layout", real)
    occupancy(cut, StageOptions(cluster=ClusterConfig(workers=1), overwrite=True))
    assert array_files(cut) == array_files(reference)
