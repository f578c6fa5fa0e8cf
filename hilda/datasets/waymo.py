"""The Waymo Open Dataset, v2 release (Apache Parquet, no TensorFlow), for LiDAR segmentation.

Layout (waymo-open-dataset ``v2/``; the minimum set for segmentation, issue 825 there): one
file per segment and component,

    ROOT/<split>/<component>/<segment>.parquet      split: training | validation

with the components ``lidar`` (range images), ``lidar_calibration`` (extrinsic, beam
inclinations), ``lidar_pose`` (the TOP LiDAR's per-pixel vehicle pose), ``lidar_segmentation``
(TOP labels, on about every 5th frame in the middle of a segment) and ``vehicle_pose`` (the
frame's vehicle pose), joined on ``key.segment_context_name``, ``key.frame_timestamp_micros``
and ``key.laser_name``. Columns are named ``[ComponentName].field.sub``; a range image is
a flat ``values`` list plus its ``shape`` (row-major). Column names and types follow
``v2/perception/{lidar,context,pose,segmentation}.py`` and the component schema of
``v2/component.py``.

``range_image_points`` is the official conversion (``utils/range_image_utils.py``
``compute_range_image_polar`` / ``compute_range_image_cartesian``, ``v2/perception/utils/
lidar_utils.py convert_range_image_to_point_cloud``) in numpy, vectorised over the image:
the stored beam inclinations (or ``compute_inclination``'s uniform ones) reversed so row 0 is
the highest beam; the azimuth of column j ``((W - j - 0.5) / W * 2 - 1) * pi`` minus the
extrinsic's yaw; Cartesian points through the extrinsic; for the TOP LiDAR each pixel's own
vehicle pose (roll, pitch, yaw, x, y, z: ``Rz(yaw) Ry(pitch) Rx(roll)``) into the world, then
into the frame's vehicle frame; the pixels of range > 0, row-major.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hilda.datasets.io import DatasetError

SPLITS = ("training", "validation")
COMPONENTS = ("lidar", "lidar_calibration", "lidar_pose", "lidar_segmentation", "vehicle_pose")
LASERS = {1: "TOP", 2: "FRONT", 3: "SIDE_LEFT", 4: "SIDE_RIGHT", 5: "REAR"}  # LaserName
TOP = 1

SEGMENT = "key.segment_context_name"
TIMESTAMP = "key.frame_timestamp_micros"
LASER = "key.laser_name"
# Column prefixes: the component dataclass names of v2/perception.
LIDAR = "[LiDARComponent]"
CALIBRATION = "[LiDARCalibrationComponent]"
PIXEL_POSE = "[LiDARPoseComponent]"
SEGMENTATION = "[LiDARSegmentationLabelComponent]"
VEHICLE_POSE = "[VehiclePoseComponent]"
RETURNS = ("range_image_return1", "range_image_return2")

# protos/segmentation.proto, Segmentation.Type 1..22 (0 = TYPE_UNDEFINED, ignored).
CLASSES = (
    "car", "truck", "bus", "other-vehicle", "motorcyclist", "bicyclist", "pedestrian",
    "sign", "traffic-light", "pole", "construction-cone", "bicycle", "motorcycle",
    "building", "vegetation", "tree-trunk", "curb", "road", "lane-marker", "other-ground",
    "walkable", "sidewalk",
)  # fmt: skip
NUM_TYPES = len(CLASSES) + 1


# -- the official conversion, pure numpy -----------------------------------------------------


def compute_inclination(lo: float, hi: float, height: int) -> np.ndarray:
    """(H,) uniform beam inclinations from ``lo`` to ``hi``, row 0 the lowest (the official
    ``compute_inclination``: pixel centres)."""
    return (0.5 + np.arange(height, dtype=np.float64)) / height * (hi - lo) + lo


def row_inclinations(
    lo: float, hi: float, values: Sequence[float] | None, height: int
) -> np.ndarray:
    """(H,) inclination of each range image row, row 0 the highest beam: the stored
    (non-uniform) values when given, else uniform, then reversed (as the official code)."""
    incl = np.asarray(values, np.float64) if values is not None else None
    if incl is None:
        incl = compute_inclination(lo, hi, height)
    return incl[::-1]


def rotation_rpy(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """(..., 3, 3) ``Rz(yaw) @ Ry(pitch) @ Rx(roll)`` (``transform_utils.get_rotation_matrix``)."""
    cr, sr, cp, sp, cy, sy = (f(a) for a in (roll, pitch, yaw) for f in (np.cos, np.sin))
    row0 = np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], -1)
    row1 = np.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], -1)
    row2 = np.stack([-sp, cp * sr, cp * cr], -1)
    return np.stack([row0, row1, row2], -2)


def range_image_cartesian(
    ranges: np.ndarray,
    extrinsic: np.ndarray,
    inclination: np.ndarray,
    pixel_pose: np.ndarray | None = None,
    frame_pose: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W, 3) points of a range image (``ranges`` (H, W), metres) in the vehicle frame.

    ``inclination`` (H,) is per row with row 0 the highest (``row_inclinations``);
    ``pixel_pose`` (H, W, 6) roll, pitch, yaw, x, y, z of each pixel's vehicle pose in the
    world, with ``frame_pose`` (4, 4) the frame's world_from_vehicle (the TOP LiDAR)."""
    width = ranges.shape[1]
    az_correction = math.atan2(extrinsic[1, 0], extrinsic[0, 0])
    ratios = (np.arange(width, 0, -1, dtype=np.float64) - 0.5) / width  # (W,)
    azimuth = (ratios * 2.0 - 1.0) * np.pi - az_correction  # (W,)
    cos_incl, sin_incl = np.cos(inclination)[:, None], np.sin(inclination)[:, None]  # (H, 1)
    r = ranges.astype(np.float64)
    points = np.stack(
        [np.cos(azimuth) * cos_incl * r, np.sin(azimuth) * cos_incl * r, sin_incl * r], -1
    )  # (H, W, 3) in the sensor frame
    points = points @ extrinsic[:3, :3].T + extrinsic[:3, 3]  # vehicle frame
    if pixel_pose is not None:
        if frame_pose is None:
            raise ValueError("frame_pose must be given with pixel_pose")
        rot = rotation_rpy(pixel_pose[..., 0], pixel_pose[..., 1], pixel_pose[..., 2])
        points = np.einsum("hwij,hwj->hwi", rot, points) + pixel_pose[..., 3:6]  # world
        world_to_vehicle = np.linalg.inv(frame_pose)
        points = points @ world_to_vehicle[:3, :3].T + world_to_vehicle[:3, 3]
    return points


def range_image_points(
    image: np.ndarray,
    extrinsic: np.ndarray,
    inclination: np.ndarray,
    pixel_pose: np.ndarray | None = None,
    frame_pose: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, 3) of the pixels with range > 0, row-major, and their (N,) flat pixel
    indices (``convert_range_image_to_point_cloud``). ``image`` (H, W, C): channel 0 range."""
    xyz = range_image_cartesian(image[..., 0], extrinsic, inclination, pixel_pose, frame_pose)
    pixels = np.flatnonzero(image[..., 0].reshape(-1) > 0)
    return xyz.reshape(-1, 3)[pixels], pixels


def intensity_feature(raw: np.ndarray) -> np.ndarray:
    """Waymo's intensities (unbounded, mostly below 1, a long tail on retro-reflectors) on a
    0-1 scale: ``tanh``, as Pointcept's Waymo preparation does, so a few reflectors do not
    stretch the scale the way a linear rescaling would."""
    return np.tanh(raw.astype(np.float32))


# -- the parquet I/O edge -------------------------------------------------------------------


@dataclass(frozen=True)
class FrameId:
    segment: str
    timestamp: int

    @property
    def token(self) -> str:
        return f"{self.segment}/{self.timestamp}"

    @classmethod
    def parse(cls, token: str) -> FrameId:
        segment, _, stamp = token.rpartition("/")
        return cls(segment, int(stamp))


def component_file(root: str | os.PathLike, split: str, component: str, segment: str) -> Path:
    return Path(root) / split / component / f"{segment}.parquet"


def segments(root: str | os.PathLike, split: str) -> list[str]:
    """The split's segments (sorted), each with every component's file; a segment missing
    one is an error naming it and the component."""
    folder = Path(root) / split
    if not (folder / "lidar").is_dir():
        raise DatasetError(
            f"{folder}/lidar is not a folder: a Waymo v2 split holds one folder per component "
            f"({', '.join(COMPONENTS)}) of <segment>.parquet files"
        )
    names = sorted(p.stem for p in (folder / "lidar").glob("*.parquet"))
    if not names:
        raise DatasetError(f"{folder}/lidar holds no <segment>.parquet file")
    for name in names:
        for component in COMPONENTS:
            if not component_file(root, split, component, name).is_file():
                raise DatasetError(
                    f"Waymo segment {name} ({split}) has no {component} component "
                    f"({component_file(root, split, component, name)} is missing)"
                )
    return names


class ComponentFile:
    """One component file of one segment: its key columns read once, and any row read by
    decoding only the row group that holds it."""

    def __init__(self, path: Path, component: str) -> None:
        import pyarrow.parquet as pq

        self.path, self.component = path, component
        try:
            self._file = pq.ParquetFile(path)
            names = set(self._file.schema_arrow.names)
            keys = [k for k in (SEGMENT, TIMESTAMP, LASER) if k in names]
            table = self._file.read(columns=keys)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DatasetError(f"{path}: not a readable parquet file ({exc})") from None
        self.columns = names
        stamps = table.column(TIMESTAMP).to_numpy() if TIMESTAMP in keys else None
        lasers = table.column(LASER).to_numpy() if LASER in keys else None
        meta = self._file.metadata
        sizes = [meta.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._rows: dict[tuple[int, int], int] = {}
        self._last: tuple[tuple | None, object] = (None, None)  # the last decoded row group
        for row in range(table.num_rows):
            key = (
                int(stamps[row]) if stamps is not None else -1,
                int(lasers[row]) if lasers is not None else -1,
            )
            self._rows[key] = row

    def has(self, timestamp: int = -1, laser: int = -1) -> bool:
        return (timestamp, laser) in self._rows

    def keys(self) -> list[tuple[int, int]]:
        return sorted(self._rows)

    def row(self, timestamp: int, laser: int, columns: Sequence[str], what: str) -> dict:
        """The named columns of the row of (timestamp, laser) (-1: not a key of this
        component), as Python values; an error naming segment, timestamp and component when
        the row is missing or lacks a column."""
        if (timestamp, laser) not in self._rows:
            raise DatasetError(f"{what}: no {self.component} row ({self.path})")
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise DatasetError(f"{what}: {self.path} has no column {missing[0]!r}")
        row = self._rows[(timestamp, laser)]
        group = int(np.searchsorted(self._starts, row, side="right") - 1)
        key = (group, tuple(columns))
        if self._last[0] != key:  # a frame's LiDARs share a row group: decode it once
            self._last = (key, self._file.read_row_group(group, columns=list(columns)))
        table = self._last[1]
        local = row - int(self._starts[group])
        return {c: _value(table.column(c)[local]) for c in columns}


def open_component(path: str, component: str) -> ComponentFile:
    """A component file, opened once per process (a loader worker reads many frames of a
    segment; a forked worker opens its own, not its parent's handle)."""
    return _open_component(path, component, os.getpid())


def forget_open_files() -> None:
    """Drop the opened component files (after a file was rewritten in place)."""
    _open_component.cache_clear()


def _value(scalar: Any) -> Any:
    """A cell as numpy (a list: a range image's values, a transform) or Python (a scalar):
    a range image through Python floats would cost more than the whole conversion."""
    if hasattr(scalar, "values") and hasattr(scalar, "is_valid"):  # a list scalar
        return scalar.values.to_numpy(zero_copy_only=False) if scalar.is_valid else None
    return scalar.as_py()


@functools.lru_cache(maxsize=64)
def _open_component(path: str, component: str, pid: int) -> ComponentFile:
    return ComponentFile(Path(path), component)


@dataclass(frozen=True)
class Segment:
    """The five component files of one segment of a split."""

    root: str
    split: str
    name: str

    def component(self, component: str) -> ComponentFile:
        path = component_file(self.root, self.split, component, self.name)
        return open_component(str(path), component)

    def frames(self) -> list[int]:
        """Every frame's timestamp (the TOP LiDAR's rows), sorted."""
        return sorted({t for t, laser in self.component("lidar").keys() if laser == TOP})

    def labelled(self) -> list[int]:
        """The timestamps of the frames with TOP segmentation labels, sorted."""
        keys = self.component("lidar_segmentation").keys()
        return sorted({t for t, laser in keys if laser == TOP})


def _image(value: dict | None, prefix: str, what: str, dtype: type) -> np.ndarray | None:
    """A range image column pair (``values``, ``shape``) as an (H, W, C) array (None when
    the return is absent); values that do not fill their shape are an error."""
    values = value.get(f"{prefix}.values") if value else None
    if values is None:
        return None
    shape = value.get(f"{prefix}.shape")
    if shape is None or len(shape) != 3:
        raise DatasetError(f"{what}: {prefix}.shape is {shape!r}, expected [H, W, C]")
    if len(values) != math.prod(shape):
        raise DatasetError(
            f"{what}: {prefix} holds {len(values)} values for shape {list(shape)} "
            f"({math.prod(shape)} expected)"
        )
    return np.asarray(values, dtype=dtype).reshape(shape)


def _transform(values: Sequence[float] | None, what: str, column: str) -> np.ndarray:
    if values is None or len(values) != 16:
        raise DatasetError(f"{what}: {column} is not a 4x4 transform ({values!r})")
    matrix = np.asarray(values, np.float64).reshape(4, 4)  # row-major
    if not np.isfinite(matrix).all():
        raise DatasetError(f"{what}: {column} holds NaN or inf")
    return matrix


def vehicle_poses(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """Every frame's (4, 4) world_from_vehicle of a ``vehicle_pose`` file, by timestamp."""
    import pyarrow.parquet as pq

    column = f"{VEHICLE_POSE}.world_from_vehicle.transform"
    try:
        table = pq.read_table(path, columns=[TIMESTAMP, column])
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"{path}: no {TIMESTAMP} / {column} ({exc})") from None
    stamps = table.column(TIMESTAMP).to_numpy()
    values = table.column(column).to_pylist()
    return {
        int(t): _transform(v, f"{path} frame {int(t)}", column)
        for t, v in zip(stamps, values, strict=True)
    }


@dataclass(frozen=True)
class LidarScan:
    """Every LiDAR's points of one frame (both returns), in the frame's vehicle frame."""

    points: np.ndarray  # (N, 4) float32 x, y, z, tanh(intensity)
    labels: np.ndarray  # (N,) int64 Segmentation.Type (0..22) of TOP points, -1 elsewhere
    laser: np.ndarray  # (N,) int8 LaserName of each point
    echo: np.ndarray  # (N,) int8 its return: 1 or 2


def read_frame(segment: Segment, timestamp: int, labelled: bool = True) -> LidarScan:
    """Every LiDAR and both returns of one frame, with the TOP LiDAR's labels (when
    ``labelled``: the frame must have them)."""
    frame = FrameId(segment.name, timestamp)
    what = f"Waymo frame {frame.token} ({segment.split})"
    pose_col = f"{VEHICLE_POSE}.world_from_vehicle.transform"
    frame_pose = _transform(
        segment.component("vehicle_pose").row(timestamp, -1, [pose_col], what)[pose_col],
        what,
        pose_col,
    )
    lidar = segment.component("lidar")
    parts, labels, lasers, echoes = [], [], [], []
    for laser in sorted(LASERS):
        if not lidar.has(timestamp, laser):
            continue
        where = f"{what}, {LASERS[laser]} LiDAR"
        extrinsic, incl_of = _calibration(segment, laser, where)
        columns = [f"{LIDAR}.{r}.{part}" for r in RETURNS for part in ("values", "shape")]
        row = lidar.row(timestamp, laser, [c for c in columns if c in lidar.columns], where)
        pixel_pose = _pixel_pose(segment, timestamp, where) if laser == TOP else None
        seg = _segmentation(segment, timestamp, where) if labelled and laser == TOP else None
        for k, ret in enumerate(RETURNS):
            image = _image(row, f"{LIDAR}.{ret}", where, np.float32)
            if image is None:
                continue
            if pixel_pose is not None and pixel_pose.shape[:2] != image.shape[:2]:
                raise DatasetError(
                    f"{where}: lidar_pose is {list(pixel_pose.shape[:2])} pixels, the range "
                    f"image {list(image.shape[:2])}"
                )
            xyz, pixels = range_image_points(
                image, extrinsic, incl_of(image.shape[0]), pixel_pose,
                frame_pose if pixel_pose is not None else None,
            )  # fmt: skip
            feature = intensity_feature(image[..., 1].reshape(-1)[pixels])
            parts.append(np.column_stack([xyz.astype(np.float32), feature]))
            lasers.append(np.full(len(pixels), laser, np.int8))
            echoes.append(np.full(len(pixels), k + 1, np.int8))
            labels.append(_point_labels(seg, k, image.shape, pixels, where))
    if not parts:
        raise DatasetError(f"{what}: no LiDAR range image")
    return LidarScan(*(np.concatenate(x) for x in (parts, labels, lasers, echoes)))


def _calibration(segment: Segment, laser: int, where: str):
    cal = segment.component("lidar_calibration")
    cols = [
        f"{CALIBRATION}.extrinsic.transform",
        f"{CALIBRATION}.beam_inclination.min",
        f"{CALIBRATION}.beam_inclination.max",
    ]
    values_col = f"{CALIBRATION}.beam_inclination.values"
    if values_col in cal.columns:
        cols.append(values_col)
    row = cal.row(-1, laser, cols, where)
    extrinsic = _transform(row[cols[0]], where, cols[0])
    lo, hi, values = row[cols[1]], row[cols[2]], row.get(values_col)

    def incl_of(height: int) -> np.ndarray:
        if values is not None and len(values) != height:
            raise DatasetError(
                f"{where}: {len(values)} beam inclinations for a range image of {height} rows"
            )
        if values is None and (lo is None or hi is None):
            raise DatasetError(f"{where}: lidar_calibration has no beam inclination")
        return row_inclinations(lo, hi, values, height)

    return extrinsic, incl_of


def _pixel_pose(segment: Segment, timestamp: int, where: str) -> np.ndarray:
    prefix = f"{PIXEL_POSE}.{RETURNS[0]}"
    row = segment.component("lidar_pose").row(
        timestamp, TOP, [f"{prefix}.values", f"{prefix}.shape"], where
    )
    pose = _image(row, prefix, where, np.float64)
    if pose is None or pose.shape[-1] != 6:
        raise DatasetError(f"{where}: lidar_pose is not an [H, W, 6] image")
    return pose


def _segmentation(segment: Segment, timestamp: int, where: str) -> dict:
    comp = segment.component("lidar_segmentation")
    cols = [f"{SEGMENTATION}.{r}.{part}" for r in RETURNS for part in ("values", "shape")]
    return comp.row(timestamp, TOP, [c for c in cols if c in comp.columns], where)


def _point_labels(
    seg: dict | None, k: int, shape: tuple[int, ...], pixels: np.ndarray, where: str
) -> np.ndarray:
    """(N,) Segmentation.Type of each point of return ``k`` (-1 without labels)."""
    if seg is None:
        return np.full(len(pixels), -1, np.int64)
    label = _image(seg, f"{SEGMENTATION}.{RETURNS[k]}", where, np.int64)
    if label is None:
        raise DatasetError(f"{where}: no lidar_segmentation labels of {RETURNS[k]}")
    if label.shape[:2] != tuple(shape[:2]) or label.shape[-1] != 2:
        raise DatasetError(
            f"{where}: the {RETURNS[k]} label image is {list(label.shape)}, its range image "
            f"{list(shape[:2])} (labels [H, W, 2]: instance, semantic class)"
        )
    semantic = label[..., 1].reshape(-1)[pixels]
    bad = (semantic < 0) | (semantic >= NUM_TYPES)
    if bad.any():
        raise DatasetError(
            f"{where}: semantic class {int(semantic[bad][0])} is outside the proto's "
            f"0..{NUM_TYPES - 1}"
        )
    return semantic
