"""Point Transformer V3 (Wu et al., CVPR 2024) as a HilDA student, on either sparse backend.

The architecture, module names and parameter shapes are those of Pointcept's
``PointTransformerV3`` (PT-v3m1), so that ``hilda.models.convert.pointcept_state`` gives a
state dict that Pointcept loads unchanged:

- ``embedding.stem``: a kernel-5 submanifold convolution, BatchNorm, GELU;
- ``enc.enc{s}``: ``down`` (serialized grid pooling, s > 0) then ``block{i}``;
- ``dec.dec{s}`` (s = 3 .. 0): ``up`` (unpooling onto the encoder's points, plus the skip)
  then ``block{i}``;
- a block is a conditional positional encoding (``cpe``: submanifold 3^3 convolution, Linear,
  LayerNorm, added to its input), pre-norm serialized patch attention and an MLP, both with
  drop path.

Where this departs from Pointcept, and why:

- the convolutions go through ``hilda.models.sparse`` (MinkowskiEngine on CPU, whose backward
  is correct there; spconv on CUDA), which is what lets PTv3 train in CPU tests;
- the orders are shuffled in training only: evaluation and feature extraction are then
  reproducible (Pointcept shuffles at inference too);
- attention runs on patches as Pointcept's flash-attention path defines them (a cloud of n > K
  points: patches of K consecutive points in curve order, the last one the final K points; a
  cloud of n <= K points: one patch of n), computed by ``torch.nn.functional.
  scaled_dot_product_attention`` with a key mask, or by xformers / flash-attention on CUDA.

The forward returns the four decoder stages (dec0 .. dec3 = student layers L .. L-3, strides
1 .. 8) at every input point, as MinkUNet34 does, so every distillation preset works with
either student.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hilda.errors import ConfigError
from hilda.models.outputs import STAGE_STRIDES, StudentOutput
from hilda.models.scatter import segment_max
from hilda.models.serialization import (
    ORDERS,
    Serialized,
    orders_from_codes,
    serialize,
    shuffled,
)
from hilda.models.sparse import SparseOps, load_ops
from hilda.models.voxelize import Voxels, lookup

Attention = Literal["auto", "sdpa", "xformers", "flash"]


@dataclass(frozen=True)
class PTv3Config:
    """Pointcept's PT-v3m1 settings for outdoor segmentation (its nuScenes config)."""

    order: tuple[str, ...] = ORDERS
    stride: tuple[int, ...] = (2, 2, 2, 2)
    enc_depths: tuple[int, ...] = (2, 2, 2, 6, 2)
    enc_channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    enc_num_head: tuple[int, ...] = (2, 4, 8, 16, 32)
    enc_patch_size: tuple[int, ...] = (1024, 1024, 1024, 1024, 1024)
    dec_depths: tuple[int, ...] = (2, 2, 2, 2)
    dec_channels: tuple[int, ...] = (64, 64, 128, 256)
    dec_num_head: tuple[int, ...] = (4, 4, 8, 16)
    dec_patch_size: tuple[int, ...] = (1024, 1024, 1024, 1024)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    drop_path: float = 0.3
    pre_norm: bool = True
    shuffle_orders: bool = True
    # "auto": flash-attention, else xformers, on CUDA when installed; SDPA otherwise.
    attention: Attention = "auto"

    def __post_init__(self) -> None:
        stages = len(self.enc_depths)
        if stages != len(STAGE_STRIDES) + 1:
            raise ConfigError(
                f"ptv3 needs {len(STAGE_STRIDES) + 1} encoder stages (its 4 decoder stages are "
                f"the distilled student layers), got {stages}"
            )
        for name in ("enc_channels", "enc_num_head", "enc_patch_size"):
            if len(getattr(self, name)) != stages:
                raise ConfigError(f"ptv3.{name} needs {stages} values")
        for name in ("dec_depths", "dec_channels", "dec_num_head", "dec_patch_size"):
            if len(getattr(self, name)) != stages - 1:
                raise ConfigError(f"ptv3.{name} needs {stages - 1} values")
        if tuple(self.stride) != (2,) * (stages - 1):
            raise ConfigError(f"ptv3.stride must be all 2 (grid pooling halves), got {self.stride}")
        if not self.order or any(o not in ORDERS for o in self.order):
            raise ConfigError(f"ptv3.order must be drawn from {ORDERS}, got {self.order}")
        pairs = list(zip(self.enc_channels, self.enc_num_head, strict=True))
        pairs += list(zip(self.dec_channels, self.dec_num_head, strict=True))
        for channels, heads in pairs:
            if channels % heads:
                raise ConfigError(f"ptv3: {channels} channels do not split into {heads} heads")

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of student layers L, L-1, L-2, L-3 (dec0 .. dec3)."""
        return tuple(self.dec_channels)


# ---------------------------------------------------------------------------------------------
# Patches and attention (pure torch)


@dataclass
class Patches:
    """Serialized patches of one order: P patches of K slots over N points."""

    index: torch.Tensor  # (P, K) int64 point of each slot (0 in empty slots)
    valid: torch.Tensor | None  # (P, K) bool, None when every slot holds a point
    primary: torch.Tensor  # (N,) int64 flat slot (p * K + j) each point's output comes from
    size: int  # K


def patch_layout(order: torch.Tensor, batch: torch.Tensor, size: int) -> Patches:
    """Patches of ``size`` along ``order`` (N,) (sorted position -> point) of samples ``batch``
    (N,) (sample ids; contiguous in ``order`` because the codes start with them).

    A sample of n > K points gets ceil(n / K) patches of K consecutive points, the last one
    its final K points (Pointcept's padding by the preceding points); a sample of n <= K points
    one patch of n points and K - n empty slots. Every point's output is read from the one
    patch that holds it first.
    """
    device = order.device
    counts = torch.bincount(batch, minlength=int(batch.max()) + 1 if len(batch) else 0)
    counts = counts[counts > 0]  # (B,) points per sample
    offsets = torch.cumsum(counts, 0) - counts  # (B,) first sorted position
    per_sample = (counts + size - 1) // size  # (B,) patches
    first = torch.cumsum(per_sample, 0) - per_sample  # (B,) first patch
    sample = torch.repeat_interleave(torch.arange(len(counts), device=device), per_sample)  # (P,)
    within = torch.arange(len(sample), device=device) - first[sample]  # (P,)
    last_start = (counts - size).clamp(min=0)  # (B,)
    start = torch.minimum(within * size, last_start[sample])  # (P,) local start
    slot = torch.arange(size, device=device)
    local = start[:, None] + slot[None, :]  # (P, K)
    valid = slot[None, :] < counts[sample][:, None]  # (P, K)
    sorted_pos = offsets[sample][:, None] + torch.where(valid, local, 0)  # (P, K)
    index = order[sorted_pos]
    # Primary slot of each sorted position: its patch (local // K), its place there.
    sorted_sample = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    local_pos = torch.arange(len(order), device=device) - offsets[sorted_sample]  # (N,)
    patch = local_pos // size
    patch_start = torch.minimum(patch * size, last_start[sorted_sample])
    primary_sorted = (first[sorted_sample] + patch) * size + (local_pos - patch_start)  # (N,)
    primary = torch.empty_like(primary_sorted)
    primary[order] = primary_sorted
    return Patches(index, None if bool(valid.all()) else valid, primary, size)


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def attention_backend(requested: Attention, device: torch.device, dtype: torch.dtype) -> str:
    """Which kernel runs attention: ``requested``, or for "auto" the fastest one present.
    (Called by every block at every step: the package lookups are cached.)"""
    cuda = device.type == "cuda"
    flash = cuda and _installed("flash_attn")
    xformers = cuda and _installed("xformers")
    if requested == "auto":
        if flash and dtype in (torch.float16, torch.bfloat16):
            return "flash"
        return "xformers" if xformers else "sdpa"
    if requested == "flash" and not flash:
        raise ConfigError("ptv3.attention=flash needs CUDA and flash-attn installed")
    if requested == "xformers" and not xformers:
        raise ConfigError("ptv3.attention=xformers needs CUDA and xformers installed")
    return requested


def patch_attention(
    qkv: torch.Tensor,
    patches: Patches,
    heads: int,
    scale: float,
    dropout: float = 0.0,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Softmax attention within each patch: (N, 3C) packed q, k, v -> (N, C)."""
    c = qkv.shape[1] // 3
    d = c // heads
    p, k = patches.index.shape
    if backend == "sdpa":
        grouped = qkv[patches.index].view(p, k, 3, heads, d).permute(2, 0, 3, 1, 4)
        q, key, v = grouped.unbind(0)  # (P, H, K, D) each
        mask = None if patches.valid is None else patches.valid[:, None, None, :]  # (P,1,1,K)
        out = F.scaled_dot_product_attention(q, key, v, mask, dropout_p=dropout, scale=scale)
        return out.transpose(1, 2).reshape(p * k, c)[patches.primary]  # (N, C)
    # Variable-length kernels: the real slots packed one after another, no padding.
    valid = patches.valid
    if valid is None:
        valid = torch.ones_like(patches.index, dtype=torch.bool)
    packed = patches.index[valid]  # (T,)
    seqlens = valid.sum(dim=1)  # (P,)
    packed_pos = torch.cumsum(valid.reshape(-1), 0) - 1  # flat slot -> packed row
    rows = qkv[packed].view(-1, 3, heads, d)  # (T, 3, H, D)
    if backend == "flash":
        from flash_attn import flash_attn_varlen_qkvpacked_func

        cu = F.pad(torch.cumsum(seqlens, 0), (1, 0)).to(torch.int32)
        half = rows.dtype if rows.dtype in (torch.float16, torch.bfloat16) else torch.float16
        out = flash_attn_varlen_qkvpacked_func(
            rows.to(half), cu, k, dropout_p=dropout, softmax_scale=scale
        ).to(qkv.dtype)  # (T, H, D); flash-attention computes in half precision only
    elif backend == "xformers":
        from xformers.ops import fmha, memory_efficient_attention

        bias = fmha.BlockDiagonalMask.from_seqlens(seqlens.tolist())
        q, key, v = rows.unsqueeze(0).unbind(2)  # (1, T, H, D) each
        out = memory_efficient_attention(q, key, v, attn_bias=bias, p=dropout, scale=scale)[0]
    else:
        raise ConfigError(f"unknown attention backend {backend!r}")
    return out.reshape(-1, c)[packed_pos[patches.primary]]  # (N, C)


# ---------------------------------------------------------------------------------------------
# One grid level: its points, serialization, patches and sparse tensor


class Level:
    """The points of one encoder/decoder level (N points): grid coordinates, sample ids, their
    serialization, cached patches and the backend's sparse tensor for the CPE convolutions."""

    def __init__(
        self,
        ops: SparseOps,
        grid: torch.Tensor,  # (N, 3) int64 >= 0
        batch: torch.Tensor,  # (N,) int64
        batch_size: int,
        serialized: Serialized,
    ) -> None:
        self.ops = ops
        self.grid, self.batch, self.serialized = grid, batch, serialized
        coords = torch.cat([batch[:, None], grid], dim=1)  # (N, 4)
        feats = torch.zeros(len(grid), 1, device=grid.device)
        self.sparse = ops.make_input(feats, coords, batch_size)
        self.rows = lookup(ops.coordinates(self.sparse), coords)  # (N,) row of each point
        self.points_of_rows = torch.empty_like(self.rows)
        self.points_of_rows[self.rows] = torch.arange(len(self.rows), device=grid.device)
        self._patches: dict[tuple[int, int], Patches] = {}

    def __len__(self) -> int:
        return len(self.grid)

    def conv(self, module: nn.Module, feat: torch.Tensor) -> torch.Tensor:
        """A sparse convolution over this level's points: (N, C) -> (N, C')."""
        x = self.ops.with_features(self.sparse, feat[self.points_of_rows])
        return self.ops.features(module(x))[self.rows]

    def patches(self, order_index: int, size: int) -> Patches:
        key = (order_index, size)
        if key not in self._patches:
            order = self.serialized.order[order_index % len(self.serialized.order)]
            self._patches[key] = patch_layout(order, self.batch[order], size)
        return self._patches[key]


# ---------------------------------------------------------------------------------------------
# Modules (Pointcept's names)


def _batch_norm(channels: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=1e-3, momentum=0.01)  # Pointcept's bn_layer


class DropPath(nn.Module):
    """Stochastic depth per point (timm's DropPath applied to (N, C) point features)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0], 1)).bernoulli_(keep) / keep  # (N, 1)
        return x * mask


class MLP(nn.Module):
    def __init__(self, channels: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SerializedAttention(nn.Module):
    def __init__(
        self, cfg: PTv3Config, channels: int, heads: int, patch_size: int, order_index: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.heads, self.patch_size, self.order_index = heads, patch_size, order_index
        self.scale = cfg.qk_scale or (channels // heads) ** -0.5
        self.qkv = nn.Linear(channels, 3 * channels, bias=cfg.qkv_bias)
        self.proj = nn.Linear(channels, channels)
        self.proj_drop = nn.Dropout(cfg.proj_drop)

    def forward(self, feat: torch.Tensor, level: Level) -> torch.Tensor:
        patches = level.patches(self.order_index, self.patch_size)
        qkv = self.qkv(feat)  # (N, 3C)
        backend = attention_backend(self.cfg.attention, qkv.device, qkv.dtype)
        dropout = self.cfg.attn_drop if self.training else 0.0
        out = patch_attention(qkv, patches, self.heads, self.scale, dropout, backend)
        return self.proj_drop(self.proj(out))  # (N, C)


class Block(nn.Module):
    def __init__(
        self,
        ops: SparseOps,
        cfg: PTv3Config,
        channels: int,
        heads: int,
        patch_size: int,
        drop_path: float,
        order_index: int,
        level: int,
    ) -> None:
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.cpe = nn.ModuleList(
            [
                ops.conv(channels, channels, 3, 1, level, bias=True),
                nn.Linear(channels, channels),
                nn.LayerNorm(channels),
            ]
        )
        self.norm1 = nn.Sequential(nn.LayerNorm(channels))
        self.attn = SerializedAttention(cfg, channels, heads, patch_size, order_index)
        self.norm2 = nn.Sequential(nn.LayerNorm(channels))
        self.mlp = nn.Sequential(MLP(channels, int(channels * cfg.mlp_ratio), cfg.proj_drop))
        self.drop_path = DropPath(drop_path)

    def forward(self, feat: torch.Tensor, level: Level) -> torch.Tensor:  # (N, C) -> (N, C)
        conv, linear, norm = self.cpe
        feat = feat + norm(linear(level.conv(conv, feat)))
        shortcut = feat
        h = self.norm1(feat) if self.pre_norm else feat
        feat = shortcut + self.drop_path(self.attn(h, level))
        if not self.pre_norm:
            feat = self.norm1(feat)
        shortcut = feat
        h = self.norm2(feat) if self.pre_norm else feat
        feat = shortcut + self.drop_path(self.mlp(h))
        if not self.pre_norm:
            feat = self.norm2(feat)
        return feat


class SerializedPooling(nn.Module):
    """Grid pooling by stride 2 along the serialization: points whose codes agree above the
    lowest 3 bits share a 2^3 cell; their projected features are max-pooled."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cin, cout)
        self.norm = nn.Sequential(_batch_norm(cout))
        self.act = nn.Sequential(nn.GELU())

    def forward(
        self, feat: torch.Tensor, level: Level
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, Cin) -> pooled (M, Cout), the cluster of each point (N,), the cells' first
        points (M,) and their codes (O, M)."""
        shift = 1 if level.serialized.depth >= 1 else 0
        code = level.serialized.code >> (3 * shift)  # (O, N)
        _, cluster, counts = torch.unique(
            code[0], sorted=True, return_inverse=True, return_counts=True
        )
        members = torch.sort(cluster, stable=True).indices  # (N,) points grouped by cell
        pointer = F.pad(torch.cumsum(counts, 0), (1, 0))  # (M + 1,)
        head = members[pointer[:-1]]  # (M,) first point of each cell
        pooled = segment_max(self.proj(feat)[members], pointer)  # (M, Cout)
        return self.act(self.norm(pooled)), cluster, head, code[:, head]


class SerializedUnpooling(nn.Module):
    """Back onto the finer level's points: projected coarse features plus the projected skip."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(cin, cout), _batch_norm(cout), nn.GELU())
        self.proj_skip = nn.Sequential(nn.Linear(skip, cout), _batch_norm(cout), nn.GELU())

    def forward(
        self, coarse: torch.Tensor, skip: torch.Tensor, cluster: torch.Tensor
    ) -> torch.Tensor:  # (M, Cin), (N, Cskip), (N,) -> (N, Cout)
        return self.proj_skip(skip) + self.proj(coarse)[cluster]


class Stem(nn.Module):
    def __init__(self, ops: SparseOps, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ops.conv(cin, cout, 5, 1, 0)
        self.norm = _batch_norm(cout)
        self.act = nn.GELU()

    def forward(self, feat: torch.Tensor, level: Level) -> torch.Tensor:
        return self.act(self.norm(level.conv(self.conv, feat)))


class Embedding(nn.Module):
    def __init__(self, ops: SparseOps, cin: int, cout: int) -> None:
        super().__init__()
        self.stem = Stem(ops, cin, cout)

    def forward(self, feat: torch.Tensor, level: Level) -> torch.Tensor:
        return self.stem(feat, level)


def _drop_rates(rate: float, depths: tuple[int, ...]) -> list[list[float]]:
    """Pointcept's stochastic-depth schedule: linear from 0 to ``rate`` over all blocks."""
    rates = torch.linspace(0, rate, sum(depths)).tolist()
    out, start = [], 0
    for depth in depths:
        out.append(rates[start : start + depth])
        start += depth
    return out


class PointTransformerV3(nn.Module):
    """PT-v3m1 over the voxels of a batch; ``cfg`` is the student config (``cfg.ptv3``)."""

    def __init__(self, cfg, ops: SparseOps | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        p: PTv3Config = cfg.ptv3
        self.ops: SparseOps = ops or load_ops(cfg.backend)
        ops = self.ops
        self.embedding = Embedding(ops, cfg.in_channels, p.enc_channels[0])
        self.enc = nn.ModuleDict()
        for s, rates in enumerate(_drop_rates(p.drop_path, p.enc_depths)):
            stage = nn.ModuleDict()
            if s > 0:
                stage["down"] = SerializedPooling(p.enc_channels[s - 1], p.enc_channels[s])
            for i, rate in enumerate(rates):
                stage[f"block{i}"] = Block(
                    ops, p, p.enc_channels[s], p.enc_num_head[s], p.enc_patch_size[s], rate,
                    i % len(p.order), s,
                )  # fmt: skip
            self.enc[f"enc{s}"] = stage
        self.dec = nn.ModuleDict()
        channels = [*p.dec_channels, p.enc_channels[-1]]
        dec_rates = _drop_rates(p.drop_path, p.dec_depths)
        for s in reversed(range(len(p.dec_depths))):
            stage = nn.ModuleDict()
            stage["up"] = SerializedUnpooling(channels[s + 1], p.enc_channels[s], channels[s])
            for i, rate in enumerate(reversed(dec_rates[s])):
                stage[f"block{i}"] = Block(
                    ops, p, channels[s], p.dec_num_head[s], p.dec_patch_size[s], rate,
                    i % len(p.order), s,
                )  # fmt: skip
            self.dec[f"dec{s}"] = stage

    def _serialize(self, grid: torch.Tensor, batch: torch.Tensor) -> Serialized:
        s = serialize(grid, batch, tuple(self.cfg.ptv3.order))
        return shuffled(s) if self.training and self.cfg.ptv3.shuffle_orders else s

    def _pooled_level(self, level: Level, head: torch.Tensor, code: torch.Tensor, b: int) -> Level:
        order, inverse = orders_from_codes(code)
        depth = max(level.serialized.depth - 1, 0)
        serialized = Serialized(code, order, inverse, depth)
        if self.training and self.cfg.ptv3.shuffle_orders:
            serialized = shuffled(serialized)
        return Level(self.ops, level.grid[head] >> 1, level.batch[head], b, serialized)

    def forward(self, voxels: Voxels) -> StudentOutput:
        coords = voxels.coords.long()  # (M, 4) [b, x, y, z] >= 0
        grid, batch = coords[:, 1:], coords[:, 0]
        b = voxels.batch_size
        level = Level(self.ops, grid, batch, b, self._serialize(grid, batch))
        self.ops.check_training(level.sparse, self)
        feat = self.embedding(voxels.feats, level)  # (M, C0)
        levels, skips, clusters = [level], [], []
        for s, stage in enumerate(self.enc.values()):
            for name, module in stage.items():
                if name == "down":
                    skips.append(feat)
                    feat, cluster, head, code = module(feat, levels[-1])
                    levels.append(self._pooled_level(levels[-1], head, code, b))
                    clusters.append(cluster)
                else:
                    feat = module(feat, levels[s])
        decoded = {}
        for name, stage in self.dec.items():
            s = int(name.removeprefix("dec"))
            for block_name, module in stage.items():
                if block_name == "up":
                    feat = module(feat, skips[s], clusters[s])
                else:
                    feat = module(feat, levels[s])
            decoded[s] = feat  # (N_s, C) on level s's points
        # Student layer L-s = dec{s}, read at each input voxel through the pooling clusters.
        point_feats = []
        to_level = torch.arange(len(coords), device=coords.device)  # voxel -> level-s point
        for s in range(len(decoded)):
            voxel_feats = decoded[s][to_level]  # (M, C_s)
            point_feats.append(voxel_feats[voxels.point_voxel])  # (N, C_s)
            if s < len(clusters):
                to_level = clusters[s][to_level]
        return StudentOutput(point_feats, decoded[0], coords)
