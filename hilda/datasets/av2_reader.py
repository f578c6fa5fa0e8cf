"""Argoverse 2 sensor-dataset keyframes through av2, as canonical ``Frame`` records.

LiDAR sweeps are 10 Hz; a keyframe is taken every ``keyframe_every`` sweeps (default 5,
i.e. 0.5 s) so neighbours are 0.5 s apart as in nuScenes. Each keyframe gets the seven ring
cameras' images nearest in time (av2's ``get_closest_img_fpath``), with the ego pose at each
image's own timestamp. AV2 sweeps are stored in the ego frame, so ``lidar_to_ego`` is the
identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hilda.data_schemas.records import Camera, Frame, RecordError
from hilda.datasets.io import DatasetError, require_file

RING_CAMERAS: tuple[str, ...] = (
    "ring_front_center",
    "ring_front_left",
    "ring_front_right",
    "ring_side_left",
    "ring_side_right",
    "ring_rear_left",
    "ring_rear_right",
)


@dataclass(frozen=True)
class AV2Source:
    root: str  # folder holding the split folders (train/, val/, test/)
    split: str = "train"
    keyframe_every: int = 5


def _check_sensor_files(data_dir: Path) -> None:
    """Every sweep and image is named by its nanosecond timestamp; av2's loader parses the
    names and fails on any other file (a macOS ``._<ts>.feather`` resource fork, a copy) with
    a traceback that names none: name it here."""
    for log in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        sensors = log / "sensors"
        for folder, suffix in [(sensors / "lidar", ".feather")] + [
            (cam, ".jpg") for cam in sorted((sensors / "cameras").glob("*")) if cam.is_dir()
        ]:
            for path in folder.glob(f"*{suffix}") if folder.is_dir() else ():
                if not path.stem.isdigit():
                    raise DatasetError(
                        f"{path} is not named <timestamp_ns>{suffix}, as every Argoverse 2 "
                        "sensor file is (a stray copy or a ._ resource fork?): move it out of "
                        "the log"
                    )


class AV2Reader:
    def __init__(self, source: AV2Source) -> None:
        from av2.datasets.sensor.av2_sensor_dataloader import AV2SensorDataLoader

        if source.keyframe_every < 1:
            raise DatasetError(f"keyframe_every must be >= 1, got {source.keyframe_every}")
        self.source = source
        data_dir = Path(source.root) / source.split
        if not data_dir.is_dir():
            raise DatasetError(f"Argoverse 2 split folder {data_dir} does not exist")
        _check_sensor_files(data_dir)
        self.loader = AV2SensorDataLoader(data_dir=data_dir, labels_dir=data_dir)
        self.data_dir = data_dir
        self.has_labels = False
        self.skipped: dict[str, str] = {}  # AV2 logs have no links to break
        self.frames: list[Frame] = []
        for log_id in self.loader.get_log_ids():
            self.frames.extend(self._log_frames(log_id, start=len(self.frames)))
        if not self.frames:
            raise DatasetError(f"no LiDAR sweeps found under {data_dir}/*/sensors/lidar")

    def _log_frames(self, log_id: str, start: int) -> list[Frame]:
        from av2.utils.io import read_city_SE3_ego

        sweeps = self.loader.get_ordered_log_lidar_timestamps(log_id)
        if not sweeps:
            return []
        log_dir = self.data_dir / log_id
        poses_file = log_dir / "city_SE3_egovehicle.feather"
        require_file(poses_file, "ego pose table", log_id)
        try:
            poses = read_city_SE3_ego(log_dir)
            pinholes = {c: self.loader.get_log_pinhole_camera(log_id, c) for c in RING_CAMERAS}
        except KeyError as exc:
            raise DatasetError(
                f"calibration of log {log_id} lacks sensor {exc}: {log_dir / 'calibration'}"
            ) from None
        except Exception as exc:
            raise DatasetError(
                f"cannot read calibration or poses of log {log_id} ({exc}): {log_dir}"
            ) from None
        keys = sweeps[:: self.source.keyframe_every]
        frames = []
        for i, ts in enumerate(keys):
            tok = f"{log_id}:{ts}"
            if ts not in poses:
                raise DatasetError(f"no ego pose at LiDAR time {ts} in {poses_file} (frame {tok})")
            lidar_path = self.loader.get_lidar_fpath(log_id, ts)
            require_file(lidar_path, "LiDAR sweep", tok)
            cameras = [self._camera(log_id, cam, ts, tok, poses, pinholes[cam], poses_file)
                       for cam in RING_CAMERAS]  # fmt: skip
            try:
                frames.append(
                    Frame(
                        token=tok,
                        scene=log_id,
                        timestamp=ts // 1000,
                        lidar_file=os.fspath(lidar_path),
                        lidar_to_ego=np.eye(4),
                        ego_to_global=np.asarray(poses[ts].transform_matrix, dtype=np.float64),
                        cameras=tuple(cameras),
                        prev=start + i - 1 if i > 0 else None,
                        next=start + i + 1 if i + 1 < len(keys) else None,
                        extra={"log_id": log_id, "timestamp_ns": str(ts)},
                    )
                )
            except RecordError as exc:
                raise DatasetError(f"bad calibration in frame {tok}: {exc}") from None
        return frames

    def _camera(self, log_id, cam: str, ts: int, tok: str, poses, pinhole, poses_file) -> Camera:
        """Camera ``cam`` of the keyframe at LiDAR time ``ts``: the image nearest in time and
        the ego pose at that image's own timestamp."""
        img = self.loader.get_closest_img_fpath(log_id, cam, ts)
        if img is None:
            raise DatasetError(
                f"missing {cam} image: none within 25 ms of LiDAR time {ts} (frame {tok})"
            )
        require_file(img, f"{cam} image", tok)
        cam_ts = int(img.stem)
        if cam_ts not in poses:
            raise DatasetError(f"no ego pose at {cam} time {cam_ts} in {poses_file} (frame {tok})")
        try:
            return Camera(
                name=cam,
                image_file=os.fspath(img),
                width=int(pinhole.width_px),
                height=int(pinhole.height_px),
                intrinsics=np.asarray(pinhole.intrinsics.K, dtype=np.float64),
                cam_to_ego=np.asarray(pinhole.ego_SE3_cam.transform_matrix, dtype=np.float64),
                ego_to_global=np.asarray(poses[cam_ts].transform_matrix, dtype=np.float64),
                timestamp=cam_ts // 1000,
            )
        except RecordError as exc:
            raise DatasetError(f"bad calibration in frame {tok}: {exc}") from None
