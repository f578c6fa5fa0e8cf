"""The DINOv2 teacher: features equal the official implementation's, official checkpoints
load, multi-layer features and CLS, codecs."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hilda.errors import ConfigError
from hilda.store import codecs
from hilda.teachers import MultiLayerTeacher, build_teacher, parse_layers
from hilda.teachers.dinov2 import (
    SIZES,
    _config,
    _model_from_config,
    hf_to_official,
    official_pos_embed,
    official_to_hf,
    pos_interpolation,
    use_official_pos_interpolation,
)

# --- an independent reference: the official forward, written from facebookresearch/dinov2 ----
# (vision_transformer.py: prepare_tokens_with_masks, interpolate_pos_encoding, Block, Attention,
# Mlp / SwiGLUFFN, get_intermediate_layers(norm=True)) on the official state-dict keys. The hub's
# models: offset 0.1 and no antialias without registers, offset 0 and antialias with them.


def _ln(x: torch.Tensor, state: dict, key: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[f"{key}.weight"], state[f"{key}.bias"], eps=1e-6)


def _lin(x: torch.Tensor, state: dict, key: str) -> torch.Tensor:
    return F.linear(x, state[f"{key}.weight"], state[f"{key}.bias"])


def official_reference(
    state: dict, x: torch.Tensor, blocks: list[int], heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, 3, H, W) -> patches (B, K, h, w, D), cls (B, K, D)."""
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    offset, antialias = (0.0, True) if registers else (0.1, False)
    b, _, height, width = x.shape
    h0, w0 = height // 14, width // 14
    tok = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
    tok = tok.flatten(2).transpose(1, 2)  # (B, h0 w0, D)
    dim = tok.shape[-1]
    tok = torch.cat([state["cls_token"].expand(b, -1, -1), tok], dim=1)
    pos = state["pos_embed"].float()
    m = int(math.sqrt(pos.shape[1] - 1))
    grid = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs = {"scale_factor": (float((h0 + offset) / m), float((w0 + offset) / m))}
    else:
        kwargs = {"size": (h0, w0)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    tok = tok + torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    if registers:
        tok = torch.cat([tok[:, :1], state["register_tokens"].expand(b, -1, -1), tok[:, 1:]], 1)
    outs = []
    for i in range(1 + max(blocks)):
        p = f"blocks.{i}."
        n = tok.shape[1]
        qkv = _lin(_ln(tok, state, p + "norm1"), state, p + "attn.qkv")
        q, k, v = qkv.reshape(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = (q * (dim // heads) ** -0.5 @ k.transpose(-2, -1)).softmax(dim=-1)
        y = _lin((attn @ v).transpose(1, 2).reshape(b, n, dim), state, p + "attn.proj")
        tok = tok + state[p + "ls1.gamma"] * y
        y = _ln(tok, state, p + "norm2")
        if f"{p}mlp.w12.weight" in state:  # SwiGLU (ViT-g)
            x1, x2 = _lin(y, state, p + "mlp.w12").chunk(2, dim=-1)
            y = _lin(F.silu(x1) * x2, state, p + "mlp.w3")
        else:
            y = _lin(F.gelu(_lin(y, state, p + "mlp.fc1")), state, p + "mlp.fc2")
        tok = tok + state[p + "ls2.gamma"] * y
        if i in blocks:
            outs.append(_ln(tok, state, "norm"))
    out = torch.stack(outs, dim=1)  # (B, K, N, D)
    patches = out[:, :, 1 + registers :].reshape(b, len(blocks), h0, w0, dim)
    return patches, out[:, :, 0]


def smooth_pos_embed(m: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(1, 1 + m * m, dim): a few cycles of a sinusoid per channel across the grid, as trained
    position embeddings are smooth (a random one would hide interpolation differences in noise)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, m), torch.linspace(0, 1, m), indexing="ij")
    freq = torch.rand(dim, 2, generator=g) * 3.0
    phase = torch.rand(dim, generator=g) * 2 * math.pi
    wave = torch.sin(
        2 * math.pi * (freq[:, :1, None] * y + freq[:, 1:, None] * x) + phase[:, None, None]
    )  # (D, m, m)
    patch = 0.5 * wave.permute(1, 2, 0).reshape(m * m, dim)
    cls = 0.1 * torch.randn(1, dim, generator=g)
    return torch.cat([cls, patch])[None]


def _trained_like(arch: str, registers: int, depth: int) -> torch.nn.Module:
    """A random model of the real width and heads (``depth`` blocks), with a smooth position
    embedding and layer scales large enough that every block changes the features."""
    config = _config(arch, registers)
    config.num_hidden_layers = depth
    torch.manual_seed(0)
    model = _model_from_config(config).eval()
    with torch.no_grad():
        emb = model.embeddings.position_embeddings
        emb.copy_(smooth_pos_embed(37, emb.shape[-1]))
        for name, param in model.named_parameters():
            if name.endswith("lambda1"):
                param.fill_(0.3)
    return model


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1)


# Full depth for ViT-S; two blocks of the real width for B/L/g (their cost is depth, and the
# position embedding enters before the first block).
VARIANTS = [(a, r, SIZES[a].depth if a == "vits14" else 2) for a in SIZES for r in (0, 4)]


@pytest.mark.parametrize(("arch", "registers", "depth"), VARIANTS)
def test_features_equal_the_official_implementation(arch: str, registers: int, depth: int) -> None:
    model = _trained_like(arch, registers, depth)
    use_official_pos_interpolation(model)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 448)  # non-square: a 16 x 32 patch grid from the 37 x 37 one
    blocks = [depth - 2, depth - 1]
    got_p, got_c = MultiLayerTeacher(model, blocks)(x)
    ref_p, ref_c = official_reference(hf_to_official(model), x, blocks, SIZES[arch].heads)
    assert got_p.shape == ref_p.shape == (2, 2, 16, 32, SIZES[arch].dim)
    for got, ref in ((got_p, ref_p), (got_c, ref_c)):
        assert _cosines(got, ref).min() > 0.99999
        assert (got - ref).abs().max() < 1e-4


def test_transformers_own_interpolation_differs_from_the_official() -> None:
    """What the override fixes (so the test above can fail): transformers' exact-size resizing
    of a smooth position embedding, for the models without registers."""
    model = _trained_like("vits14", 0, 12)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 448)
    plain, _ = MultiLayerTeacher(model, [11])(x)
    ref, _ = official_reference(hf_to_official(model), x, [11], 6)
    assert _cosines(plain, ref).min() < 0.9999


def test_official_pos_embed_native_grid_and_copies() -> None:
    pos = smooth_pos_embed(37, 8)
    for registers in (0, 4):
        how = pos_interpolation(registers)
        assert torch.equal(official_pos_embed(pos, (37, 37), how), pos)
        assert official_pos_embed(pos, (16, 32), how).shape == (1, 1 + 16 * 32, 8)
    with pytest.raises(ConfigError, match="square"):
        official_pos_embed(pos[:, :-1], (16, 32), pos_interpolation(0))
    # A deep copy resizes its own position embeddings, not the original's.
    model, info = build_teacher("random:vits14")
    assert "0.1" in info.pos_embed_interpolation
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.embeddings.position_embeddings.zero_()
    x = torch.randn(1, 3, 56, 84)
    zeroed = twin.embeddings.interpolate_pos_encoding(torch.zeros(1, 25, 384), 56, 84)
    assert float(zeroed.abs().max()) == 0.0
    assert not torch.equal(
        MultiLayerTeacher(model, [11])(x)[0], MultiLayerTeacher(twin, [11])(x)[0]
    )


@pytest.mark.parametrize("registers", [0, 4])
def test_vitg_swiglu_checkpoint_keys_round_trip(registers: int) -> None:
    """ViT-g's SwiGLU: the official fused ``w12`` (gate half first) <-> transformers' layers."""
    model = _trained_like("vitg14", registers, 2)
    state = hf_to_official(model)
    assert state["blocks.1.mlp.w12.weight"].shape == (2 * 4096, 1536)
    assert not any("gate_proj" in k or "fc1" in k for k in state)
    twin = _model_from_config(model.config)
    twin.load_state_dict(official_to_hf(state, twin), strict=True)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("arch", ["vits14", "vits14_reg"])
def test_official_checkpoint_loads_to_the_same_features(arch: str, tmp_path: Path) -> None:
    model, info = build_teacher(f"random:{arch}")
    path = tmp_path / f"dinov2_{arch.replace('_reg', '_reg4')}_pretrain.pth"
    state = hf_to_official(model)
    assert "blocks.11.attn.qkv.weight" in state and "pos_embed" in state
    assert ("register_tokens" in state) == arch.endswith("_reg")
    torch.save(state, path)
    loaded, info2 = build_teacher(str(path))
    assert info2.weights_hash == info.weights_hash and info2.registers == info.registers
    x = torch.randn(2, 3, 56, 84)
    a = MultiLayerTeacher(model, [10, 11])(x)
    b = MultiLayerTeacher(loaded, [10, 11])(x)
    for u, w in zip(a, b, strict=True):
        torch.testing.assert_close(u, w, rtol=0, atol=0)


def test_multilayer_shapes_norm_and_cls() -> None:
    model, _ = build_teacher("random:vits14_reg")
    x = torch.randn(3, 3, 56, 112)
    patches, cls = MultiLayerTeacher(model, [9, 11])(x)
    assert patches.shape == (3, 2, 4, 8, 384) and cls.shape == (3, 2, 384)
    out = model(pixel_values=x, output_hidden_states=True)
    # Block 11 normed equals the model's own final output (last_hidden_state), minus CLS/registers.
    torch.testing.assert_close(patches[:, 1].reshape(3, 32, 384), out.last_hidden_state[:, 5:])
    torch.testing.assert_close(cls[:, 1], out.last_hidden_state[:, 0])
    raw, _ = MultiLayerTeacher(model, [9], norm=False)(x)
    torch.testing.assert_close(raw[:, 0].reshape(3, 32, 384), out.hidden_states[10][:, 5:])
    with pytest.raises(ConfigError, match="multiple of 14"):
        MultiLayerTeacher(model, [11])(torch.randn(1, 3, 50, 112))


def test_parse_layers() -> None:
    assert parse_layers("last2", 12) == [10, 11]
    assert parse_layers("last4", 24) == [20, 21, 22, 23]
    assert parse_layers("8,11", 12) == [8, 11]
    assert parse_layers("-1", 12) == [11]
    for bad in ("last13", "12", "x"):
        with pytest.raises(ConfigError):
            parse_layers(bad, 12)


def _features_with_outliers(seed: int = 0) -> np.ndarray:
    """DINOv2-like features: (2 cameras, 16, 32, 384), a few huge channels, a few
    high-norm tokens (as in the models without registers)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (2, 16, 32, 384)).astype(np.float32)
    x[..., [7, 100, 300]] *= 60.0  # outlier channels
    x[:, 3, 5] *= 40.0  # high-norm tokens
    x[:, 10, 20] *= 40.0
    return x


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_codec_fidelity_with_planted_outliers(codec: str) -> None:
    x = _features_with_outliers()
    values, scale = codecs.encode(x, codec)
    assert values.dtype == np.dtype(codecs.storage_dtype(codec))
    cos = codecs.token_cosines(x, codecs.decode(values, scale))
    floor = {"float16": 0.99999, "bitround": 0.9999, "int8": 0.99}[codec]
    assert cos.min() > floor, (codec, cos.min())


def test_factorised_int8_beats_single_scales_on_outliers() -> None:
    x = _features_with_outliers()
    values, scales = codecs.encode(x, "int8")
    decoded = {"both": codecs.decode(values, scales)}
    # The rejected alternatives: one scale per token, or one scale per channel.
    for name, step in (
        ("token", np.abs(x).max(axis=-1, keepdims=True) / 127.0),
        ("channel", np.abs(x).max(axis=(-3, -2), keepdims=True) / 127.0),
    ):
        decoded[name] = np.rint(x / step) * step
    normal = np.setdiff1d(np.arange(384), [7, 100, 300])  # the channels outliers would crush
    worst = {
        k: codecs.token_cosines(x[..., normal], v[..., normal]).min() for k, v in decoded.items()
    }
    assert codecs.token_cosines(x, decoded["both"]).min() > 0.999
    assert worst["both"] > 0.995 > max(worst["token"], worst["channel"]), worst
