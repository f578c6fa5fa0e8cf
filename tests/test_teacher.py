"""The DINOv2 teacher: official checkpoints load, multi-layer features and CLS, codecs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hilda.errors import ConfigError
from hilda.models.teacher import MultiLayerTeacher, build_teacher, hf_to_official, parse_layers
from hilda.pipeline.ops import codecs


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
