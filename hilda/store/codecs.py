"""Storage codecs of the cache: teacher features (and their measured fidelity) and the
bit-packed BEV occupancy. Pure numpy.

- ``float16``: the default; relative error ~5e-4 per value.
- ``bitround``: float32 with the mantissa rounded to ``BITROUND_KEEPBITS`` bits by numcodecs'
  ``BitRound``, stored with Blosc zstd + bit-shuffle (``bitround_compressor``), which turns the
  zeroed mantissa bits into savings. Its error is relative to each value, so DINOv2's few
  huge-magnitude channels and high-norm tokens do not hurt the rest.
- ``int8``: symmetric int8 with a factorised scale: each token is first divided by its RMS
  (kept per token), then each channel by its max over the patch grid (kept per channel).
  The channel scale absorbs DINOv2's huge-magnitude channels, the token scale its high-norm
  tokens; a per-token-only or per-channel-only scale is wrecked by one or the other
  (measured in tests/test_teacher.py).

``fidelity`` measures what the trainer sees: the cosine between decoded and float32 tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CODECS = ("float16", "bitround", "int8")
BITROUND_KEEPBITS = 5


def bitround_compressor():
    """The compressor that makes bit-rounded float32 pay off (bit-shuffle groups the zeros)."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")


def teacher_compressors(codec: str, blocks: list[int]) -> dict[str, Any] | None:
    """Compressors of a teacher group's grids per codec (None: zarr's default). float16 and
    int8 grids are stored uncompressed: zstd saves ~8% of float16's bytes (1% of int8's) but
    makes each read ~2.5x slower (docs/benchmarks.md), and the trainer reads every stored
    grid of two frames per sample. The bitround codec exists to be compressed."""
    from hilda.store.schema import INT8_SCALES, layer_array

    if codec == "float16":
        return {layer_array(b): None for b in blocks}
    if codec == "int8":
        return {layer_array(b, part): None for b in blocks for part in ("", *INT8_SCALES)}
    if codec == "bitround":
        return {layer_array(b): bitround_compressor() for b in blocks}
    return None


def storage_dtype(codec: str) -> str:
    return {"float16": "float16", "bitround": "float32", "int8": "int8"}[codec]


Scales = tuple[np.ndarray, np.ndarray] | None  # (per channel (..., D), per token (..., h, w))


def encode(x: np.ndarray, codec: str) -> tuple[np.ndarray, Scales]:
    """Encode (..., h, w, D) float32 features -> (values, int8 scales or None)."""
    if codec == "float16":
        return x.astype(np.float16), None
    if codec == "bitround":
        import numcodecs

        rounded = numcodecs.BitRound(keepbits=BITROUND_KEEPBITS).encode(
            np.ascontiguousarray(x, np.float32)
        )
        return np.asarray(rounded).view(np.float32).reshape(x.shape), None
    if codec == "int8":
        token = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=-1)).astype(
            np.float32
        )  # (..., h, w)
        token = np.where(token > 0, token, 1.0).astype(np.float32)
        y = x / token[..., None]
        channel = np.abs(y).max(axis=(-3, -2)) / 127.0  # (..., D)
        channel = np.where(channel > 0, channel, 1.0).astype(np.float32)
        q = np.clip(np.rint(y / channel[..., None, None, :]), -127, 127).astype(np.int8)
        return q, (channel, token)
    raise ValueError(f"unknown codec {codec!r}; use one of {CODECS}")


def decode(values: np.ndarray, scales: Scales = None) -> np.ndarray:
    """Stored values (+ the int8 scales) -> float32 (..., h, w, D)."""
    if scales is not None:
        channel, token = scales
        return values.astype(np.float32) * channel[..., None, None, :] * token[..., None]
    return values.astype(np.float32)


def token_cosines(reference: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Cosine similarity per token (last axis = channels), flattened."""
    a = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    b = decoded.reshape(-1, decoded.shape[-1]).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(denom, 1e-30)


def pack(grid: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W/8) uint8, most significant bit first (np.packbits): the stored
    form of ``occupancy/bev``."""
    return np.packbits(grid, axis=-1)


def unpack(packed: np.ndarray) -> np.ndarray:
    """(..., H, W/8) uint8 -> (..., H, W) bool."""
    return np.unpackbits(packed, axis=-1).astype(bool)
