"""Trainer data path: augmentations, the cache check, samples, collate, sampler, checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from hilda.engine import augment
from hilda.engine.augment import AugmentConfig
from hilda.engine.checkpoint import (
    load_checkpoint,
    load_latest_checkpoint,
    previous_path,
    save_checkpoint,
)
from hilda.engine.config_io import load_config
from hilda.engine.distributed import CpuSyncBatchNorm, sync_batchnorm
from hilda.engine.sampler import ResumableSampler
from hilda.errors import ConfigError, HildaError
from hilda.store.reader import CacheMismatchError
from hilda.train.config import TrainConfig
from hilda.train.data import (
    CacheDataset,
    check_cache,
    collate,
    sample_index,
    subsample_per_image,
)
from tests.train_helpers import CONFIGS, SMALL

CELL = 0.4


def cells(points: np.ndarray, grid: int) -> np.ndarray:
    """(H, W) occupancy of x / y points, the occupancy stage's cell rule."""
    col = np.floor((points[:, 0] + grid * CELL / 2) / CELL).astype(int)
    row = np.floor((points[:, 1] + grid * CELL / 2) / CELL).astype(int)
    out = np.zeros((grid, grid), bool)
    inside = (row >= 0) & (row < grid) & (col >= 0) & (col < grid)
    out[row[inside], col[inside]] = True
    return out


def test_flip_moves_points_and_grid_identically() -> None:
    rng = np.random.default_rng(0)
    pts = np.c_[rng.uniform(-20, 20, (500, 2)), np.ones(500), np.zeros(500)].astype(np.float32)
    cfg = AugmentConfig(rotate_p=0.0, scale=(1.0, 1.0), flip_p=1.0, jitter_sigma=0.0)
    d = augment.draw(cfg, rng)
    assert np.allclose(d.linear, np.diag([-1.0, -1.0, 1.0]))
    moved = augment.apply_points(pts, d, cfg)
    np.testing.assert_array_equal(cells(moved, 128), augment.apply_grid(cells(pts, 128), d, CELL))


def test_rotation_and_scale_move_the_grid_with_the_points() -> None:
    rng = np.random.default_rng(1)
    # Blobs of points (objects), so nearest-cell resampling of the grid can match them.
    centres = rng.uniform(-30, 30, (40, 2))
    pts = (centres[:, None] + rng.normal(0, 1.0, (40, 3000, 2))).reshape(-1, 2)
    pts = np.c_[pts, np.ones(len(pts)), np.zeros(len(pts))].astype(np.float32)
    cfg = AugmentConfig(rotate_p=1.0, jitter_sigma=0.0)
    d = augment.draw(cfg, np.random.default_rng(7))
    assert not np.allclose(d.linear[:2, :2], np.eye(2))  # a real rotation
    want = cells(augment.apply_points(pts, d, cfg), 256)
    got = augment.apply_grid(cells(pts, 256), d, CELL)
    iou = (want & got).sum() / (want | got).sum()
    assert iou > 0.8, iou  # nearest-cell resampling loses some boundary cells
    wrong = augment.apply_grid(cells(pts, 256), augment.Draw(np.linalg.inv(d.linear), 0), CELL)
    assert (want & wrong).sum() / (want | wrong).sum() < 0.3  # the inverse map does not fit
    # Points keep their order and intensity; the xyz norm scales with the draw's scale.
    moved = augment.apply_points(pts, d, cfg)
    scale = abs(np.linalg.det(d.linear)) ** (1 / 3)
    np.testing.assert_allclose(
        np.linalg.norm(moved[:, :3], axis=1), scale * np.linalg.norm(pts[:, :3], axis=1), rtol=1e-5
    )


def test_jitter_is_clipped_and_seeded() -> None:
    cfg = AugmentConfig(rotate_p=0.0, scale=(1.0, 1.0), flip_p=0.0, jitter_sigma=0.05)
    pts = np.zeros((10_000, 4), np.float32)
    d = augment.draw(cfg, np.random.default_rng(3))
    a, b = augment.apply_points(pts, d, cfg), augment.apply_points(pts, d, cfg)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[:, :3]).max() <= cfg.jitter_clip + 1e-7
    assert not np.array_equal(a, augment.apply_points(pts, d, cfg, stream=1))


def test_subsample_keeps_at_most_cap_per_image() -> None:
    cam = np.repeat([0, 1, 3], [5, 50, 20])
    keep = subsample_per_image(cam, 10, np.random.default_rng(0))
    counts = np.bincount(cam[keep], minlength=4)
    assert counts.tolist() == [5, 10, 0, 10]
    assert np.all(np.diff(keep) > 0)


def test_sampler_resumes_mid_epoch() -> None:
    data = list(range(11))
    full = ResumableSampler(data, num_replicas=2, rank=1, seed=4)
    full.set_epoch(3)
    items = list(full)
    assert all(epoch == 3 for _, epoch in items)
    resumed = ResumableSampler(data, num_replicas=2, rank=1, seed=4)
    resumed.set_epoch(3)
    resumed.start = 2
    assert list(resumed) == items[2:] and len(resumed) == len(items) - 2


def test_checkpoint_round_trip_loads_weights_only(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(
        tmp_path / "c.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}
    )
    blob = load_checkpoint(path)
    assert blob["step"] == 1 and torch.equal(blob["model"]["weight"], model.weight)
    assert not (tmp_path / "c.pt.tmp").exists()
    # A pickle that weights_only refuses is an error naming the file, never executed.
    torch.save({"format": "hilda-train-checkpoint", "obj": Path("x")}, tmp_path / "bad.pt")
    with pytest.raises(HildaError, match=r"bad\.pt"):
        load_checkpoint(tmp_path / "bad.pt")


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    save_checkpoint(path, {"step": 10})
    save_checkpoint(path, {"step": 20})
    assert previous_path(path) == tmp_path / "checkpoints" / "last.previous.pt"
    blob, used = load_latest_checkpoint(path)
    assert (blob["step"], used) == (20, path)
    path.write_bytes(path.read_bytes()[:100])  # torn
    warnings: list[str] = []
    blob, used = load_latest_checkpoint(path, warnings.append)
    assert (blob["step"], used) == (10, previous_path(path))
    assert "last.pt" in warnings[0] and "last.previous.pt" in warnings[0]
    previous_path(path).unlink()
    with pytest.raises(HildaError, match=r"last\.pt"):
        load_latest_checkpoint(path)


def test_cpu_sync_batchnorm_is_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(5)
    model = torch.nn.Sequential(bn)
    sync_batchnorm(model, "cpu")
    assert isinstance(model[0], CpuSyncBatchNorm)
    x = torch.randn(64, 5)
    torch.testing.assert_close(model(x), torch.nn.BatchNorm1d(5)(x))


def test_config_base_merges_and_refuses_cycles(tmp_path: Path) -> None:
    cfg = load_config(TrainConfig, CONFIGS / "ablations" / "table8_kr_style3.yaml")
    assert [p.teacher for p in cfg.loss.distill] == [(0, 1, 2), (1, 2)]
    assert cfg.optim.weight_decay == 0.005 and cfg.loss.aux == "none"
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(TrainConfig, tmp_path / "a.yaml")


def small(*extra: str, preset: str = "paper_vits.yaml") -> TrainConfig:
    return load_config(TrainConfig, CONFIGS / preset, [*SMALL, *extra])


def test_samples_exclude_frames_without_neighbours(train_store: str) -> None:
    cfg = small()
    info = check_cache(train_store, cfg)
    assert info.teacher == "vits" and info.blocks == {0: 11, 1: 10}
    samples = sample_index(train_store, info, needs_occupancy=True)
    # 2 scenes x 3 frames: the first of each has no t-1, the last no t+1.
    assert samples.frames.tolist() == [1, 4] and samples.prev.tolist() == [0, 3]
    assert samples.excluded == {"no t-1": 2, "no t+1": 2, "skipped or empty": 0}
    # Without an occupancy loss the last frames are samples too.
    info = check_cache(train_store, small("loss.aux=none"))
    assert sample_index(train_store, info, needs_occupancy=False).frames.tolist() == [1, 2, 4, 5]


def test_collate_indexes_points_and_images(train_store: str) -> None:
    cfg = small("data.max_pairs_per_image=null")
    info = check_cache(train_store, cfg)
    ds = CacheDataset(cfg, info, sample_index(train_store, info, True))
    items = [ds[(0, 0)], ds[(1, 0)]]
    batch = collate(items)
    root = zarr.open_group(train_store, mode="r")
    views = len(root["index"].attrs["cameras"])
    sizes = [
        len(items[0]["points"][0]),
        len(items[1]["points"][0]),
        len(items[0]["points"][1]),
        len(items[1]["points"][1]),
    ]
    assert batch.points.shape == (sum(sizes), 4) and batch.batch_size == 2
    assert torch.bincount(batch.cloud).tolist() == sizes
    # Cloud 3 = sample 1's t0 sweep: its pairs point into its rows and its images.
    sel = batch.cloud[batch.pair_point] == 3
    assert torch.all(batch.pair_image[sel] // views == 3)
    pm = root["pointmaps"]
    f = int(items[1]["frame"])
    a, b = (int(x) for x in pm["offsets"][f : f + 2])
    assert int(sel.sum()) == b - a
    assert batch.grids[0].shape == (4 * views, *root["teacher/vits/layer_11"].shape[2:])
    assert batch.teacher_cls.shape == (4, views, 384)
    assert batch.target.shape == (2, 256, 256)
    # Same sample, same epoch: identical arrays (seeded augmentation); another epoch differs.
    again = ds[(0, 0)]
    np.testing.assert_array_equal(again["points"][1], items[0]["points"][1])
    assert not np.array_equal(ds[(0, 1)]["points"][1], items[0]["points"][1])


def test_history_is_aligned_to_t0(train_store: str) -> None:
    """With augmentation off, the t-1 sweep moved into the t0 frame overlaps t0's scene above
    the ground far better than without the ego compensation (the ego moves ~3 m)."""
    off = "data.augment.enabled=false"
    overlap = {}
    for align in (True, False):
        cfg = small(off, f"data.align_history={str(align).lower()}")
        info = check_cache(train_store, cfg)
        item = CacheDataset(cfg, info, sample_index(train_store, info, True))[(0, 0)]
        before, now = (cells(p[p[:, 2] > -1.0], 256) for p in item["points"])  # no ground
        overlap[align] = (before & now).sum() / now.sum()
    assert overlap[True] > 0.7 and overlap[False] < 0.4, overlap


def copy_store(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize(
    ("preset", "extra", "edit", "message"),
    [
        (
            "ablations/table8_separate_last4.yaml",
            ["data.teacher_arch=vitb14"],
            None,
            r"missing \[8, 9\].*--layers last4",
        ),
        (
            "paper_vitb.yaml",
            ["data.teacher=vits"],
            None,
            r"holds random:vits14 \(a DINOv2 vits14, patch 14\).*vitb14.*hilda-prep "
            "extract-teacher",
        ),
        ("paper_vits.yaml", [], "drop_occupancy", r"no occupancy/.*hilda-prep build-occupancy"),
        ("paper_vits.yaml", [], "schema", r"version 99.*hilda-prep index --overwrite"),
        ("paper_vits.yaml", [], "unfinished", r"incomplete \(\d+ of \d+ shards\).*extract-teacher"),
        (
            "paper_vits.yaml",
            ["model.bev_grid=512"],
            None,
            r"256x256.*build-occupancy .*--grid 512 --cell 0.4",
        ),
        ("tiny_cpu.yaml", [], None, r"several teachers"),
    ],
)
def test_incompatible_cache_names_the_fix(
    train_store: str, tmp_path: Path, preset: str, extra: list, edit: str | None, message: str
) -> None:
    store = train_store
    if edit is not None:
        store = copy_store(train_store, tmp_path / "c.zarr")
        root = zarr.open_group(store, mode="r+")
        if edit == "drop_occupancy":
            del root["occupancy"]
        elif edit == "schema":
            root.attrs["schema_version"] = 99
        else:
            root["teacher/vits/done"][0] = False
    cfg = load_config(TrainConfig, CONFIGS / preset, [*SMALL, *extra])
    with pytest.raises(CacheMismatchError, match=message):
        check_cache(store, cfg)


def test_config_refuses_training_nothing() -> None:
    with pytest.raises(ConfigError, match="trains nothing"):
        small("loss.distill=[]", "loss.cls=false", "loss.aux=none")


def test_teacher_centring_uses_the_pairs_mean(train_store: str) -> None:
    """loss.center_teacher: the centre is the mean teacher feature at the point-pixel pairs
    (here against the dataset + collate path over every pair), kept in the model's state."""
    from hilda.models.grid import sample_grid
    from hilda.train.data import teacher_means
    from hilda.train.model import HildaModel

    cfg = load_config(
        TrainConfig,
        CONFIGS / "tiny_cpu.yaml",
        [*SMALL, "data.teacher=vits", "data.max_pairs_per_image=null", "loss.center_teacher=true"],
    )
    info = check_cache(train_store, cfg)
    samples = sample_index(train_store, info, True)
    means = teacher_means(info, samples.frames, count=len(samples.frames))
    batch = collate([CacheDataset(cfg, info, samples)[(i, 0)] for i in range(len(samples.frames))])
    now = batch.pair_image >= batch.batch_size * batch.teacher_cls.shape[1]  # t0 sweeps' pairs
    for offset, grid in batch.grids.items():
        sampled = sample_grid(grid, batch.pair_image[now], batch.pair_uv[now], batch.image_size)
        np.testing.assert_allclose(means[offset], sampled.double().mean(0).numpy(), atol=2e-3)
    model = HildaModel(cfg, info.teacher_dim, means)
    assert "teacher_mean" in model.state_dict()
    assert "teacher_mean" not in HildaModel(load_config(TrainConfig, None, SMALL), 384).state_dict()
    with pytest.raises(ConfigError, match="center_teacher"):
        HildaModel(cfg, info.teacher_dim, None)
