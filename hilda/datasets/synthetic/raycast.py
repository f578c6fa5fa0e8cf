"""Vectorised ray casting against the synthetic world's primitives.

Primitives are yaw-rotated boxes, vertical cylinders (with a top cap) and spheres, plus an
infinite ground plane z = 0. All rays of one cast share one origin (a LiDAR or a camera
centre), which keeps every intersection a few array operations. Each primitive is tested
only against the rays of its footprint (``select`` callback), so a camera image costs about
one test per pixel per primitive that covers it.
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


def intersect_box(
    origin: np.ndarray, dirs: np.ndarray, center: np.ndarray, half: np.ndarray, yaw: float
) -> tuple[np.ndarray, np.ndarray]:
    """Slab test against a box rotated by ``yaw`` about z. Returns t (R,) and normals (R, 3)."""
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])  # world -> box
    o = rot @ (origin - center)  # (3,)
    d = dirs @ rot.T  # (R, 3)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1 = (-half - o) * inv
        t2 = (half - o) * inv
    tnear = np.minimum(t1, t2)
    tfar = np.maximum(t1, t2)
    tnear = np.nan_to_num(tnear, nan=-np.inf)
    tfar = np.nan_to_num(tfar, nan=np.inf)
    t_enter = tnear.max(axis=1)
    t_exit = tfar.min(axis=1)
    hit = (t_exit >= t_enter) & (t_enter > EPS)
    t = np.where(hit, t_enter, np.inf)
    axis = tnear.argmax(axis=1)
    n_local = np.zeros_like(d)
    n_local[np.arange(len(d)), axis] = -np.sign(d[np.arange(len(d)), axis])
    return t, n_local @ rot  # local -> world is rot.T, applied to row vectors


def intersect_cylinder(
    origin: np.ndarray, dirs: np.ndarray, base: np.ndarray, radius: float, height: float
) -> tuple[np.ndarray, np.ndarray]:
    """Vertical cylinder from ``base`` up by ``height``, with a top cap."""
    ox, oy = origin[0] - base[0], origin[1] - base[1]
    dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    a = dx * dx + dy * dy
    b = 2.0 * (ox * dx + oy * dy)
    cc = ox * ox + oy * oy - radius * radius
    disc = b * b - 4.0 * a * cc
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
    z_side = origin[2] + t_side * dz
    side_ok = (disc >= 0) & (a > 1e-12) & (t_side > EPS) & (z_side >= base[2])
    side_ok &= z_side <= base[2] + height
    top = base[2] + height
    with np.errstate(divide="ignore", invalid="ignore"):
        t_cap = (top - origin[2]) / dz
    px = ox + t_cap * dx
    py = oy + t_cap * dy
    cap_ok = (dz < 0) & (t_cap > EPS) & (px * px + py * py <= radius * radius)
    t_s = np.where(side_ok, t_side, np.inf)
    t_c = np.where(cap_ok, t_cap, np.inf)
    use_cap = t_c < t_s
    t = np.minimum(t_s, t_c)
    normals = np.zeros_like(dirs)
    hx = ox + t_side * dx
    hy = oy + t_side * dy
    normals[:, 0] = np.where(use_cap, 0.0, hx / radius)
    normals[:, 1] = np.where(use_cap, 0.0, hy / radius)
    normals[:, 2] = np.where(use_cap, 1.0, 0.0)
    return t, normals


def intersect_sphere(
    origin: np.ndarray, dirs: np.ndarray, center: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    oc = origin - center
    b = dirs @ oc  # (R,) with |d| = 1
    c = oc @ oc - radius * radius
    disc = b * b - c
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    ok = (disc >= 0) & (t > EPS)
    t = np.where(ok, t, np.inf)
    normals = (origin + np.where(ok, t, 0.0)[:, None] * dirs - center) / radius
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
    select: Callable[[int], np.ndarray | slice | None] | None = None,
) -> Hits:
    """Nearest intersection of unit rays ``dirs`` (R, 3) from ``origin`` (3,).

    ``select(i)`` returns the indices of the rays primitive ``i`` can cover (None to skip
    it); without it every ray is tested against every primitive within ``max_range``.
    """
    n = len(dirs)
    t_best = np.full(n, np.inf)
    prim = np.full(n, -2, dtype=np.int64)
    normal = np.zeros((n, 3))
    # Ground plane z = 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = -origin[2] / dirs[:, 2]
    ground = (dirs[:, 2] < -1e-9) & (t_ground > EPS) & (t_ground <= max_range)
    t_best[ground] = t_ground[ground]
    prim[ground] = -1
    normal[ground] = (0.0, 0.0, 1.0)

    dist = np.linalg.norm(prims.center[:, :2] - origin[:2], axis=1)
    reach = np.linalg.norm(prims.size, axis=1) + max_range
    for i in np.flatnonzero(dist <= reach):
        rays = slice(None) if select is None else select(int(i))
        if rays is None:
            continue
        d = dirs[rays]
        if len(d) == 0:
            continue
        kind = prims.kind[i]
        if kind == KIND_BOX:
            t, nrm = intersect_box(origin, d, prims.center[i], prims.size[i], prims.yaw[i])
        elif kind == KIND_CYLINDER:
            t, nrm = intersect_cylinder(origin, d, prims.center[i], *prims.size[i, :2])
        else:
            t, nrm = intersect_sphere(origin, d, prims.center[i], prims.size[i, 0])
        closer = (t < t_best[rays]) & (t <= max_range)
        if not closer.any():
            continue
        idx = np.arange(n)[rays][closer]
        t_best[idx] = t[closer]
        prim[idx] = i
        normal[idx] = nrm[closer]
    return Hits(t=t_best, prim=prim, normal=normal)
