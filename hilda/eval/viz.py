"""Feature visualisation maths. Pure numpy: arrays in, arrays out.

- PCA to RGB, as DINOv2's feature figures: the first three principal components of the
  centred features, each stretched to [0, 1] between its 1st and 99th percentile.
- Cosine similarity of one anchor feature against many (HilDA Fig. B9-B11).
"""

from __future__ import annotations

import numpy as np


def pca_basis(feats: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (D, k)) of (N, D) features; fewer than k dimensions are padded
    with zero components."""
    x = np.asarray(feats, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)  # vt (min(N, D), D)
    comps = np.zeros((x.shape[1], k))
    m = min(k, vt.shape[0])
    # A component's sign is arbitrary; fix it so the largest loading is positive (the same
    # features always give the same colours).
    signs = np.sign(vt[:m][np.arange(m), np.abs(vt[:m]).argmax(axis=1)])
    comps[:, :m] = (vt[:m] * np.where(signs == 0, 1.0, signs)[:, None]).T
    return mean, comps


def pca_rgb(
    feats: np.ndarray,
    basis: tuple[np.ndarray, np.ndarray] | None = None,
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """(N, D) features -> (N, 3) colours in [0, 1]. ``basis`` defaults to the features' own;
    ``reference`` (projections of other features) sets the percentile stretch, so two sets
    can share one colouring."""
    mean, comps = basis if basis is not None else pca_basis(feats)
    proj = (np.asarray(feats, np.float64) - mean) @ comps  # (N, 3)
    ref = proj if reference is None else reference
    lo, hi = np.percentile(ref, 1, axis=0), np.percentile(ref, 99, axis=0)
    return np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)


def cosine_to(anchor: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Cosine similarity of an anchor (D,) with each of (..., D) features -> (...)."""
    a = np.asarray(anchor, np.float64)
    f = np.asarray(feats, np.float64)
    num = f @ a
    den = np.linalg.norm(f, axis=-1) * np.linalg.norm(a)
    return num / np.maximum(den, 1e-12)


def patch_of(uv: np.ndarray, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(Q, 2) pixel coordinates of an image of ``image_size`` (W, H) -> (Q, 2) int (row, col)
    of the teacher patch grid ``grid`` (h, w) covering the (resized) image."""
    w, h = image_size
    gh, gw = grid
    col = np.clip(np.floor(uv[:, 0] / w * gw), 0, gw - 1).astype(np.int64)
    row = np.clip(np.floor(uv[:, 1] / h * gh), 0, gh - 1).astype(np.int64)
    return np.stack([row, col], axis=1)


def central_anchor(uv: np.ndarray, image_size: tuple[int, int]) -> int:
    """Row of the pixel nearest the image centre among (Q, 2) projections."""
    if len(uv) == 0:
        raise ValueError("no projected points to pick an anchor from")
    centre = np.array(image_size, np.float64) / 2
    return int(np.argmin(np.linalg.norm(uv - centre, axis=1)))
