"""MinkUNet34 student: shapes and gradients, Pointcept layout, backend equivalence, round trip,
and a forward pass on the real nuScenes keyframe sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hilda.models.convert import convert_state, detect_layout, load_backbone, save_backbone
from hilda.models.sparse import BACKENDS, backend_installed
from hilda.models.student import STAGE_STRIDES, StudentConfig, build_student
from hilda.models.voxelize import VoxelConfig, voxelize
from tests.models_helpers import backend_params, batch_of, check_gradient, random_scene

needs_both = pytest.mark.skipif(
    not all(backend_installed(b) for b in BACKENDS), reason="needs MinkowskiEngine and spconv"
)


def _voxels(seed: int = 0, n: tuple[int, int] = (2500, 1800)):
    points, batch = batch_of(random_scene(n[0], seed), random_scene(n[1], seed + 1))
    return voxelize(points, batch, VoxelConfig(voxel_size=0.1)), len(points)


@pytest.mark.parametrize("backend", backend_params())
def test_shapes_and_stage_features(backend: str) -> None:
    torch.manual_seed(0)
    model = build_student(StudentConfig(backend=backend))
    vox, n = _voxels()
    with torch.no_grad():
        out = model(vox)
    cfg = model.cfg
    assert [f.shape for f in out.point_feats] == [(n, c) for c in cfg.stage_channels]
    assert out.voxel_feats.shape == (len(vox.coords), cfg.out_channels)
    # the final voxels are the input voxels
    assert sorted(map(tuple, out.voxel_coords.tolist())) == sorted(
        map(tuple, vox.coords.long().tolist())
    )
    # points in the same stride-s voxel share that stage's feature, and different voxels differ
    for feats, stride in zip(out.point_feats, STAGE_STRIDES, strict=True):
        key = torch.cat([vox.point_coords[:, :1], vox.point_coords[:, 1:] // stride], 1)
        _, group = torch.unique(key, dim=0, return_inverse=True)
        rep = torch.zeros(int(group.max()) + 1, dtype=torch.long).scatter_(
            0, group, torch.arange(n)
        )
        torch.testing.assert_close(feats, feats[rep[group]])
        assert len(torch.unique(feats[rep], dim=0)) > 0.9 * len(rep)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = build_student(StudentConfig(backend="minkowski"))
    vox, _ = _voxels()
    out = model(vox)
    loss = sum(f.square().mean() for f in out.point_feats) + out.voxel_feats.mean()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_minkowski_gradients_match_finite_differences() -> None:
    torch.manual_seed(1)
    model = build_student(StudentConfig(backend="minkowski")).double()
    vox, _ = _voxels(seed=3)
    vox.feats = vox.feats.double()

    def loss() -> torch.Tensor:
        return model(vox).point_feats[0].square().mean()

    loss().backward()
    params = dict(model.named_parameters())
    for name, index in [("bn4.bn.weight", 3), ("block2.1.conv1.kernel", (13, 5, 7))]:
        check_gradient(loss, params[name], index, h=1e-5, rtol=5e-3, atol=1e-9)


@needs_both
def test_spconv_refuses_cpu_training() -> None:
    from hilda.errors import ConfigError

    model = build_student(StudentConfig(backend="spconv"))
    vox, _ = _voxels()
    with pytest.raises(ConfigError, match="backend=minkowski"):
        model(vox)
    with torch.no_grad():
        model(vox)  # the forward alone is fine


@pytest.mark.parametrize("backend", backend_params())
def test_pointcept_names_and_shapes(backend: str) -> None:
    """MinkowskiEngine layout = Pointcept MinkUNet34C(in_channels=4, out_channels=96)."""
    model = build_student(StudentConfig(backend=backend))
    state = convert_state(model.state_dict(), "minkowski")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["conv0p1s1.kernel"] == (125, 4, 32)
    assert shapes["bn0.bn.weight"] == (32,)
    assert shapes["conv1p1s2.kernel"] == (8, 32, 32)
    assert shapes["block1.0.conv1.kernel"] == (27, 32, 32)
    assert shapes["block2.0.downsample.0.kernel"] == (32, 64)
    assert shapes["block4.5.norm2.bn.running_var"] == (256,)
    assert shapes["convtr4p16s2.kernel"] == (8, 256, 256)
    assert shapes["block5.0.conv1.kernel"] == (27, 384, 256)
    assert shapes["block8.0.downsample.0.kernel"] == (128, 96)
    assert shapes["block8.1.conv2.kernel"] == (27, 96, 96)
    assert shapes["final.kernel"] == (96, 96)
    assert shapes["final.bias"] == (1, 96)
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in state if k.startswith("block")}
    assert len(blocks) == sum(StudentConfig().layers)  # 2+3+4+6+2+2+2+2 basic blocks
    assert "block1.0.downsample.0.kernel" not in state  # 32 -> 32 needs no projection
    buffers = ("running", "num_batches")
    params = sum(v.numel() for k, v in state.items() if not any(b in k for b in buffers))
    assert params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("backend", backend_params())
def test_kaiming_fan_out_init(backend: str) -> None:
    """Pointcept's init: normal with std sqrt(2 / (out x kernel volume)), on either layout."""
    torch.manual_seed(0)
    state = convert_state(build_student(StudentConfig(backend=backend)).state_dict(), "minkowski")
    for name, volume, cout in [
        ("block4.0.conv1.kernel", 27, 256),
        ("conv0p1s1.kernel", 125, 32),
        ("block5.0.downsample.0.kernel", 1, 256),
    ]:
        std = float(state[name].std())
        assert std == pytest.approx((2 / (cout * volume)) ** 0.5, rel=0.05), name


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@needs_both
def test_backends_agree_on_the_same_weights() -> None:
    torch.manual_seed(1)
    me = build_student(StudentConfig(backend="minkowski"))
    sp = build_student(StudentConfig(backend="spconv"))
    sp.load_state_dict(convert_state(me.state_dict(), "spconv"))
    vox, _ = _voxels(seed=3)
    for train in (True, False):  # batch statistics and running statistics
        me.train(train)
        sp.train(train)
        with torch.no_grad():
            a, b = me(vox), sp(vox)
        for fa, fb in zip(a.point_feats, b.point_feats, strict=True):
            assert _relative(fa, fb) < 1e-4
    # running statistics were updated identically by the training-mode pass
    for (name, va), vb in zip(me.state_dict().items(), sp.state_dict().values(), strict=True):
        if "running" in name:
            torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)


@needs_both
@pytest.mark.parametrize("source", ["minkowski", "spconv"])
def test_save_convert_load_round_trip(tmp_path: Path, source: str) -> None:
    target = "spconv" if source == "minkowski" else "minkowski"
    torch.manual_seed(2)
    model = build_student(StudentConfig(backend=source)).eval()
    path = save_backbone(model, tmp_path / "backbone.pt", voxel=VoxelConfig())
    blob = torch.load(path, weights_only=True)
    assert detect_layout(blob["state_dict"]) == "minkowski"  # exports are Pointcept layout
    other = load_backbone(path, backend=target).eval()
    assert other.cfg.backend == target
    again = load_backbone(path, backend=source).eval()
    for (k, v), w in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    vox, _ = _voxels(seed=4)
    with torch.no_grad():
        pairs = zip(model(vox).point_feats, other(vox).point_feats, strict=True)
    for fa, fb in pairs:
        assert _relative(fa, fb) < 1e-4


def test_load_refuses_a_foreign_checkpoint(tmp_path: Path) -> None:
    from hilda.errors import ConfigError

    torch.save({"state_dict": {"head.weight": torch.zeros(2, 2)}}, tmp_path / "x.pt")
    with pytest.raises(ConfigError, match=r"x\.pt"):
        load_backbone(tmp_path / "x.pt", backend="minkowski")


@pytest.mark.parametrize("backend", backend_params())
def test_student_on_the_real_keyframe_sweep(real_keyframe: Path, backend: str) -> None:
    from hilda.datasets.io import read_nuscenes_sweep

    sweep = next(real_keyframe.glob("*LIDAR_TOP*.pcd.bin"))
    points = torch.from_numpy(read_nuscenes_sweep(sweep))
    assert len(points) == 34688
    vox = voxelize(points, torch.zeros(len(points), dtype=torch.long), VoxelConfig())
    torch.manual_seed(0)
    model = build_student(StudentConfig(backend=backend)).eval()
    with torch.no_grad():
        out = model(vox)
    assert [f.shape for f in out.point_feats] == [
        (34688, c) for c in StudentConfig().stage_channels
    ]
    assert all(torch.isfinite(f).all() for f in out.point_feats)
    # 0.05 m voxels: as many as numpy finds distinct cells (23,112 for this sweep)
    cells = np.unique(np.floor(points[:, :3].numpy() / np.float32(0.05)), axis=0)
    assert len(vox.coords) == len(cells) == 23112
