"""Storage codecs for teacher features, and their measured fidelity. Pure numpy.

- ``float16``: the default; relative error ~5e-4 per value.
- ``bitround``: float32 with the mantissa rounded to ``BITROUND_KEEPBITS`` bits by numcodecs'
  ``BitRound`` (then losslessly compressed by the store). Its error is relative to each
  value, so DINOv2's few huge-magnitude channels and high-norm tokens do not hurt the rest.
- ``int8``: symmetric int8 with one scale per channel (per frame, camera and layer, over the
  patch grid). Per-channel rather than per-token scales keep outlier *channels* from crushing
  the others; an outlier *token* still widens every channel's step, which ``bitround`` avoids.

``fidelity`` measures what the trainer sees: the cosine between decoded and float32 tokens.
"""

from __future__ import annotations

import numpy as np

CODECS = ("float16", "bitround", "int8")
BITROUND_KEEPBITS = 7


def storage_dtype(codec: str) -> str:
    return {"float16": "float16", "bitround": "float32", "int8": "int8"}[codec]


def encode(x: np.ndarray, codec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode (..., h, w, D) float32 features -> (values, per-channel scale (..., D) or None)."""
    if codec == "float16":
        return x.astype(np.float16), None
    if codec == "bitround":
        import numcodecs

        rounded = numcodecs.BitRound(keepbits=BITROUND_KEEPBITS).encode(
            np.ascontiguousarray(x, np.float32)
        )
        return np.asarray(rounded).view(np.float32).reshape(x.shape), None
    if codec == "int8":
        scale = np.abs(x).max(axis=(-3, -2)) / 127.0  # (..., D)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(x / scale[..., None, None, :]), -127, 127).astype(np.int8)
        return q, scale
    raise ValueError(f"unknown codec {codec!r}; use one of {CODECS}")


def decode(values: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Stored values (+ per-channel scale for int8) -> float32 (..., h, w, D)."""
    if scale is not None:
        return values.astype(np.float32) * scale[..., None, None, :]
    return values.astype(np.float32)


def token_cosines(reference: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Cosine similarity per token (last axis = channels), flattened."""
    a = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    b = decoded.reshape(-1, decoded.shape[-1]).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(denom, 1e-30)
