"""What RankMe and the figures read from a hilda-prep cache (the I/O edge of those commands):
frames' points, and one frame's camera view with its point-pixel pairs and teacher patches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from hilda.errors import HildaError
from hilda.train.config import DataConfig, DistillPair, LossConfig, TrainConfig
from hilda.train.data import check_cache, evenly_spaced, open_cache, read_teacher_block


def read_points(store: str, frames: int | None = None) -> tuple[list[int], list[np.ndarray]]:
    """(frame indices, [(N, 4) float32 points]) of ``frames`` frames evenly spread over the
    cache (all when None)."""
    store, root = open_cache(store, ["index", "points"])
    offsets = np.asarray(root["points/offsets"][:])
    total = len(offsets) - 1
    present = [f for f in range(total) if offsets[f + 1] > offsets[f]]  # skipped frames: empty
    if not present:
        raise HildaError(f"{store}: the cache holds no frame with points")
    if frames is not None and frames < len(present):
        present = [present[i] for i in evenly_spaced(len(present), frames / len(present))]
    data = root["points/data"]
    clouds = [np.asarray(data[offsets[f] : offsets[f + 1]], dtype=np.float32) for f in present]
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
    cfg = TrainConfig(
        data=DataConfig(teacher=teacher),
        loss=LossConfig(distill=(DistillPair((0,), 0),), cls=False, aux="none"),
    )
    info = check_cache(store, cfg)
    root = zarr.open_group(info.store, mode="r")
    cameras = list(root["index"].attrs["cameras"])
    v = 0 if camera is None else _camera_index(cameras, camera, info.store)
    offsets = np.asarray(root["points/offsets"][:])
    if not 0 <= frame < len(offsets) - 1:
        raise HildaError(f"{info.store}: no frame {frame} (the cache holds {len(offsets) - 1})")
    points = np.asarray(root["points/data"][offsets[frame] : offsets[frame + 1]], np.float32)
    token = str(root["index/token"][frame])
    if len(points) == 0:
        raise HildaError(f"{info.store}: frame {frame} ({token}) was skipped and has no points")
    a, b = (int(x) for x in root["pointmaps/offsets"][frame : frame + 2])
    cam = np.asarray(root["pointmaps/cam"][a:b], np.int64)
    mine = cam == v
    visible = np.asarray(root["pointmaps/point"][a:b], np.int64)[mine]
    uv = np.asarray(root["pointmaps/uv"][a:b], np.float32)[mine]
    block = info.blocks[0]
    patches = read_teacher_block(root.__getitem__, info, block, (frame, v))  # (h, w, D)
    w, h = (int(x) for x in root["index/image_size"][frame, v])
    return CameraView(
        store=info.store,
        frame=frame,
        token=token,
        camera=cameras[v],
        points=points,
        visible=visible,
        uv=uv,
        image_path=str(root["index/image_path"][frame, v]),
        image_size=(w, h),
        teacher=str(info.teacher),
        block=block,
        patches=patches.astype(np.float32),
    )


def _camera_index(cameras: list[str], camera: str, store: str) -> int:
    if camera not in cameras:
        raise HildaError(f"{store} has no camera {camera!r} (cameras: {', '.join(cameras)})")
    return cameras.index(camera)
