"""Reading the raw sensor files of a ``Frame``: sweeps, per-point labels and images.

Bad files raise ``DatasetError`` naming the file (and frame, when given) instead of a
traceback from deep inside numpy, pyarrow or PIL.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hilda.errors import HildaError

NUSCENES_POINT_DIMS = 5  # x, y, z, intensity, ring index (float32)
MAX_RING = 128  # ring indices are beam numbers: nuScenes' 32, the densest spinning LiDARs 128
MAX_RANGE_M = 1000.0  # no automotive LiDAR returns from farther
# The synthetic world's per-pixel classes (general-category index, 0 = sky) are a PNG beside
# each camera image: ``<image stem>.classes.png``. Real datasets have none.
CLASS_MAP_SUFFIX = ".classes.png"


class DatasetError(HildaError):
    """A dataset file or record is missing or malformed; the message names it."""


def _where(path: str | os.PathLike, frame: str | None) -> str:
    return f"{path}" + (f" (frame {frame})" if frame else "")


def dataset_path(root: str | os.PathLike, relative: str, table: str, token: str) -> str:
    """``root``/``relative`` for a file name read from a dataset's table, refused when the
    name leads outside the root (an absolute path, ``..``): an error naming the table and the
    record's token. The check is on the path as written, so sub-folders that are symlinks to
    other disks (a common dataset set-up) stay usable."""
    base = os.path.normpath(os.fspath(root))
    path = os.path.normpath(os.path.join(base, relative))
    # A prefix test on normalised paths (commonpath costs 10x more; this runs for every file
    # of every keyframe a reader builds: 8 a nuScenes keyframe).
    inside = path.startswith(base.rstrip(os.sep) + os.sep) and path != base
    if os.path.isabs(relative) or not inside:
        raise DatasetError(
            f"{table} record {token}: file name {relative!r} leads outside the dataset root "
            f"{os.fspath(root)}"
        )
    return path


def require_file(path: str | os.PathLike, what: str, frame: str | None = None) -> None:
    if not os.path.isfile(path):
        raise DatasetError(f"missing {what}: {_where(path, frame)}")


def _check_points(points: np.ndarray, path: str | os.PathLike, frame: str | None) -> np.ndarray:
    if len(points) == 0:
        raise DatasetError(f"empty sweep (0 points): {_where(path, frame)}")
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        raise DatasetError(
            f"sweep has {int(bad.sum())} of {len(points)} points with NaN or inf "
            f"(first at row {int(np.argmax(bad))}): {_where(path, frame)}"
        )
    return points


def read_nuscenes_sweep(path: str | os.PathLike, frame: str | None = None) -> np.ndarray:
    """(N, 4) float32 x, y, z, intensity in the LiDAR frame, read as nuscenes-devkit does
    (``LidarPointCloud.from_file``: 5 float32 per point, the first 4 kept)."""
    require_file(path, "LiDAR sweep", frame)
    size = os.path.getsize(path)
    record = 4 * NUSCENES_POINT_DIMS
    if size % record:
        raise DatasetError(
            f"truncated sweep: {size} bytes is not a whole number of {NUSCENES_POINT_DIMS}-float32 "
            f"points ({record} bytes each): {_where(path, frame)}"
        )
    # One read: what LidarPointCloud.from_file computes (np.fromfile, reshape(-1, 5), the
    # first 4 columns), with the ring column it drops kept for the layout check.
    raw = np.fromfile(str(path), dtype=np.float32).reshape(-1, NUSCENES_POINT_DIMS)  # (N, 5)
    _check_layout(raw, path, frame)
    return _check_points(np.ascontiguousarray(raw[:, :4]), path, frame)


def _check_layout(raw: np.ndarray, path: str | os.PathLike, frame: str | None) -> None:
    """(N, 5) floats of a sweep that only has the right length: a file of another layout (4
    floats a point, say) reads as garbage whose ring column is no beam number, or whose
    coordinates are beyond any sensor's range. Cheap checks, named with the file."""
    finite = np.isfinite(raw).all(axis=1)
    ring, xyz = raw[finite, 4], raw[finite, :3]
    bad_ring = (ring < 0) | (ring >= MAX_RING) | (ring != np.round(ring))
    if bad_ring.any():
        first = float(ring[np.argmax(bad_ring)])
        raise DatasetError(
            f"not a nuScenes sweep (x, y, z, intensity, ring as 5 float32 a point): "
            f"{int(bad_ring.sum())} of {len(ring)} points have a ring index that is no beam "
            f"number in [0, {MAX_RING}) (e.g. {first:g}); written with another layout? "
            f"{_where(path, frame)}"
        )
    far = np.abs(xyz).max(axis=1) > MAX_RANGE_M
    if far.any():
        raise DatasetError(
            f"not a nuScenes sweep: {int(far.sum())} of {len(xyz)} points lie beyond "
            f"{MAX_RANGE_M:g} m (e.g. {xyz[np.argmax(far)].tolist()}); written with another "
            f"layout? {_where(path, frame)}"
        )


def read_av2_sweep(path: str | os.PathLike, frame: str | None = None) -> np.ndarray:
    """(N, 4) float32 x, y, z (ego frame), intensity of an AV2 ``.feather`` sweep (av2's
    ``Sweep.from_feather``)."""
    from av2.structures.sweep import Sweep

    require_file(path, "LiDAR sweep", frame)
    try:
        sweep = Sweep.from_feather(Path(path))
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise DatasetError(
            f"unreadable sweep ({type(exc).__name__}: {exc}): {_where(path, frame)}"
        ) from None
    points = np.column_stack([sweep.xyz, sweep.intensity]).astype(np.float32)
    return _check_points(points, path, frame)


def read_sweep(path: str | os.PathLike, frame: str | None = None) -> np.ndarray:
    """(N, 4) float32 points of a sweep of either dataset, chosen by the file's suffix."""
    if str(path).endswith(".feather"):
        return read_av2_sweep(path, frame)
    return read_nuscenes_sweep(path, frame)


def read_lidarseg_labels(
    path: str | os.PathLike, num_points: int, frame: str | None = None
) -> np.ndarray:
    """(N,) uint8 nuScenes-lidarseg general-category labels (one byte per point)."""
    require_file(path, "lidarseg label file", frame)
    labels = np.fromfile(path, dtype=np.uint8)
    if len(labels) != num_points:
        raise DatasetError(
            f"label file has {len(labels)} labels for a sweep of {num_points} points: "
            f"{_where(path, frame)}"
        )
    return labels


def check_image_size(
    size: tuple[int, int],
    expected: tuple[int, int] | None,
    path: str | os.PathLike,
    frame: str | None,
) -> None:
    """An image's (width, height) against its dataset table's: the point-pixel pairs are
    projected with the table's size, so a mismatch would pair points with the wrong pixels."""
    if expected is not None and tuple(int(x) for x in size) != tuple(int(x) for x in expected):
        raise DatasetError(
            f"camera image is {size[0]}x{size[1]} pixels but its dataset table says "
            f"{expected[0]}x{expected[1]}: {_where(path, frame)}"
        )


def read_image(
    path: str | os.PathLike,
    frame: str | None = None,
    draft: tuple[int, int] | None = None,
    expect_size: tuple[int, int] | None = None,
):
    """Decode a JPEG to an RGB ``PIL.Image``; ``draft`` lets libjpeg decode at reduced size;
    ``expect_size`` (width, height), when given, must be the file's size."""
    from PIL import Image, UnidentifiedImageError

    require_file(path, "camera image", frame)
    try:
        with Image.open(path) as img:
            check_image_size(img.size, expect_size, path, frame)
            if draft is not None:
                img.draft("RGB", draft)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"corrupt image ({exc}): {_where(path, frame)}") from None


def class_map_path(image_path: str | os.PathLike) -> str:
    """The class map that the synthetic world writes beside ``image_path``."""
    path = Path(image_path)
    return str(path.with_name(path.name.rsplit(".", 1)[0] + CLASS_MAP_SUFFIX))


def read_class_map(image_path: str | os.PathLike, frame: str | None = None) -> np.ndarray:
    """(H, W) uint8 general-category index of every pixel of the image at ``image_path``."""
    from PIL import Image, UnidentifiedImageError

    path = class_map_path(image_path)
    if not os.path.isfile(path):
        raise DatasetError(
            f"no per-pixel class map beside the camera image (only synthetic worlds written by "
            f"`hilda-prep make-synthetic` have them): {_where(path, frame)}"
        )
    try:
        with Image.open(path) as img:
            if img.mode != "L":
                raise DatasetError(f"class map is {img.mode}, not 8-bit: {_where(path, frame)}")
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"corrupt class map ({exc}): {_where(path, frame)}") from None
