"""Sensors of the synthetic world: the datasets' real rigs, a ray-cast LiDAR and ray-cast cameras.

Cameras are rendered at their own timestamps (ego pose and moving objects at camera time),
LiDAR sweeps at the sweep timestamp, as in the real datasets; so projecting a LiDAR point into
an image needs the full lidar -> ego(t_lidar) -> global -> ego(t_cam) -> camera chain, and a
point lands on a pixel of its own object (up to the small motion of moving objects between
the two timestamps). A sweep is instantaneous (no rolling shutter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hilda.datasets.classes import GENERAL_INDEX
from hilda.datasets.synthetic import world as W
from hilda.datasets.synthetic.raycast import Footprint, Hits, Primitives, cast, expand_ranges
from hilda.geometry import apply, make_transform, yaw_matrix


@dataclass(frozen=True)
class CameraSpec:
    name: str
    yaw_deg: float  # optical axis heading in the ego frame (0 = forward, + = left)
    position: tuple[float, float, float]  # in the ego frame
    full_size: tuple[int, int]  # (width, height) of the real sensor
    focal: float  # at full size, pixels
    principal: tuple[float, float]  # at full size
    time_offset_us: int  # camera timestamp minus LiDAR timestamp

    def cam_to_ego(self) -> np.ndarray:
        """Camera frame (x right, y down, z forward) -> ego frame (x forward, y left, z up)."""
        yaw = np.deg2rad(self.yaw_deg)
        forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
        right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
        down = np.array([0.0, 0.0, -1.0])
        return make_transform(np.stack([right, down, forward], axis=1), np.array(self.position))

    def size(self, landscape: tuple[int, int]) -> tuple[int, int]:
        """Rendered (width, height): ``landscape`` for landscape sensors, swapped for portrait."""
        w, h = landscape
        return (w, h) if self.full_size[0] >= self.full_size[1] else (h, w)

    def intrinsics(self, width: int, height: int) -> np.ndarray:
        """(3, 3) K scaled from the full sensor size to (width, height)."""
        sx, sy = width / self.full_size[0], height / self.full_size[1]
        return np.array(
            [
                [self.focal * sx, 0.0, self.principal[0] * sx],
                [0.0, self.focal * sy, self.principal[1] * sy],
                [0.0, 0.0, 1.0],
            ]
        )


@dataclass(frozen=True)
class LidarSpec:
    name: str
    position: tuple[float, float, float]  # in the ego frame
    yaw_deg: float  # sensor x axis heading in the ego frame
    elevations_deg: tuple[float, float]  # lowest and highest beam
    beams: int
    azimuths: int
    max_range: float = 80.0
    range_noise: float = 0.005
    dropout: float = 0.01

    def lidar_to_ego(self) -> np.ndarray:
        return make_transform(yaw_matrix(np.deg2rad(self.yaw_deg)), np.array(self.position))


@dataclass(frozen=True)
class Rig:
    cameras: tuple[CameraSpec, ...]
    lidar: LidarSpec
    keyframe_period_us: int  # time between keyframes
    sweep_period_us: int  # time between LiDAR sweeps


NUSCENES_RIG = Rig(
    # Layout of the nuScenes car: six 1600x900 cameras; each fires as the spinning LiDAR
    # passes its field of view, so camera times trail the sweep time by up to ~45 ms.
    cameras=(
        CameraSpec(
            "CAM_FRONT", 0.0, (1.70, 0.02, 1.51), (1600, 900), 1266.0, (816.0, 491.0), -35_000
        ),
        CameraSpec(
            "CAM_FRONT_RIGHT",
            -55.0,
            (1.55, -0.49, 1.50),
            (1600, 900),
            1260.0,
            (808.0, 495.0),
            -27_000,
        ),
        CameraSpec(
            "CAM_BACK_RIGHT",
            -110.0,
            (1.04, -0.48, 1.56),
            (1600, 900),
            1260.0,
            (808.0, 481.0),
            -20_000,
        ),
        CameraSpec(
            "CAM_BACK", 180.0, (0.03, 0.0, 1.57), (1600, 900), 809.0, (829.0, 481.0), -10_000
        ),
        CameraSpec(
            "CAM_BACK_LEFT", 110.0, (1.04, 0.48, 1.56), (1600, 900), 1256.0, (817.0, 451.0), -500
        ),
        CameraSpec(
            "CAM_FRONT_LEFT", 55.0, (1.52, 0.49, 1.51), (1600, 900), 1272.0, (826.0, 479.0), -43_000
        ),
    ),
    # LIDAR_TOP: a 32-beam spinning LiDAR, x axis pointing to the right of the car.
    lidar=LidarSpec(
        "LIDAR_TOP", (0.94, 0.0, 1.84), -90.0, (-30.67, 10.67), beams=32, azimuths=1084
    ),
    keyframe_period_us=500_000,
    sweep_period_us=50_000,
)

AV2_RIG = Rig(
    # Argoverse 2 ring cameras: ring_front_center is portrait (1550x2048), the others
    # landscape (2048x1550); 20 Hz, synchronised to within a few ms of the LiDAR.
    cameras=(
        CameraSpec(
            "ring_front_center",
            0.0,
            (1.63, 0.0, 1.42),
            (1550, 2048),
            1773.0,
            (775.0, 1024.0),
            2_000,
        ),
        CameraSpec(
            "ring_front_left",
            45.0,
            (1.51, 0.39, 1.42),
            (2048, 1550),
            1773.0,
            (1024.0, 775.0),
            -6_000,
        ),
        CameraSpec(
            "ring_front_right",
            -45.0,
            (1.51, -0.39, 1.42),
            (2048, 1550),
            1773.0,
            (1024.0, 775.0),
            6_000,
        ),
        CameraSpec(
            "ring_side_left",
            99.0,
            (1.05, 0.85, 1.42),
            (2048, 1550),
            1773.0,
            (1024.0, 775.0),
            -12_000,
        ),
        CameraSpec(
            "ring_side_right",
            -99.0,
            (1.05, -0.85, 1.42),
            (2048, 1550),
            1773.0,
            (1024.0, 775.0),
            12_000,
        ),
        CameraSpec(
            "ring_rear_left",
            153.0,
            (0.05, 0.5, 1.42),
            (2048, 1550),
            1773.0,
            (1024.0, 775.0),
            -18_000,
        ),
        CameraSpec(
            "ring_rear_right",
            -153.0,
            (0.05, -0.5, 1.42),
            (2048, 1550),
            1773.0,
            (1024.0, 775.0),
            18_000,
        ),
    ),
    # Two stacked 32-beam LiDARs, merged into one 64-beam sweep in the ego frame.
    lidar=LidarSpec("up_lidar", (1.35, 0.0, 1.95), 0.0, (-25.0, 15.0), beams=64, azimuths=900),
    keyframe_period_us=500_000,
    sweep_period_us=100_000,
)


KITTI_RIG = Rig(
    # The KITTI car's Velodyne HDL-64E (1.73 m above the road, +2 to -24.8 degrees), 10 Hz;
    # SemanticKITTI labels every scan, so every scan is a frame. No cameras are written.
    cameras=(),
    lidar=LidarSpec("velodyne", (0.76, 0.0, 1.73), 0.0, (-24.8, 2.0), beams=64, azimuths=1024),
    keyframe_period_us=100_000,
    sweep_period_us=100_000,
)


@dataclass(frozen=True)
class LidarSweep:
    points: np.ndarray  # (N, 3) float64 in the LiDAR frame
    intensity: np.ndarray  # (N,) float in [0, 255]
    ring: np.ndarray  # (N,) beam index
    label: np.ndarray  # (N,) uint8 general category
    instance: np.ndarray  # (N,) int32 (0 = ground)


@dataclass(frozen=True)
class CameraImage:
    rgb: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) uint8 general category, 0 = sky
    instance: np.ndarray  # (H, W) int32, 0 = ground or sky
    depth: np.ndarray  # (H, W) float, inf = sky


def _hash01(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray) -> np.ndarray:
    h = (ix * 73856093) ^ (iy * 19349663) ^ (iz * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h >> 8) & 0xFFFF).astype(np.float64) / 65535.0


def value_noise(p: np.ndarray, scale: float) -> np.ndarray:
    """Smooth 3D value noise in [0, 1] of (N, 3) points at the given feature size (metres)."""
    q = p / scale
    i = np.floor(q).astype(np.int64)
    f = q - i
    f = f * f * (3 - 2 * f)
    out = np.zeros(len(p))
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                w = (
                    (f[:, 0] if dx else 1 - f[:, 0])
                    * (f[:, 1] if dy else 1 - f[:, 1])
                    * (f[:, 2] if dz else 1 - f[:, 2])
                )
                out += w * _hash01(i[:, 0] + dx, i[:, 1] + dy, i[:, 2] + dz)
    return out


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _style_tables() -> tuple[np.ndarray, np.ndarray]:
    """(256, 3) base colour and (256,) LiDAR reflectivity indexed by general label."""
    colour = np.zeros((256, 3))
    refl = np.full(256, 0.3)
    for name, (rgb, _, r) in W.CLASS_STYLE.items():
        colour[GENERAL_INDEX[name]] = rgb
        refl[GENERAL_INDEX[name]] = r
    return colour, refl


CLASS_COLOUR, CLASS_REFLECTIVITY = _style_tables()


def _ground_albedo(
    world: W.World, gp: np.ndarray, lbl: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Colour (n, 3) and reflectivity (n,) of ground hits ``gp`` of classes ``lbl``: value
    noise, road markings (centre dashes, edge lines) and sidewalk tiles."""
    base = CLASS_COLOUR[lbl]
    r = CLASS_REFLECTIVITY[lbl]
    noise = value_noise(gp, 0.35) * 0.6 + value_noise(gp, 2.0) * 0.4
    mult = 0.75 + 0.45 * noise
    road = lbl == GENERAL_INDEX["flat.driveable_surface"]
    lat = world.road.lateral(gp[:, :2])
    along = world.road.along(gp[:, :2])
    centre_dash = (np.abs(lat) < 0.08) & (_frac(along / 6.0) < 0.5)
    edge_line = np.abs(np.abs(lat) - 3.85) < 0.07
    marks = road & (centre_dash | edge_line)
    side = lbl == GENERAL_INDEX["flat.sidewalk"]
    tiles = side & ((_frac(along / 1.0) < 0.05) | (_frac(lat / 1.0) < 0.05))
    mult[tiles] *= 0.7
    col = base * mult[:, None]
    col[marks] = (0.92, 0.92, 0.88)
    return col, np.where(marks, 0.9, r)


def _object_albedo(
    prims: Primitives, pi: np.ndarray, p: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Colour (n, 3) and reflectivity (n,) of hits ``p`` on primitives ``pi``: by texture
    (facade windows, foliage, bodies with legs, stripes, metal, plain)."""
    base = prims.color[pi].copy()
    tex = prims.texture[pi]
    mult = np.ones(len(pi))
    yaw = prims.yaw[pi]
    facade_u = (
        p[:, 0] * np.cos(yaw)
        + p[:, 1] * np.sin(yaw)
        - p[:, 0] * np.sin(yaw)
        + p[:, 1] * np.cos(yaw)
    )
    win = (tex == W.TEX_FACADE) & (_frac(p[:, 2] / 3.0) > 0.35) & (_frac(p[:, 2] / 3.0) < 0.8)
    win &= (_frac(facade_u / 2.5) > 0.3) & (_frac(facade_u / 2.5) < 0.75)
    base[win] = (0.25, 0.32, 0.42)
    foliage = tex == W.TEX_FOLIAGE
    mult[foliage] = 0.55 + 0.8 * value_noise(p[foliage], 0.25)
    body = tex == W.TEX_BODY
    legs = body & (p[:, 2] < 0.85)
    base[legs] = (0.18, 0.2, 0.35)
    stripes = (tex == W.TEX_STRIPES) & (_frac(p[:, 2] / 0.25) < 0.5)
    base[stripes] = (0.95, 0.95, 0.95)
    metal = tex == W.TEX_METAL
    mult[metal] = 0.85 + 0.3 * value_noise(p[metal], 0.8)
    plain = tex == W.TEX_PLAIN
    mult[plain] = 0.85 + 0.3 * value_noise(p[plain], 0.5)
    r_obj = CLASS_REFLECTIVITY[prims.label[pi]]
    r_obj[win] = 0.1  # glass returns little
    return base * mult[:, None], r_obj


def surface_albedo(
    world: W.World, prims: Primitives, hits: Hits, points: np.ndarray, ground_lbl: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Colour (N, 3) and LiDAR reflectivity (N,) of hit surfaces (rows with a finite hit)."""
    n = len(points)
    rgb = np.zeros((n, 3))
    refl = np.zeros(n)
    ground = hits.prim == -1
    if ground.any():
        rgb[ground], refl[ground] = _ground_albedo(world, points[ground], ground_lbl[ground])
    obj = hits.prim >= 0
    if obj.any():
        rgb[obj], refl[obj] = _object_albedo(prims, hits.prim[obj], points[obj])
    return rgb, refl


SUN = np.array([0.45, 0.3, 0.84]) / np.linalg.norm([0.45, 0.3, 0.84])


def scan_lidar(world: W.World, rig: Rig, t_us: int, rng: np.random.Generator) -> LidarSweep:
    """Ray-cast one sweep at time t; points in the LiDAR frame."""
    spec = rig.lidar
    elev = np.deg2rad(np.linspace(*spec.elevations_deg, spec.beams))  # (B,)
    azim = np.linspace(-np.pi, np.pi, spec.azimuths, endpoint=False)  # (A,)
    ee, aa = np.meshgrid(elev, azim, indexing="ij")  # (B, A)
    dirs_s = np.stack([np.cos(ee) * np.cos(aa), np.cos(ee) * np.sin(aa), np.sin(ee)], -1).reshape(
        -1, 3
    )
    ring = np.repeat(np.arange(spec.beams), spec.azimuths)
    sensor_to_global = world.ego_to_global(t_us) @ spec.lidar_to_ego()
    origin = sensor_to_global[:3, 3]
    dirs_g = dirs_s @ sensor_to_global[:3, :3].T
    prims = world.primitives_at(t_us)
    hits = cast(origin, dirs_g, prims, max_range=spec.max_range)
    keep = np.isfinite(hits.t) & (rng.random(len(hits.t)) >= spec.dropout)
    rng_noise = rng.normal(0.0, spec.range_noise, len(hits.t))
    t = np.where(np.isfinite(hits.t), hits.t + rng_noise, 0.0)
    pts_s = dirs_s * t[:, None]
    pts_g = origin + dirs_g * np.where(np.isfinite(hits.t), hits.t, 0.0)[:, None]
    ground_lbl = W.ground_label(world.road, pts_g[:, :2])
    _, refl = surface_albedo(world, prims, hits, pts_g, ground_lbl)
    cos_inc = np.abs(np.sum(hits.normal * dirs_g, axis=1))
    intensity = np.clip(255.0 * refl * (0.25 + 0.75 * cos_inc) + rng.normal(0, 2.0, len(t)), 0, 255)
    label = np.where(hits.prim == -1, ground_lbl, prims.label[np.maximum(hits.prim, 0)])
    inst = np.where(hits.prim >= 0, prims.instance[np.maximum(hits.prim, 0)], 0)
    return LidarSweep(
        points=pts_s[keep],
        intensity=np.round(intensity[keep]),
        ring=ring[keep],
        label=label[keep].astype(np.uint8),
        instance=inst[keep].astype(np.int32),
    )


# The 12 edges of a box whose 8 corners are indexed by 3 bits (``Primitives.aabb_corners``).
_BOX_EDGES = np.array([(i, i | bit) for i in range(8) for bit in (1, 2, 4) if not i & bit])
_NEAR = 1e-4  # metres: the camera plane a box is clipped at before projecting


def image_footprint(corners_cam: np.ndarray, k: np.ndarray, width: int, height: int) -> Footprint:
    """Pairs of each candidate primitive with the pixels (flat indices) of the rectangle
    around the projection of its bounding box (``corners_cam`` (P, 8, 3), camera frame),
    clipped to the part in front of the camera: the corners in front and the points where
    the box's edges cross the near plane. None for a box behind the camera."""

    def pairs(cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = corners_cam[cand]  # (P, 8, 3)
        a, b = c[:, _BOX_EDGES[:, 0]], c[:, _BOX_EDGES[:, 1]]  # (P, 12, 3) edge ends
        with np.errstate(divide="ignore", invalid="ignore"):
            f = (_NEAR - a[..., 2]) / (b[..., 2] - a[..., 2])  # (P, 12)
            crosses = (f > 0) & (f < 1)
            f = np.where(crosses, f, 0.0)
        pts = np.concatenate([c, a + f[..., None] * (b - a)], axis=1)  # (P, 20, 3)
        valid = np.concatenate([c[..., 2] >= _NEAR, crosses], axis=1)  # (P, 20)
        z = np.maximum(pts[..., 2], _NEAR)
        uv = pts[..., :2] / z[..., None] * [k[0, 0], k[1, 1]] + [k[0, 2], k[1, 2]]
        lo = np.where(valid[..., None], uv, np.inf).min(axis=1)  # (P, 2)
        hi = np.where(valid[..., None], uv, -np.inf).max(axis=1)
        seen = valid.any(axis=1)
        lo, hi = np.where(seen[:, None], lo, 0.0), np.where(seen[:, None], hi, -1.0)
        lo = np.clip(np.floor(lo), 0, [width, height]).astype(np.int64)
        hi = np.clip(np.ceil(hi), -1, [width - 1, height - 1]).astype(np.int64)
        w = np.where(seen & np.all(lo <= hi, axis=1), hi[:, 0] - lo[:, 0] + 1, 0)  # (P,)
        h = hi[:, 1] - lo[:, 1] + 1
        owner, j = expand_ranges(np.arange(len(cand)), np.zeros(len(cand), np.int64), w * h)
        ray = (lo[owner, 1] + j // w[owner]) * width + lo[owner, 0] + j % w[owner]
        return cand[owner], ray

    return pairs


def render_camera(
    world: W.World, cam: CameraSpec, width: int, height: int, t_us: int
) -> CameraImage:
    """Ray-cast one camera image at time t (ego pose and movers at t)."""
    k = cam.intrinsics(width, height)
    cam_to_global = world.ego_to_global(t_us) @ cam.cam_to_ego()
    origin = cam_to_global[:3, 3]
    v, u = np.mgrid[0:height, 0:width]
    pix = np.stack(
        [(u + 0.5 - k[0, 2]) / k[0, 0], (v + 0.5 - k[1, 2]) / k[1, 1], np.ones_like(u, float)], -1
    )
    dirs_c = pix.reshape(-1, 3)
    dirs_c /= np.linalg.norm(dirs_c, axis=1, keepdims=True)
    dirs_g = dirs_c @ cam_to_global[:3, :3].T
    prims = world.primitives_at(t_us)
    corners = prims.aabb_corners().reshape(-1, 3)
    corners_cam = apply(np.linalg.inv(cam_to_global), corners).reshape(-1, 8, 3)
    hits = cast(
        origin, dirs_g, prims, max_range=150.0,
        footprint=image_footprint(corners_cam, k, width, height),
    )  # fmt: skip
    finite = np.isfinite(hits.t)
    pts_g = origin + dirs_g * np.where(finite, hits.t, 0.0)[:, None]
    ground_lbl = W.ground_label(world.road, pts_g[:, :2])
    albedo, _ = surface_albedo(world, prims, hits, pts_g, ground_lbl)
    shade = 0.42 + 0.58 * np.clip(hits.normal @ SUN, 0.0, 1.0)
    fog = np.exp(-np.where(finite, hits.t, 0.0) / 250.0)[:, None]
    sky = np.array([0.55, 0.7, 0.9]) - 0.25 * np.clip(dirs_g[:, 2:3], 0, 1)
    rgb = np.where(finite[:, None], albedo * shade[:, None] * fog + sky * (1 - fog), sky)
    label = np.where(hits.prim == -1, ground_lbl, prims.label[np.maximum(hits.prim, 0)])
    label = np.where(finite, label, 0)
    inst = np.where(hits.prim >= 0, prims.instance[np.maximum(hits.prim, 0)], 0)
    return CameraImage(
        rgb=(np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(height, width, 3),
        label=label.astype(np.uint8).reshape(height, width),
        instance=inst.astype(np.int32).reshape(height, width),
        depth=hits.t.reshape(height, width),
    )
