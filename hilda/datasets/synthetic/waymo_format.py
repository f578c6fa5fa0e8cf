"""The synthetic world in the Waymo Open Dataset v2 layout (``hilda.datasets.waymo``): one
segment per scene, 10 Hz frames, five LiDARs whose range images the ray caster renders pixel
by pixel through the official geometry (the inverse of ``range_image_cartesian``), and the
five segmentation components as parquet files with the official column names and types.

- TOP: non-uniform beam inclinations (denser near the horizon, as the real sensor), a
  rolling shutter: each column fires at its own time, so each pixel has its own vehicle pose
  (``lidar_pose``), which differs from the frame's (``vehicle_pose``); a second return on a
  few pixels; labels (``lidar_segmentation``) on every other frame.
- FRONT, SIDE_LEFT, SIDE_RIGHT, REAR: uniform inclinations (``beam_inclination.values``
  null), extrinsics with yaw and pitch, no per-pixel pose, no labels.

The last scene (of two or more) is the ``validation`` split, the others ``training``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hilda.datasets.classes import GENERAL_INDEX
from hilda.datasets.synthetic.generate import SyntheticConfig, is_val_scene, scene_world
from hilda.datasets.synthetic.raycast import cast
from hilda.datasets.synthetic.render import surface_albedo
from hilda.datasets.synthetic.world import World, ground_label
from hilda.datasets.waymo import (
    CALIBRATION,
    LASER,
    LIDAR,
    PIXEL_POSE,
    RETURNS,
    SEGMENT,
    SEGMENTATION,
    TIMESTAMP,
    TOP,
    VEHICLE_POSE,
    row_inclinations,
)
from hilda.geometry import make_transform, yaw_matrix

FRAME_PERIOD_US = 100_000  # 10 Hz
SPIN_US = 100_000  # one TOP revolution: the columns' firing times span it
START_US = 1_550_000_000_000_000


@dataclass(frozen=True)
class Laser:
    name: int  # LaserName
    position: tuple[float, float, float]  # in the vehicle frame
    yaw_deg: float
    pitch_deg: float
    rows: int
    columns: int
    inclination_deg: tuple[float, float]  # lowest, highest beam
    uniform: bool
    max_range: float


LASERS = (
    Laser(TOP, (1.43, 0.0, 2.18), 148.0, 0.0, 32, 256, (-17.6, 2.4), False, 75.0),
    Laser(2, (4.07, 0.0, 0.69), 0.0, -2.0, 8, 48, (-90.0, 30.0), True, 20.0),  # FRONT
    Laser(3, (3.25, 1.03, 0.98), 90.0, -1.0, 8, 48, (-90.0, 30.0), True, 20.0),  # SIDE_LEFT
    Laser(4, (3.25, -1.03, 0.98), -90.0, -1.0, 8, 48, (-90.0, 30.0), True, 20.0),  # SIDE_RIGHT
    Laser(5, (-1.15, 0.0, 0.47), 180.0, -2.0, 8, 48, (-90.0, 30.0), True, 20.0),  # REAR
)

# The world's classes as Segmentation.Type (segmentation.proto). The world's barriers have
# no Waymo type: TYPE_UNDEFINED (ignored).
TYPES = {
    "flat.driveable_surface": 18,  # TYPE_ROAD
    "flat.sidewalk": 22,  # TYPE_SIDEWALK
    "flat.terrain": 21,  # TYPE_WALKABLE
    "static.manmade": 14,  # TYPE_BUILDING
    "static.vegetation": 15,  # TYPE_VEGETATION
    "vehicle.car": 1,
    "vehicle.truck": 2,
    "human.pedestrian.adult": 7,
    "movable_object.trafficcone": 11,  # TYPE_CONSTRUCTION_CONE
}


def type_lut() -> np.ndarray:
    lut = np.zeros(256, np.int32)
    for name, kind in TYPES.items():
        lut[GENERAL_INDEX[name]] = kind
    return lut


def extrinsic(laser: Laser) -> np.ndarray:
    """(4, 4) sensor -> vehicle: yaw about z, then pitch about the sensor's y."""
    pitch = np.deg2rad(laser.pitch_deg)
    ry = np.array(
        [[np.cos(pitch), 0, np.sin(pitch)], [0, 1, 0], [-np.sin(pitch), 0, np.cos(pitch)]]
    )
    return make_transform(yaw_matrix(np.deg2rad(laser.yaw_deg)) @ ry, np.array(laser.position))


def stored_inclinations(laser: Laser) -> np.ndarray | None:
    """The TOP LiDAR's non-uniform inclinations as stored (ascending, radians); None for a
    uniform LiDAR (min and max only)."""
    if laser.uniform:
        return None
    lo, hi = np.deg2rad(laser.inclination_deg)
    u = np.linspace(0.0, 1.0, laser.rows)
    return lo + (hi - lo) * (1.0 - (1.0 - u) ** 1.7)  # denser towards the top


def sensor_directions(laser: Laser, ext: np.ndarray) -> np.ndarray:
    """(H, W, 3) unit ray of each pixel in the sensor frame, by the official polar formula
    (so that ``range_image_cartesian`` of the cast ranges gives the hit points back)."""
    lo, hi = np.deg2rad(laser.inclination_deg)
    incl = row_inclinations(lo, hi, stored_inclinations(laser), laser.rows)  # (H,)
    w = laser.columns
    az_correction = np.arctan2(ext[1, 0], ext[0, 0])
    azimuth = ((np.arange(w, 0, -1) - 0.5) / w * 2.0 - 1.0) * np.pi - az_correction  # (W,)
    ci, si = np.cos(incl)[:, None], np.sin(incl)[:, None]
    return np.stack(
        [np.cos(azimuth) * ci, np.sin(azimuth) * ci, np.broadcast_to(si, (laser.rows, w))], -1
    )


def pose_rpy(transform: np.ndarray) -> np.ndarray:
    """(6,) roll, pitch, yaw, x, y, z of a rigid (4, 4) (``Rz Ry Rx``, as the reader's)."""
    r = transform[:3, :3]
    pitch = -np.arcsin(np.clip(r[2, 0], -1.0, 1.0))
    roll, yaw = np.arctan2(r[2, 1], r[2, 2]), np.arctan2(r[1, 0], r[0, 0])
    return np.array([roll, pitch, yaw, *transform[:3, 3]])


@dataclass
class Render:
    image: np.ndarray  # (H, W, 4) float32 range, intensity, elongation, no-label-zone
    label: np.ndarray  # (H, W, 2) int32 instance, Segmentation.Type
    pixel_pose: np.ndarray | None  # (H, W, 6) float32


def render(world: World, laser: Laser, t_us: int, rng: np.random.Generator, lut) -> Render:
    """One LiDAR's first-return range image at frame time ``t_us``: the TOP LiDAR's columns
    each cast from the vehicle pose at their own firing time, the others from the frame's."""
    ext = extrinsic(laser)
    dirs_s = sensor_directions(laser, ext)  # (H, W, 3)
    h, w = laser.rows, laser.columns
    image = np.zeros((h, w, 4), np.float32)
    image[..., 3] = -1.0
    label = np.zeros((h, w, 2), np.int32)
    pose = np.zeros((h, w, 6), np.float32) if laser.name == TOP else None
    prims = world.primitives_at(t_us)
    # The TOP LiDAR spins over the frame: column j fires at its own time.
    groups = [[j] for j in range(w)] if laser.name == TOP else [list(range(w))]
    for cols in groups:
        t = t_us + round((cols[0] / w - 0.5) * SPIN_US) if laser.name == TOP else t_us
        vehicle = world.ego_to_global(t)
        sensor_to_global = vehicle @ ext
        d = dirs_s[:, cols].reshape(-1, 3) @ sensor_to_global[:3, :3].T  # (n, 3) world
        origin = sensor_to_global[:3, 3]
        hits = cast(origin, d, prims, max_range=laser.max_range)
        ok = np.isfinite(hits.t) & (rng.random(len(hits.t)) >= 0.01)
        pts = origin + d * np.where(ok, hits.t, 0.0)[:, None]
        ground = ground_label(world.road, pts[:, :2])
        _, refl = surface_albedo(world, prims, hits, pts, ground)
        general = np.where(hits.prim == -1, ground, prims.label[np.maximum(hits.prim, 0)])
        inst = np.where(hits.prim >= 0, prims.instance[np.maximum(hits.prim, 0)], 0)
        block = (slice(None), cols)
        image[(*block, 0)] = np.where(ok, hits.t, 0.0).reshape(h, len(cols))
        image[(*block, 1)] = np.where(ok, 0.02 + 1.2 * refl, 0.0).reshape(h, len(cols))
        label[(*block, 0)] = np.where(ok, inst, 0).reshape(h, len(cols))
        label[(*block, 1)] = np.where(ok, lut[general], 0).reshape(h, len(cols))
        if pose is not None:
            pose[:, cols] = pose_rpy(vehicle)
    return Render(image, label, pose)


def second_return(first: Render, rng: np.random.Generator, share: float) -> Render:
    """A second return on ``share`` of the hit pixels, 0.15 m behind the first, same label."""
    image, label = np.zeros_like(first.image), np.zeros_like(first.label)
    image[..., 3] = -1.0
    pick = (first.image[..., 0] > 0) & (rng.random(first.image.shape[:2]) < share)
    image[pick, 0] = first.image[pick, 0] + 0.15
    image[pick, 1] = 0.5 * first.image[pick, 1]
    label[pick] = first.label[pick]
    return Render(image, label, None)


def segment_name(seed: int, scene: int) -> str:
    """A name of the real ones' form, ``<20 digits>_<start>_000_<end>_000``."""
    digits = f"{(seed * 7_919_000_003 + scene * 104_729 + 10**19) % 10**20:020d}"
    return f"{digits}_{20 * scene:04d}_000_{20 * scene + 20:04d}_000"


def write_waymo(cfg: SyntheticConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Write ``cfg.scenes`` segments of ``cfg.frames_per_scene`` frames under ``cfg.out``;
    returns what was written."""
    counts = {"segments": 0, "frames": 0, "labelled": 0, "points": 0}
    lut = type_lut()
    for si in range(cfg.scenes):
        split = "validation" if is_val_scene(si, cfg.scenes) else "training"
        name = segment_name(cfg.seed, si)
        start = START_US + si * 3_600_000_000
        world = scene_world(cfg, si, start)
        rng = np.random.default_rng([cfg.seed, si, 23])
        tables = _segment_tables(cfg, world, name, start, rng, lut, counts, progress)
        for component, table in tables.items():
            path = Path(cfg.out) / split / component / f"{name}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            table.write(path)
        counts["segments"] += 1
    return counts


@dataclass
class _Table:
    """Rows of one component and their arrow schema; one row group a frame."""

    schema: object
    rows: list[dict]
    rows_per_group: int

    def write(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {f.name: [r[f.name] for r in self.rows] for f in self.schema}
        table = pa.table(
            {k: pa.array(v, type=self.schema.field(k).type) for k, v in columns.items()}
        )
        pq.write_table(table, path, row_group_size=max(1, self.rows_per_group))


def _schemas():
    import pyarrow as pa

    key = [(SEGMENT, pa.string()), (TIMESTAMP, pa.int64())]
    laser = [(LASER, pa.int8())]
    image = lambda prefix, value: [  # noqa: E731 (one line a range image column pair)
        (f"{prefix}.values", pa.list_(value)),
        (f"{prefix}.shape", pa.list_(pa.int32(), 3)),
    ]
    lidar = key + laser + image(f"{LIDAR}.{RETURNS[0]}", pa.float32())
    lidar += image(f"{LIDAR}.{RETURNS[1]}", pa.float32())
    seg = key + laser + image(f"{SEGMENTATION}.{RETURNS[0]}", pa.int32())
    seg += image(f"{SEGMENTATION}.{RETURNS[1]}", pa.int32())
    return {
        "lidar": pa.schema(lidar),
        "lidar_pose": pa.schema(key + laser + image(f"{PIXEL_POSE}.{RETURNS[0]}", pa.float32())),
        "lidar_segmentation": pa.schema(seg),
        # As Waymo's own files: a fixed-size list of 16 float32 (v2 testdata vehicle_pose).
        "vehicle_pose": pa.schema(
            [*key, (f"{VEHICLE_POSE}.world_from_vehicle.transform", pa.list_(pa.float32(), 16))]
        ),
        "lidar_calibration": pa.schema(
            [
                (SEGMENT, pa.string()),
                (LASER, pa.int8()),
                (f"{CALIBRATION}.extrinsic.transform", pa.list_(pa.float64(), 16)),
                (f"{CALIBRATION}.beam_inclination.min", pa.float64()),
                (f"{CALIBRATION}.beam_inclination.max", pa.float64()),
                (f"{CALIBRATION}.beam_inclination.values", pa.list_(pa.float64())),
            ]
        ),
    }


def _segment_tables(cfg, world, name, start, rng, lut, counts, progress) -> dict[str, _Table]:
    schemas = _schemas()
    rows: dict[str, list[dict]] = {k: [] for k in schemas}
    for laser in LASERS:
        lo, hi = np.deg2rad(laser.inclination_deg)
        values = stored_inclinations(laser)
        rows["lidar_calibration"].append(
            {
                SEGMENT: name,
                LASER: laser.name,
                f"{CALIBRATION}.extrinsic.transform": extrinsic(laser).reshape(-1).tolist(),
                f"{CALIBRATION}.beam_inclination.min": float(lo),
                f"{CALIBRATION}.beam_inclination.max": float(hi),
                f"{CALIBRATION}.beam_inclination.values": None
                if values is None
                else values.tolist(),
            }
        )
    for k in range(cfg.frames_per_scene):
        t = start + k * FRAME_PERIOD_US
        key = {SEGMENT: name, TIMESTAMP: t}
        pose = world.ego_to_global(t).astype(np.float32)
        rows["vehicle_pose"].append(
            {**key, f"{VEHICLE_POSE}.world_from_vehicle.transform": pose.reshape(-1).tolist()}
        )
        labelled = k % 2 == 0
        for laser in LASERS:
            first = render(world, laser, t, rng, lut)
            # As in Waymo's files, every LiDAR has both returns (a second return's range is 0
            # where there is none); here only TOP has any.
            second = second_return(first, rng, 0.02 if laser.name == TOP else 0.0)
            row = {**key, LASER: laser.name}
            for ret, r in zip(RETURNS, (first, second), strict=True):
                row[f"{LIDAR}.{ret}.values"] = r.image.reshape(-1).tolist()
                row[f"{LIDAR}.{ret}.shape"] = list(r.image.shape)
            rows["lidar"].append(row)
            counts["points"] += int((first.image[..., 0] > 0).sum())
            if first.pixel_pose is not None:
                prefix = f"{PIXEL_POSE}.{RETURNS[0]}"
                values = first.pixel_pose.reshape(-1).tolist()
                shape = list(first.pixel_pose.shape)
                rows["lidar_pose"].append(
                    {**key, LASER: laser.name, f"{prefix}.values": values, f"{prefix}.shape": shape}
                )
            if labelled and laser.name == TOP:
                seg = {**key, LASER: laser.name}
                for ret, r in zip(RETURNS, (first, second), strict=True):
                    seg[f"{SEGMENTATION}.{ret}.values"] = r.label.reshape(-1).tolist()
                    seg[f"{SEGMENTATION}.{ret}.shape"] = list(r.label.shape)
                rows["lidar_segmentation"].append(seg)
        counts["frames"] += 1
        counts["labelled"] += labelled
        if progress:
            progress(f"segment {name} frame {k + 1}/{cfg.frames_per_scene}")
    per_frame = {"lidar": len(LASERS), "lidar_pose": 1, "lidar_segmentation": 1, "vehicle_pose": 1}
    return {c: _Table(schemas[c], rows[c], per_frame.get(c, len(LASERS))) for c in schemas}
