"""Vectorised ray casting against the synthetic world's primitives.

Primitives are yaw-rotated boxes, vertical cylinders (with a top cap) and spheres, plus an
infinite ground plane z = 0. All rays of one cast share one origin (a LiDAR or a camera
centre). A cast first lists the candidate (primitive, ray) pairs: each primitive's footprint,
the rays that can reach it (by default those within the azimuth range of its bounding box;
a camera passes the pixels of its projected box). It then intersects all pairs at once, per
primitive kind, and keeps the nearest hit of each ray. There is no Python loop over
primitives: a sweep of a few thousand rays costs a few array passes, which is what lets
``make-synthetic --scale`` write a trainval-sized world in minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EPS = 1e-6
KIND_BOX, KIND_CYLINDER, KIND_SPHERE = 0, 1, 2


@dataclass(frozen=True)
class Primitives:
    """A struct of arrays, one row per primitive (N rows)."""

    kind: np.ndarray  # (N,) int: KIND_*
    center: np.ndarray  # (N, 3) box centre / cylinder base centre / sphere centre
    size: np.ndarray  # (N, 3) box half-extents / (radius, height, 0) / (radius, 0, 0)
    yaw: np.ndarray  # (N,) box heading
    label: np.ndarray  # (N,) uint8 nuScenes general category index
    instance: np.ndarray  # (N,) int32, > 0; one object may own several primitives
    color: np.ndarray  # (N, 3) float base RGB in [0, 1]
    texture: np.ndarray  # (N,) int texture id

    def __len__(self) -> int:
        return len(self.kind)

    def aabb_corners(self) -> np.ndarray:
        """(N, 8, 3) corners of an axis-aligned box around each primitive."""
        s = self.size
        box, cyl = self.kind == KIND_BOX, self.kind == KIND_CYLINDER
        r = np.where(box, np.hypot(s[:, 0], s[:, 1]), s[:, 0])  # horizontal half-extent
        z_below = np.where(box, s[:, 2], np.where(cyl, 0.0, s[:, 0]))  # cylinders start at base
        z_above = np.where(box, s[:, 2], np.where(cyl, s[:, 1], s[:, 0]))
        lo = self.center - np.stack([r, r, z_below], axis=1)
        hi = self.center + np.stack([r, r, z_above], axis=1)
        sel = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])  # (8, 3)
        both = np.stack([lo, hi], axis=1)  # (N, 2, 3)
        return both[:, sel, np.arange(3)]  # (N, 8, 3)


# Candidate pairs and the nearest hit.

CHUNK = 1 << 14  # (ray, primitive) pairs intersected at once: temporaries stay in cache


@dataclass(frozen=True)
class _RayFree:
    """The terms of each primitive's intersection that do not depend on the ray, for one
    origin: computed once per primitive, gathered per pair."""

    cos: np.ndarray  # (N,) box yaw: world -> box is [[c, s, 0], [-s, c, 0], [0, 0, 1]]
    sin: np.ndarray  # (N,)
    slab_lo: np.ndarray  # (N, 3) box: -half - o, o the origin in the box frame
    slab_hi: np.ndarray  # (N, 3) box: half - o
    rel: np.ndarray  # (N, 3) origin - centre (cylinders: the base centre)
    rel_sq: np.ndarray  # (N,) sphere: |origin - centre|^2 - r^2; cylinder: ox^2 + oy^2 - r^2

    @staticmethod
    def of(origin: np.ndarray, prims: Primitives) -> _RayFree:
        c, s = np.cos(prims.yaw), np.sin(prims.yaw)
        rel = origin - prims.center  # (N, 3)
        o = np.stack([c * rel[:, 0] + s * rel[:, 1], c * rel[:, 1] - s * rel[:, 0], rel[:, 2]], 1)
        r2 = prims.size[:, 0] ** 2
        sphere = prims.kind == KIND_SPHERE
        horizontal = rel[:, 0] ** 2 + rel[:, 1] ** 2
        rel_sq = np.where(sphere, horizontal + rel[:, 2] ** 2, horizontal) - r2
        return _RayFree(c, s, -prims.size - o, prims.size - o, rel, rel_sq)


def _intersect_pairs(
    dirs: np.ndarray, p: np.ndarray, prims: Primitives, free: _RayFree
) -> tuple[np.ndarray, np.ndarray]:
    """t (K,) and normals (K, 3) of K (ray, primitive) pairs: unit ``dirs`` (K, 3) and
    primitive rows ``p`` (K,)."""
    t = np.full(len(dirs), np.inf)
    normal = np.zeros((len(dirs), 3))
    kind = prims.kind[p]
    for k, fn in ((KIND_BOX, _boxes), (KIND_CYLINDER, _cylinders), (KIND_SPHERE, _spheres)):
        rows = np.flatnonzero(kind == k)
        if len(rows):
            t[rows], normal[rows] = fn(dirs[rows], p[rows], prims, free)
    return t, normal


def _boxes(d_w, p, prims, free) -> tuple[np.ndarray, np.ndarray]:
    """Slab test against yaw-rotated boxes, one axis at a time: (K,) arrays only."""
    c, s = free.cos[p], free.sin[p]
    d = (c * d_w[:, 0] + s * d_w[:, 1], c * d_w[:, 1] - s * d_w[:, 0], d_w[:, 2])  # box frame
    t_enter = np.full(len(p), -np.inf)
    t_exit = np.full(len(p), np.inf)
    axis = np.zeros(len(p), np.int8)
    with np.errstate(divide="ignore", invalid="ignore"):
        for a in range(3):
            inv = 1.0 / d[a]
            t1 = free.slab_lo[p, a] * inv
            t2 = free.slab_hi[p, a] * inv
            near = np.minimum(t1, t2)  # NaN (a ray in a slab's plane) never wins
            later = near > t_enter
            t_enter = np.where(later, near, t_enter)
            axis[later] = a
            t_exit = np.fmin(t_exit, np.maximum(t1, t2))
    hit = (t_exit >= t_enter) & (t_enter > EPS)
    sign = -np.sign(np.choose(axis, d))  # the face's normal in the box frame: -sign(d_axis)
    on_x, on_y = axis == 0, axis == 1
    n_w = np.stack(  # box frame -> world: the transposed rotation
        [
            np.where(on_x, c * sign, np.where(on_y, -s * sign, 0.0)),
            np.where(on_x, s * sign, np.where(on_y, c * sign, 0.0)),
            np.where(axis == 2, sign, 0.0),
        ],
        axis=1,
    )
    return np.where(hit, t_enter, np.inf), n_w


def _cylinders(dirs, p, prims, free) -> tuple[np.ndarray, np.ndarray]:
    """Vertical cylinders from their base centre up by their height, with a top cap."""
    radius, height = prims.size[p, 0], prims.size[p, 1]
    ox, oy, oz = free.rel[p, 0], free.rel[p, 1], free.rel[p, 2]  # origin - base
    dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    a = dx * dx + dy * dy
    b = 2.0 * (ox * dx + oy * dy)
    disc = b * b - 4.0 * a * free.rel_sq[p]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
        t_cap = (height - oz) / dz
    z_side = oz + t_side * dz  # above the base
    side_ok = (disc >= 0) & (a > 1e-12) & (t_side > EPS) & (z_side >= 0) & (z_side <= height)
    px, py = ox + t_cap * dx, oy + t_cap * dy
    cap_ok = (dz < 0) & (t_cap > EPS) & (px * px + py * py <= radius * radius)
    t_s = np.where(side_ok, t_side, np.inf)
    t_c = np.where(cap_ok, t_cap, np.inf)
    use_cap = t_c < t_s
    normals = np.stack(
        [
            np.where(use_cap, 0.0, (ox + t_side * dx) / radius),
            np.where(use_cap, 0.0, (oy + t_side * dy) / radius),
            np.where(use_cap, 1.0, 0.0),
        ],
        axis=1,
    )
    return np.minimum(t_s, t_c), normals


def _spheres(dirs, p, prims, free) -> tuple[np.ndarray, np.ndarray]:
    """Spheres; ``dirs`` are unit vectors."""
    oc = free.rel[p]  # (K, 3) origin - centre
    b = np.einsum("kc,kc->k", dirs, oc)
    disc = b * b - free.rel_sq[p]
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    ok = (disc >= 0) & (t > EPS)
    t = np.where(ok, t, np.inf)
    normals = (oc + np.where(ok, t, 0.0)[:, None] * dirs) / prims.size[p, :1]
    return t, normals


@dataclass
class Hits:
    """Nearest hit per ray: distance, primitive row (-1 = ground, -2 = nothing), normal."""

    t: np.ndarray  # (R,)
    prim: np.ndarray  # (R,) int
    normal: np.ndarray  # (R, 3)

    @property
    def point_count(self) -> int:
        return int(np.isfinite(self.t).sum())


def cast(
    origin: np.ndarray,
    dirs: np.ndarray,
    prims: Primitives,
    *,
    max_range: float,
    footprint: Footprint | None = None,
) -> Hits:
    """Nearest intersection of unit rays ``dirs`` (R, 3) from ``origin`` (3,).

    ``footprint(candidates)`` returns the (primitive, ray) pairs to test for the primitive
    rows ``candidates`` (those within ``max_range``); by default ``azimuth_footprint``.
    Ties go to the ground, then to the lower primitive row.
    """
    n = len(dirs)
    t_best = np.full(n, np.inf)
    prim = np.full(n, -2, dtype=np.int64)
    normal = np.zeros((n, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = -origin[2] / dirs[:, 2]
    ground = (dirs[:, 2] < -1e-9) & (t_ground > EPS) & (t_ground <= max_range)
    t_best[ground] = t_ground[ground]
    prim[ground] = -1
    normal[ground] = (0.0, 0.0, 1.0)

    dist = np.linalg.norm(prims.center[:, :2] - origin[:2], axis=1)
    reach = np.linalg.norm(prims.size, axis=1) + max_range
    candidates = np.flatnonzero(dist <= reach)
    if len(candidates) == 0 or n == 0:
        return Hits(t=t_best, prim=prim, normal=normal)
    pair_prim, pair_ray = (footprint or azimuth_footprint(origin, dirs, prims))(candidates)
    free = _RayFree.of(origin, prims)
    # Chunks of pairs small enough for their temporaries to stay in the CPU cache.
    for lo in range(0, len(pair_prim), CHUNK):
        p, r = pair_prim[lo : lo + CHUNK], pair_ray[lo : lo + CHUNK]
        t, nrm = _intersect_pairs(dirs[r], p, prims, free)
        ok = np.flatnonzero(t <= max_range)
        order = ok[np.lexsort((p[ok], t[ok], r[ok]))]  # by ray, distance, primitive row
        first = order[np.r_[True, r[order][1:] != r[order][:-1]]] if len(order) else order
        rf, tf, pf = r[first], t[first], p[first]
        # Nearer wins; a tie goes to the ground (row -1), then to the lower row.
        win = first[(tf < t_best[rf]) | ((tf == t_best[rf]) & (pf < prim[rf]))]
        t_best[r[win]], prim[r[win]], normal[r[win]] = t[win], p[win], nrm[win]
    return Hits(t=t_best, prim=prim, normal=normal)


Footprint = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def expand_ranges(owners: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> tuple:
    """Pairs (owner, index) for index in [start, start + count) of each owner, in order."""
    counts = np.maximum(counts, 0)
    owner = np.repeat(owners, counts)  # (K,)
    offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, np.repeat(starts, counts) + offset


def azimuth_footprint(origin: np.ndarray, dirs: np.ndarray, prims: Primitives) -> Footprint:
    """Pairs of each candidate primitive with the rays whose azimuth (about ``origin``) lies
    in the azimuth range of its bounding box's corners; every ray when ``origin`` is above
    the box. Conservative: a pair that cannot hit is only an extra test."""
    az = np.arctan2(dirs[:, 1], dirs[:, 0])  # (R,)
    order = np.argsort(az, kind="stable")
    az_sorted = az[order]

    def pairs(cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        corners = prims.aabb_corners()[cand, :, :2] - origin[:2]  # (P, 8, 2)
        rel = prims.center[cand, :2] - origin[:2]  # (P, 2)
        mid = np.arctan2(rel[:, 1], rel[:, 0])
        delta = (np.arctan2(corners[..., 1], corners[..., 0]) - mid[:, None] + np.pi) % (
            2 * np.pi
        ) - np.pi  # (P, 8) corner azimuths relative to the centre's, in [-pi, pi)
        lo = mid + delta.min(axis=1) - 1e-6
        hi = mid + delta.max(axis=1) + 1e-6
        inside = np.all(corners.min(axis=1) <= 0, axis=1) & np.all(corners.max(axis=1) >= 0, 1)
        lo[inside], hi[inside] = -np.pi, np.pi
        # An interval past +-pi wraps: split it into [lo, pi] and [-pi, hi - 2 pi] (or the
        # mirror); the first piece is clipped to [-pi, pi].
        spans = [(np.maximum(lo, -np.pi), np.minimum(hi, np.pi), np.ones(len(cand), bool))]
        spans.append((lo + 2 * np.pi, np.full(len(cand), np.pi), lo < -np.pi))
        spans.append((np.full(len(cand), -np.pi), hi - 2 * np.pi, hi > np.pi))
        owners, starts, counts = [], [], []
        for a, b, use in spans:
            s = np.searchsorted(az_sorted, a[use], side="left")
            e = np.searchsorted(az_sorted, b[use], side="right")
            owners.append(np.flatnonzero(use))
            starts.append(s)
            counts.append(e - s)
        owner = np.concatenate(owners)
        keep = np.argsort(owner, kind="stable")  # a primitive's pairs together, in row order
        p, idx = expand_ranges(
            cand[owner[keep]], np.concatenate(starts)[keep], np.concatenate(counts)[keep]
        )
        return p, order[idx]

    return pairs
