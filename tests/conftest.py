"""Shared fixtures: tiny synthetic datasets in both formats, generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from hilda.datasets.synthetic.generate import SyntheticConfig, make_synthetic

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_KEYFRAME = SHARED / "realdata" / "nuscenes-keyframe"

NUSCENES_CFG = dict(format="nuscenes", scenes=2, frames_per_scene=3, seed=3, image_size=(192, 108))
# 11 scenes fill SemanticKITTI's official split: sequences 00-07, 09, 10 train, 08 val.
KITTI_CFG = dict(format="semantickitti", scenes=11, frames_per_scene=1, seed=7)
AV2_CFG = dict(
    format="av2", scenes=2, frames_per_scene=2, seed=5, image_size=(128, 96), keyframe_every=5
)


@pytest.fixture(scope="session")
def nusc_cfg(tmp_path_factory: pytest.TempPathFactory) -> SyntheticConfig:
    cfg = SyntheticConfig(out=tmp_path_factory.mktemp("syn_nuscenes"), **NUSCENES_CFG)
    make_synthetic(cfg)
    return cfg


@pytest.fixture(scope="session")
def av2_cfg(tmp_path_factory: pytest.TempPathFactory) -> SyntheticConfig:
    cfg = SyntheticConfig(out=tmp_path_factory.mktemp("syn_av2"), **AV2_CFG)
    make_synthetic(cfg)
    return cfg


@pytest.fixture(scope="session")
def kitti_cfg(tmp_path_factory: pytest.TempPathFactory) -> SyntheticConfig:
    cfg = SyntheticConfig(out=tmp_path_factory.mktemp("syn_kitti"), **KITTI_CFG)
    make_synthetic(cfg)
    return cfg


@pytest.fixture(scope="session")
def real_keyframe() -> Path:
    if not REAL_KEYFRAME.is_dir():
        pytest.skip(f"real nuScenes keyframe not found at {REAL_KEYFRAME}")
    return REAL_KEYFRAME


@pytest.fixture(scope="session")
def train_store(nusc_cfg: SyntheticConfig, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The synthetic nuScenes world's full training cache (grid 256, three random teachers)."""
    from tests.train_helpers import build_train_cache

    store = str(tmp_path_factory.mktemp("train_cache") / "cache.zarr")
    build_train_cache(nusc_cfg.out, store)
    return store
