"""hilda-prep stages on the synthetic world (both formats) and the real keyframe."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy.ndimage import binary_dilation

from hilda.datasets import open_dataset
from hilda.datasets.io import read_sweep
from hilda.datasets.synthetic.generate import SyntheticConfig
from hilda.datasets.synthetic.nuscenes_format import SCENE_START_US
from hilda.pipeline.ops.occupancy import OccupancyConfig, fit_ground, rasterise
from hilda.store.codecs import unpack
from hilda.store.info import store_info
from hilda.store.validate import StoreValidationError, validate_store

from .pipeline_helpers import array_files, arrays, build_cache
from .test_readers import _expected_sweep


@pytest.fixture(scope="session")
def nusc_store(nusc_cfg: SyntheticConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("cache") / "nusc.zarr"
    build_cache(nusc_cfg.out, str(store), workers=1)
    return store


def test_all_stages_valid_and_index_matches_reader(
    nusc_cfg: SyntheticConfig, nusc_store: Path
) -> None:
    root = validate_store(
        str(nusc_store),
        require=("index", "points", "pointmaps", "occupancy"),
        teacher="vits",
        dataset="nuscenes",
    )
    frames = open_dataset("nuscenes", str(nusc_cfg.out)).frames
    index = root["index"]
    assert list(index["token"][:]) == [f.token for f in frames]
    np.testing.assert_array_equal(
        index["ego_to_global"][:], np.stack([f.ego_to_global for f in frames])
    )
    assert list(index["next"][:]) == [-1 if f.next is None else f.next for f in frames]
    offsets = root["points/offsets"][:]
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(
            root["points/data"][offsets[i] : offsets[i + 1]], read_sweep(f.lidar_file)
        )
    info = store_info(str(nusc_store))
    assert all(g["complete"] for g in info["groups"].values())
    assert info["groups"]["teacher/vits"]["fidelity"]["layer_11"]["mean_cos"] > 0.9999


def test_pointmaps_pairs_are_consistent(nusc_store: Path) -> None:
    root = zarr.open_group(str(nusc_store), mode="r")
    pm, offsets = root["pointmaps"], root["pointmaps/offsets"][:]
    sizes = root["index/image_size"][:]
    for f in range(len(offsets) - 1):
        cam = pm["cam"][offsets[f] : offsets[f + 1]]
        uv = pm["uv"][offsets[f] : offsets[f + 1]]
        wh = sizes[f, cam]
        assert np.all(uv > 1) and np.all(uv < wh - 1)
        assert np.all(np.diff(cam.astype(int)) >= 0)  # camera by camera
    assert "coarse z-buffer" in root["pointmaps"].attrs["occlusion"]["rule"]


def test_occupancy_is_ego_compensated(nusc_cfg: SyntheticConfig, nusc_store: Path) -> None:
    root = zarr.open_group(str(nusc_store), mode="r")
    valid = root["occupancy/valid"][:]
    nxt = root["index/next"][:]
    assert list(valid) == [n >= 0 for n in nxt]
    occ = OccupancyConfig(grid=256)
    static_hits = static_total = moving_hits = moving_total = 0
    for f in np.flatnonzero(valid):
        scene, key = divmod(int(f), nusc_cfg.frames_per_scene)
        world, sweep = _expected_sweep(
            nusc_cfg, scene, key, SCENE_START_US + scene * 3_600_000_000, 1
        )
        movers = np.isin(sweep.instance, [m.instance for m in world.movers])
        static = (sweep.instance > 0) & ~movers
        plane = fit_ground(sweep.points, occ, 0)
        future = binary_dilation(unpack(root["occupancy/bev"][f]))  # one-cell tolerance
        g_static = rasterise(sweep.points[static], plane, occ)
        g_moving = rasterise(sweep.points[movers], plane, occ)
        static_hits += int((g_static & future).sum())
        static_total += int(g_static.sum())
        moving_hits += int((g_moving & future).sum())
        moving_total += int(g_moving.sum())
    assert static_hits / static_total > 0.9, static_hits / static_total
    assert moving_total > 0 and moving_hits / moving_total < 0.5, moving_hits / moving_total


def test_one_and_two_workers_give_identical_stores(
    nusc_cfg: SyntheticConfig, nusc_store: Path, tmp_path: Path
) -> None:
    two = tmp_path / "two.zarr"
    build_cache(nusc_cfg.out, str(two), workers=2)
    assert array_files(two) == array_files(nusc_store)


def test_prep_all_equals_the_single_stages(
    nusc_cfg: SyntheticConfig, nusc_store: Path, tmp_path: Path
) -> None:
    """``hilda-prep all`` (one shared cluster of 2 workers) writes the store the four single
    stages write, and a rerun finds nothing left to do."""
    from typer.testing import CliRunner

    from hilda.cli.prep import app

    store = tmp_path / "all.zarr"
    args = ["all", "--out", str(store), "--root", str(nusc_cfg.out), "--frames-per-shard", "2"]
    args += ["--teacher", "random:vits14", "--layers", "last2", "--image-size", "112x56"]
    args += ["--name", "vits", "--grid", "256", "--workers", "2"]
    for _ in range(2):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert array_files(store) == array_files(nusc_store)
    assert "teacher/vits" in result.output and "occupancy" in result.output


def test_store_given_as_url(nusc_cfg: SyntheticConfig, nusc_store: Path, tmp_path: Path) -> None:
    reference = arrays(str(nusc_store))
    for url in (f"memory://hilda-{uuid.uuid4().hex}", f"file://{tmp_path / 'url.zarr'}"):
        build_cache(nusc_cfg.out, url, workers=1, stages=("index", "pointmaps", "occupancy"))
        got = arrays(url)
        # every array of those stages, not only the ones the URL store happens to hold
        want = {
            k for k in reference if k.split("/")[0] in ("index", "points", "pointmaps", "occupancy")
        }
        assert want and set(got) == want, sorted(set(got) ^ want)
        for name, value in got.items():
            np.testing.assert_array_equal(value, reference[name], err_msg=f"{url} {name}")


def test_av2_cache(av2_cfg: SyntheticConfig, tmp_path: Path) -> None:
    store = tmp_path / "av2.zarr"
    build_cache(av2_cfg.out, str(store), dataset="av2", split="train")
    root = validate_store(
        str(store),
        require=("index", "points", "pointmaps", "occupancy"),
        teacher="vits",
        dataset="av2",
    )
    assert root["index"].attrs["cameras"][0] == "ring_front_center"
    assert int(root["pointmaps/offsets"][-1]) > 1000
    assert root["occupancy/valid"][:].tolist() == [True, False]


def test_stage_refuses_other_schema_or_dataset(nusc_cfg: SyntheticConfig, tmp_path: Path) -> None:
    store = tmp_path / "old.zarr"
    build_cache(nusc_cfg.out, str(store), stages=("index",))
    root = zarr.open_group(str(store), mode="r+")
    root.attrs["schema_version"] = 0
    with pytest.raises(StoreValidationError, match="schema_version is 0"):
        build_cache(nusc_cfg.out, str(store), stages=("pointmaps",))
    root.attrs["schema_version"] = 1
    with pytest.raises(StoreValidationError, match="built from dataset 'nuscenes', not 'av2'"):
        validate_store(str(store), dataset="av2")
