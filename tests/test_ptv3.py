"""Point Transformer V3 student: serialization against independent implementations, patch
attention against dense attention, Pointcept's key layout, gradients, determinism, the real
keyframe sweep, and the round trip through ``backbone.pt`` into ``hilda-eval``."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from hilda.determinism import deterministic_mode
from hilda.errors import ConfigError
from hilda.models.convert import (
    POINTCEPT_PREFIX,
    convert_state,
    export_pointcept,
    pointcept_state,
    save_backbone,
)
from hilda.models.ptv3 import Patches, PTv3Config, patch_attention, patch_layout
from hilda.models.serialization import encode, serialize
from hilda.models.sparse import backend_installed
from hilda.models.student import StudentConfig, build_student
from hilda.models.voxelize import VoxelConfig, voxelize
from tests.models_helpers import batch_of, check_gradient, random_scene

# A PTv3 small enough for many CPU forwards: every stage, block kind and order, tiny patches
# so that clouds span many patches and the padded last patch is exercised at every level.
TINY = PTv3Config(
    enc_depths=(1, 1, 1, 2, 1),
    enc_channels=(8, 16, 16, 32, 32),
    enc_num_head=(1, 2, 2, 4, 4),
    enc_patch_size=(48, 48, 32, 16, 16),
    dec_depths=(1, 1, 1, 1),
    dec_channels=(16, 16, 16, 32),
    dec_num_head=(2, 2, 2, 4),
    dec_patch_size=(48, 48, 32, 16),
    drop_path=0.0,
)


def _tiny(backend: str = "minkowski", **changes) -> StudentConfig:
    return StudentConfig(
        arch="ptv3", backend=backend, ptv3=PTv3Config(**{**TINY.__dict__, **changes})
    )


def _voxels(seed: int = 0, n: tuple[int, int] = (1500, 900)):
    points, batch = batch_of(random_scene(n[0], seed), random_scene(n[1], seed + 1))
    return voxelize(points, batch, VoxelConfig(voxel_size=0.1)), len(points)


# --- serialization --------------------------------------------------------------------------


def morton_reference(x: int, y: int, z: int, depth: int) -> int:
    """Bit interleaving from its definition: for each level from the top, the x, y, z bits."""
    code = 0
    for i in reversed(range(depth)):
        for v in (x, y, z):
            code = (code << 1) | ((v >> i) & 1)
    return code


def hilbert_reference(coords: tuple[int, int, int], depth: int) -> int:
    """Skilling (2004), "Programming the Hilbert curve", AxestoTranspose, one point at a time,
    then the transposed index read out bit plane by bit plane (axis 0 first)."""
    x = list(coords)
    n = len(x)
    m = 1 << (depth - 1)
    q = m
    while q > 1:  # inverse undo
        p = q - 1
        for i in range(n):
            if x[i] & q:
                x[0] ^= p
            else:
                t = (x[0] ^ x[i]) & p
                x[0] ^= t
                x[i] ^= t
        q >>= 1
    for i in range(1, n):  # Gray encode
        x[i] ^= x[i - 1]
    t = 0
    q = m
    while q > 1:
        if x[n - 1] & q:
            t ^= q - 1
        q >>= 1
    x = [v ^ t for v in x]
    code = 0
    for b in reversed(range(depth)):
        for v in x:
            code = (code << 1) | ((v >> b) & 1)
    return code


@pytest.mark.parametrize("depth", [1, 3, 7, 12, 16])
def test_codes_equal_the_textbook_definitions(depth: int) -> None:
    g = torch.Generator().manual_seed(depth)
    grid = torch.randint(0, 1 << depth, (300, 3), generator=g)
    batch = torch.randint(0, 3, (300,), generator=g)
    rows = grid.tolist()
    for order, swap in [
        ("z", False),
        ("z-trans", True),
        ("hilbert", False),
        ("hilbert-trans", True),
    ]:
        ref_fn = morton_reference if order.startswith("z") else None
        expected = []
        for (x, y, z), b in zip(rows, batch.tolist(), strict=True):
            xyz = (y, x, z) if swap else (x, y, z)
            code = ref_fn(*xyz, depth) if ref_fn else hilbert_reference(xyz, depth)
            expected.append(b << (3 * depth) | code)
        got = encode(grid, batch, depth, order)
        assert got.tolist() == expected, order
    s = serialize(grid, batch, ("z", "hilbert"), depth)
    for k in range(2):
        assert torch.equal(s.order[k], torch.argsort(s.code[k]))
        assert torch.equal(s.inverse[k][s.order[k]], torch.arange(300))


def test_hilbert_curve_visits_neighbours_in_turn() -> None:
    """The defining property: on the full 2^d cube, consecutive codes are adjacent cells, and
    each sub-cube is one contiguous run of the curve (what grid pooling relies on)."""
    depth = 3
    side = 1 << depth
    grid = torch.tensor(list(itertools.product(range(side), repeat=3)))
    code = encode(grid, None, depth, "hilbert")
    assert sorted(code.tolist()) == list(range(side**3))  # a bijection
    path = grid[torch.argsort(code)]
    steps = (path[1:] - path[:-1]).abs().sum(dim=1)
    assert bool((steps == 1).all())
    cells = (path >> 1).tolist()
    runs = [c for i, c in enumerate(cells) if i == 0 or c != cells[i - 1]]
    assert len(runs) == (side // 2) ** 3  # every 2^3 cell entered once


def test_codes_keep_samples_apart_and_refuse_deep_grids() -> None:
    grid = torch.tensor([[5, 0, 0], [0, 0, 0], [1, 1, 1]])
    s = serialize(grid, torch.tensor([1, 0, 0]), ("hilbert",))
    assert s.order[0].tolist()[-1] == 0  # sample 1 sorts after all of sample 0
    with pytest.raises(ConfigError, match="16"):
        serialize(torch.tensor([[1 << 16, 0, 0]]), torch.tensor([0]), ("z",))


# --- patches and attention ------------------------------------------------------------------


def dense_attention(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Plain softmax attention among all rows of (n, 3C)."""
    n, c3 = qkv.shape
    c = c3 // 3
    q, k, v = qkv.view(n, 3, heads, c // heads).permute(1, 2, 0, 3)  # (H, n, D) each
    w = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    return (w @ v).transpose(0, 1).reshape(n, c)


@pytest.mark.parametrize("counts", [(5,), (23, 16, 40), (16,), (33,)])
def test_patch_attention_equals_dense_attention_per_patch(counts: tuple[int, ...]) -> None:
    """K = 16: a cloud of n <= K points is one patch (padded slots masked); a larger cloud is
    cut into K-point runs of the order, the last run its final K points (Pointcept's padding);
    every point reads its output from the first patch that holds it."""
    size, heads, c = 16, 2, 8
    torch.manual_seed(0)
    batch = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    n = len(batch)
    order = torch.randperm(n)
    order = order[torch.argsort(batch[order], stable=True)]  # samples contiguous, as codes are
    qkv = torch.randn(n, 3 * c, dtype=torch.float64)
    patches = patch_layout(order, batch[order], size)
    out = patch_attention(qkv, patches, heads, 0.3)
    expected = torch.empty(n, c, dtype=torch.float64)
    start = 0
    for count in counts:
        run = order[start : start + count]
        for first in range(0, count, size):
            lo = min(first, max(count - size, 0))
            members = run[lo : lo + size]
            owned = run[first : first + size]
            dense = dense_attention(qkv[members], heads, 0.3)
            expected[owned] = dense[first - lo : first - lo + len(owned)]
        start += count
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # padding never leaks: the outputs do not depend on what the empty slots would read
    if patches.valid is not None:
        elsewhere = torch.where(patches.valid, patches.index, n - 1)
        moved = Patches(elsewhere, patches.valid, patches.primary, size)
        torch.testing.assert_close(patch_attention(qkv, moved, heads, 0.3), out)


def test_patch_attention_gradients_stay_within_patches() -> None:
    """A point's output depends only on the points of its own patch (and sample)."""
    size = 8
    batch = torch.tensor([0] * 20 + [1] * 6)
    order = torch.arange(26)
    qkv = torch.randn(26, 12, requires_grad=True)
    out = patch_attention(qkv, patch_layout(order, batch, size), 2, 0.5)
    out[3].sum().backward()  # point 3: first patch of sample 0 (points 0..7)
    touched = set(torch.nonzero(qkv.grad.abs().sum(1)).flatten().tolist())
    assert touched == set(range(8))


# --- the model -------------------------------------------------------------------------------


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="encoder stages"):
        PTv3Config(enc_depths=(2, 2, 2, 2))
    with pytest.raises(ConfigError, match="heads"):
        PTv3Config(enc_num_head=(3, 4, 8, 16, 32))
    with pytest.raises(ConfigError, match="order"):
        PTv3Config(order=("peano",))
    assert StudentConfig(arch="ptv3").stage_channels == (64, 64, 128, 256)


def test_shapes_and_stage_features() -> None:
    torch.manual_seed(0)
    model = build_student(_tiny()).eval()
    vox, n = _voxels()
    with torch.no_grad():
        out = model(vox)
    assert [f.shape for f in out.point_feats] == [(n, c) for c in (16, 16, 16, 32)]
    assert out.voxel_feats.shape == (len(vox.coords), 16)
    assert torch.equal(out.voxel_coords, vox.coords.long())
    # points in one input voxel share every stage's feature; layer L-s is constant on the
    # stride-2^s cells (grid pooling halves the grid)
    for s, feats in enumerate(out.point_feats):
        key = torch.cat([vox.point_coords[:, :1], vox.point_coords[:, 1:] >> s], 1)
        _, group = torch.unique(key, dim=0, return_inverse=True)
        rep = torch.zeros(int(group.max()) + 1, dtype=torch.long).scatter_(
            0, group, torch.arange(n)
        )
        torch.testing.assert_close(feats, feats[rep[group]])
        assert len(torch.unique(feats[rep], dim=0)) > 0.9 * len(rep)


def _run(model, vox, seed: int):
    torch.manual_seed(seed)
    model.zero_grad()
    out = model(vox)
    loss = sum(f.square().mean() for f in out.point_feats)
    loss.backward()
    return [f.detach() for f in out.point_feats], {
        k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None
    }


def test_training_reaches_every_parameter_and_is_deterministic() -> None:
    """Order shuffling and drop path draw from torch's generator: in deterministic mode, one
    seed gives one run."""
    torch.manual_seed(0)
    model = build_student(_tiny(drop_path=0.2)).train()
    vox, _ = _voxels(seed=2)
    with deterministic_mode():
        feats_a, grads_a = _run(model, vox, seed=5)
        feats_b, grads_b = _run(model, vox, seed=5)
    assert set(grads_a) == {k for k, _ in model.named_parameters()}
    assert all(float(g.abs().sum()) > 0 for g in grads_a.values())
    for a, b in zip(feats_a, feats_b, strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    feats_c, _ = _run(model, vox, seed=6)  # another draw of orders and dropped paths
    assert not torch.equal(feats_a[0], feats_c[0])


def test_gradients_match_finite_differences() -> None:
    torch.manual_seed(1)
    model = build_student(_tiny()).double().eval()  # eval: running BN stats, fixed orders
    vox, _ = _voxels(seed=3, n=(700, 500))
    vox.feats = vox.feats.double()

    def loss() -> torch.Tensor:
        out = model(vox)
        return out.point_feats[0].square().mean() + out.point_feats[2].mean()

    loss().backward()
    params = dict(model.named_parameters())
    checks = [
        ("embedding.stem.conv.kernel", (17, 2, 5)),
        ("enc.enc3.block1.attn.qkv.weight", (40, 7)),
        ("enc.enc2.down.proj.weight", (3, 4)),
        ("dec.dec1.block0.cpe.0.kernel", (13, 5, 7)),
        ("dec.dec0.up.proj_skip.0.weight", (2, 3)),
    ]
    for name, index in checks:
        check_gradient(loss, params[name], index, h=1e-6, rtol=1e-4, atol=1e-10)


def pointcept_ptv3_table(in_channels: int, cfg: PTv3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of Pointcept's ``PointTransformerV3`` (PT-v3m1, spconv) and its shape,
    written from its module tree: ``embedding.stem.{conv,norm}``, ``enc.enc{s}.{down,block{i}}``,
    ``dec.dec{s}.{up,block{i}}``; PointSequential numbers unnamed children 0, 1, 2."""
    table: dict[str, tuple[int, ...]] = {}

    def linear(name: str, cin: int, cout: int, bias: bool = True) -> None:
        table[f"{name}.weight"] = (cout, cin)
        if bias:
            table[f"{name}.bias"] = (cout,)

    def batch_norm(name: str, c: int) -> None:
        for t in ("weight", "bias", "running_mean", "running_var"):
            table[f"{name}.{t}"] = (c,)
        table[f"{name}.num_batches_tracked"] = ()

    def layer_norm(name: str, c: int) -> None:
        table[f"{name}.weight"] = table[f"{name}.bias"] = (c,)

    def subm(name: str, cin: int, cout: int, k: int, bias: bool) -> None:
        table[f"{name}.weight"] = (cout, k, k, k, cin)  # spconv 2.x: (out, k, k, k, in)
        if bias:
            table[f"{name}.bias"] = (cout,)

    def block(name: str, c: int) -> None:
        subm(f"{name}.cpe.0", c, c, 3, True)
        linear(f"{name}.cpe.1", c, c)
        layer_norm(f"{name}.cpe.2", c)
        layer_norm(f"{name}.norm1.0", c)
        linear(f"{name}.attn.qkv", c, 3 * c, cfg.qkv_bias)
        linear(f"{name}.attn.proj", c, c)
        layer_norm(f"{name}.norm2.0", c)
        hidden = int(c * cfg.mlp_ratio)
        linear(f"{name}.mlp.0.fc1", c, hidden)
        linear(f"{name}.mlp.0.fc2", hidden, c)

    enc = cfg.enc_channels
    subm("embedding.stem.conv", in_channels, enc[0], 5, False)
    batch_norm("embedding.stem.norm", enc[0])
    for s, depth in enumerate(cfg.enc_depths):
        if s > 0:
            linear(f"enc.enc{s}.down.proj", enc[s - 1], enc[s])
            batch_norm(f"enc.enc{s}.down.norm.0", enc[s])
        for i in range(depth):
            block(f"enc.enc{s}.block{i}", enc[s])
    dec = [*cfg.dec_channels, enc[-1]]
    for s in reversed(range(len(cfg.dec_depths))):
        linear(f"dec.dec{s}.up.proj.0", dec[s + 1], dec[s])
        batch_norm(f"dec.dec{s}.up.proj.1", dec[s])
        linear(f"dec.dec{s}.up.proj_skip.0", enc[s], dec[s])
        batch_norm(f"dec.dec{s}.up.proj_skip.1", dec[s])
        for i in range(cfg.dec_depths[s]):
            block(f"dec.dec{s}.block{i}", dec[s])
    return table


def test_pointcept_export_has_pointcepts_keys_and_shapes(tmp_path: Path) -> None:
    """The default PTv3 (Pointcept's nuScenes settings, 46.2 M parameters) exports exactly the
    tensors of Pointcept's PT-v3m1(in_channels=4), in spconv's layout."""
    model = build_student(StudentConfig(arch="ptv3"))
    state = pointcept_state(model)
    got = {k: tuple(v.shape) for k, v in state.items()}
    expected = pointcept_ptv3_table(4, PTv3Config())
    assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())[:10]
    assert got == expected
    assert got["embedding.stem.conv.weight"] == (32, 5, 5, 5, 4)
    assert got["enc.enc1.down.proj.weight"] == (64, 32)
    assert got["dec.dec0.up.proj_skip.0.weight"] == (64, 32)
    params = sum(p.numel() for p in model.parameters())
    assert 46.0e6 < params < 46.4e6
    path = export_pointcept(model, tmp_path / "pointcept_backbone.pth", voxel=VoxelConfig())
    blob = torch.load(path, weights_only=True)
    assert set(blob["state_dict"]) == {POINTCEPT_PREFIX + k for k in expected}


@pytest.mark.skipif(not backend_installed("spconv"), reason="needs spconv")
def test_spconv_student_computes_what_the_minkowski_one_does() -> None:
    """The exported spconv-layout weights in an spconv-built PTv3 give the MinkowskiEngine
    model's features: the layout is the one spconv itself reads."""
    torch.manual_seed(3)
    me = build_student(_tiny()).eval()
    sp = build_student(_tiny(backend="spconv")).eval()
    sp.load_state_dict(pointcept_state(me))
    vox, _ = _voxels(seed=4)
    with torch.no_grad():
        a, b = me(vox), sp(vox)
    for fa, fb in zip(a.point_feats, b.point_feats, strict=True):
        assert float((fa - fb).norm() / fb.norm()) < 1e-4


def test_backbone_round_trip_into_eval(tmp_path: Path) -> None:
    """``backbone.pt`` records the architecture: hilda-eval rebuilds PTv3 without flags."""
    from hilda.eval.segment import Segmenter, build_backbone

    torch.manual_seed(4)
    model = build_student(_tiny()).eval()
    path = save_backbone(model, tmp_path / "backbone.pt", voxel=VoxelConfig(voxel_size=0.1))
    blob = torch.load(path, weights_only=True)
    assert blob["arch"] == "PT-v3m1" and blob["config"]["arch"] == "ptv3"
    loaded = build_backbone(str(path))
    assert loaded.net.cfg == model.cfg
    for (k, v), w in zip(model.state_dict().items(), loaded.net.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    random = build_backbone(str(path), init="random", seed=1)
    assert random.net.cfg.arch == "ptv3"
    seg = Segmenter(loaded, num_classes=5, frozen=True)
    vox_points, batch = batch_of(random_scene(800, 9))
    with torch.no_grad():
        logits = seg(vox_points, batch)
    assert logits.shape == (800, 5)
    assert convert_state(blob["state_dict"], "spconv").keys() == pointcept_state(model).keys()


def test_ptv3_on_the_real_keyframe_sweep(real_keyframe: Path) -> None:
    """The real sweep (23,112 voxels of 0.05 m) through a PTv3 with Pointcept's 1024-point
    patches: forward and backward, finite features and gradients. (The full-size model's step
    on this sweep is timed by benchmarks/student_step.py; a minute of CPU is too much for the
    suite.)"""
    from hilda.datasets.io import read_nuscenes_sweep

    sweep = next(real_keyframe.glob("*LIDAR_TOP*.pcd.bin"))
    points = torch.from_numpy(read_nuscenes_sweep(sweep))
    vox = voxelize(points, torch.zeros(len(points), dtype=torch.long), VoxelConfig())
    torch.manual_seed(0)
    patches = dict(enc_patch_size=(1024,) * 5, dec_patch_size=(1024,) * 4)
    model = build_student(_tiny(**patches)).train()
    out = model(vox)
    assert [f.shape for f in out.point_feats] == [(34688, c) for c in (16, 16, 16, 32)]
    assert all(torch.isfinite(f).all() for f in out.point_feats)
    sum(f.square().mean() for f in out.point_feats).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
