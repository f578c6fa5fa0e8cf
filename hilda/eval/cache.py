"""What RankMe and the figures read from a hilda-prep cache (the I/O edge of those commands):
frames' points, and one frame's camera view with its point-pixel pairs and teacher patches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hilda.errors import HildaError
from hilda.store import INDEX, POINTMAPS, POINTS
from hilda.store.reader import CacheReader, evenly_spaced


def read_points(store: str, frames: int | None = None) -> tuple[list[int], list[np.ndarray]]:
    """(frame indices, [(N, 4) float32 points]) of ``frames`` frames evenly spread over the
    cache (all when None)."""
    reader = CacheReader(store, [INDEX, POINTS])
    present = [f for f in range(reader.frames) if reader.point_count(f) > 0]  # skipped: empty
    if not present:
        raise HildaError(f"{reader.store}: the cache holds no frame with points")
    if frames is not None and frames < len(present):
        present = [present[i] for i in evenly_spaced(len(present), frames / len(present))]
    clouds = reader.gather(*(reader.points_reads(f) for f in present))
    return present, clouds


@dataclass(frozen=True)
class CameraView:
    """One frame seen by one camera: its points, which of them the camera sees, where, and
    the teacher's patch features of that image."""

    store: str
    frame: int
    token: str
    camera: str
    points: np.ndarray  # (N, 4) float32, LiDAR frame
    visible: np.ndarray  # (Q,) int64 rows of ``points`` seen by this camera
    uv: np.ndarray  # (Q, 2) float32 pixel coordinates in the original image
    image_path: str
    image_size: tuple[int, int]  # (W, H) of the original image
    teacher: str  # group name under teacher/
    block: int  # the teacher block of ``patches`` (the last one)
    patches: np.ndarray  # (h, w, D) float32 patch features of the resized image


def read_camera_view(
    store: str, frame: int, camera: str | None = None, teacher: str | None = None
) -> CameraView:
    """Frame ``frame`` through ``camera`` (default: the store's first camera) with the last
    block of ``teacher`` (default: the store's only teacher)."""
    reader = CacheReader(store, [INDEX, POINTS, POINTMAPS])
    t = reader.teacher(teacher)
    v = 0 if camera is None else _camera_index(reader.cameras, camera, reader.store)
    if not 0 <= frame < reader.frames:
        raise HildaError(f"{reader.store}: no frame {frame} (the cache holds {reader.frames})")
    token = reader.token(frame)
    block = t.depth - 1
    if block not in t.blocks:
        raise HildaError(f"{reader.store}: {t.path}/ does not hold its last block")
    points, pairs, patches = reader.gather(
        reader.points_reads(frame),
        reader.pairs_reads(frame),
        reader.teacher_block_reads(t, block, (frame, v)),  # (h, w, D)
    )
    if len(points) == 0:
        raise HildaError(f"{reader.store}: frame {frame} ({token}) was skipped and has no points")
    mine = pairs.cam == v
    w, h = (int(x) for x in reader.image_sizes()[frame, v])
    return CameraView(
        store=reader.store,
        frame=frame,
        token=token,
        camera=reader.cameras[v],
        points=points,
        visible=pairs.point[mine],
        uv=pairs.uv[mine],
        image_path=reader.image_path(frame, v),
        image_size=(w, h),
        teacher=t.name,
        block=block,
        patches=patches.astype(np.float32),
    )


def _camera_index(cameras: list[str], camera: str, store: str) -> int:
    if camera not in cameras:
        raise HildaError(f"{store} has no camera {camera!r} (cameras: {', '.join(cameras)})")
    return cameras.index(camera)
