"""nuScenes keyframes through nuscenes-devkit, as canonical ``Frame`` records."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass

import numpy as np

from hilda.data_schemas.records import Camera, Frame, RecordError
from hilda.datasets.classes import coarse_lut_from_mapper
from hilda.datasets.io import DatasetError, dataset_path, require_file
from hilda.geometry import pose_to_transform

CAMERAS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_RIGHT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_FRONT_LEFT",
)
LIDAR = "LIDAR_TOP"
MAX_NEIGHBOUR_GAP_US = 1_000_000  # keyframes are 0.5 s apart; a larger gap means a dropped sample
# (table, field, referenced table): the references a frame is built from. The devkit indexes
# tables by token and lets a duplicated token's later record win, and resolves a dangling one
# only when asked: both are checked once, up front.
REFERENCES = (
    ("scene", "log_token", "log"),
    ("scene", "first_sample_token", "sample"),
    ("sample", "scene_token", "scene"),
    ("sample_data", "sample_token", "sample"),
    ("sample_data", "ego_pose_token", "ego_pose"),
    ("sample_data", "calibrated_sensor_token", "calibrated_sensor"),
    ("calibrated_sensor", "sensor_token", "sensor"),
)


@dataclass(frozen=True)
class NuScenesSource:
    root: str
    version: str = "v1.0-mini"
    split: str = "all"  # "all", or a devkit split: train, val, test, mini_train, mini_val, ...
    skip_bad: bool = False  # a scene with broken sample links: keep what is reachable, record it


def _transform(record: dict) -> np.ndarray:
    return pose_to_transform(record["rotation"], record["translation"])


class NuScenesReader:
    """Keyframes of one split of a nuScenes version, in scene order.

    ``split="all"`` takes every scene of the version (what mini and test versions need);
    a devkit split name (``create_splits_scenes``) takes those scenes in the devkit's order.
    """

    def __init__(self, source: NuScenesSource) -> None:
        from nuscenes.nuscenes import NuScenes
        from nuscenes.utils.splits import create_splits_scenes

        self.source = source
        table_root = os.path.join(source.root, source.version)
        if not os.path.isdir(table_root):
            raise DatasetError(
                f"nuScenes version folder {table_root} does not exist "
                f"(root {source.root}, version {source.version})"
            )
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.nusc = NuScenes(version=source.version, dataroot=source.root, verbose=False)
        except (AssertionError, KeyError, FileNotFoundError, ValueError) as exc:
            raise DatasetError(f"nuscenes-devkit cannot load {table_root}: {exc}") from None
        scenes = list(self.nusc.scene)
        if source.split != "all":
            splits = create_splits_scenes(verbose=False)
            if source.split not in splits:
                raise DatasetError(
                    f"unknown nuScenes split {source.split!r}; use 'all' or one of {sorted(splits)}"
                )
            by_name = {s["name"]: s for s in scenes}
            scenes = [by_name[n] for n in splits[source.split] if n in by_name]
            if not scenes:
                raise DatasetError(
                    f"split {source.split!r} has no scenes in {table_root} "
                    f"(a mini or test version needs --split all or mini_train/mini_val)"
                )
        self.has_labels = hasattr(self.nusc, "lidarseg")
        self._check_tables(table_root)
        self.skipped: dict[str, str] = {}  # scene name -> what is wrong with its sample links
        self.frames: list[Frame] = self._build(scenes)

    def _check_tables(self, table_root: str) -> None:
        """Tables that contradict themselves are errors naming table, token and field: a token
        given twice (the devkit keeps the later record) and a reference to no record."""
        names = [*self.nusc.table_names, *(["lidarseg"] if self.has_labels else [])]
        tokens: dict[str, set[str]] = {}
        for name in names:
            seen: set[str] = set()
            for row in getattr(self.nusc, name, []):
                if row["token"] in seen:
                    raise DatasetError(
                        f"{table_root}/{name}.json holds token {row['token']} twice (the devkit "
                        "would silently keep the later record): remove one"
                    )
                seen.add(row["token"])
            tokens[name] = seen
        for table, field, target in REFERENCES:
            for row in getattr(self.nusc, table, []):
                ref = row.get(field)
                if ref and ref not in tokens.get(target, ()):
                    raise DatasetError(
                        f"{table_root}/{table}.json record {row['token']}: {field} {ref} is no "
                        f"record of {target}.json"
                    )

    @property
    def coarse_label_lut(self) -> np.ndarray:
        """(256,) uint8: general lidarseg label -> 16-class index (0 = ignore), from the
        devkit's ``LidarsegClassMapper``."""
        from nuscenes.eval.lidarseg.utils import LidarsegClassMapper

        with contextlib.redirect_stdout(io.StringIO()):
            mapper = LidarsegClassMapper(self.nusc)
        return coarse_lut_from_mapper(mapper.get_fine_idx_2_coarse_idx())

    def _record(self, table: str, token: str, sd: dict, frame: str) -> dict:
        """A pose record (``ego_pose`` or ``calibrated_sensor``) of sample_data ``sd``, its
        rotation and translation checked: a NaN or inf names the table, the record and the
        sensor it belongs to, not the camera calibration the pose is later combined with."""
        rec = self.nusc.get(table, token)
        where = f"{os.path.join(self.source.root, self.source.version, table)}.json record {token}"
        try:
            values = np.asarray([*rec["rotation"], *rec["translation"]], dtype=np.float64)
        except (ValueError, TypeError):
            raise DatasetError(
                f"{where}: rotation {rec['rotation']!r} / translation {rec['translation']!r} "
                f"are not numbers (of {sd['channel']} sample_data {sd['token']}, frame {frame})"
            ) from None
        if not np.all(np.isfinite(values)):
            raise DatasetError(
                f"{os.path.join(self.source.root, self.source.version, table)}.json record "
                f"{token} (of {sd['channel']} sample_data {sd['token']}, frame {frame}) has NaN "
                f"or inf in its rotation or translation: {rec['rotation']}, {rec['translation']}"
            )
        return rec

    def _camera(self, sd_token: str, frame: str) -> Camera:
        sd = self.nusc.get("sample_data", sd_token)
        cs = self._record("calibrated_sensor", sd["calibrated_sensor_token"], sd, frame)
        pose = self._record("ego_pose", sd["ego_pose_token"], sd, frame)
        path = dataset_path(self.source.root, sd["filename"], "sample_data", sd["token"])
        require_file(path, f"{sd['channel']} image", frame)
        try:
            width, height = int(sd["width"]), int(sd["height"])
        except (ValueError, TypeError):
            raise DatasetError(
                f"{os.path.join(self.source.root, self.source.version)}/sample_data.json record "
                f"{sd['token']}: width {sd['width']!r} / height {sd['height']!r} are not whole "
                f"numbers (frame {frame})"
            ) from None
        return Camera(
            name=sd["channel"],
            image_file=path,
            width=width,
            height=height,
            intrinsics=np.asarray(cs["camera_intrinsic"], dtype=np.float64),
            cam_to_ego=_transform(cs),
            ego_to_global=_transform(pose),
            timestamp=int(sd["timestamp"]),
        )

    def _build(self, scenes: list[dict]) -> list[Frame]:
        samples: list[tuple[dict, dict]] = []
        for scene in scenes:
            samples += [(scene, s) for s in self._scene_samples(scene)]
        row_of = {s["token"]: i for i, (_, s) in enumerate(samples)}
        frames = []
        for scene, sample in samples:
            tok = sample["token"]
            if LIDAR not in sample["data"]:
                raise DatasetError(f"sample {tok} of {scene['name']} has no {LIDAR} sweep")
            sd = self.nusc.get("sample_data", sample["data"][LIDAR])
            lidar_path = dataset_path(self.source.root, sd["filename"], "sample_data", sd["token"])
            require_file(lidar_path, "LiDAR sweep", tok)
            cs = self._record("calibrated_sensor", sd["calibrated_sensor_token"], sd, tok)
            pose = self._record("ego_pose", sd["ego_pose_token"], sd, tok)
            labels = None
            if self.has_labels:
                try:
                    rec = self.nusc.get("lidarseg", sd["token"])
                    labels = dataset_path(
                        self.source.root, rec["filename"], "lidarseg", rec["token"]
                    )
                except KeyError:
                    labels = None
            try:
                cameras = tuple(
                    self._camera(sample["data"][c], tok) for c in CAMERAS if c in sample["data"]
                )
                frames.append(
                    Frame(
                        token=tok,
                        scene=scene["name"],
                        timestamp=int(sd["timestamp"]),
                        lidar_file=lidar_path,
                        lidar_to_ego=_transform(cs),
                        ego_to_global=_transform(pose),
                        cameras=cameras,
                        prev=self._neighbour(sample, "prev", row_of),
                        next=self._neighbour(sample, "next", row_of),
                        labels_file=labels,
                        extra={"lidar_sample_data": sd["token"]},
                    )
                )
            except RecordError as exc:
                raise DatasetError(
                    f"bad calibration in frame {tok} ({scene['name']}): {exc}"
                ) from None
        return frames

    def _scene_samples(self, scene: dict) -> list[dict]:
        """A scene's samples from its ``first_sample_token`` along ``next``, checked against
        the scene's ``nbr_samples``: a link to a missing sample, a loop, or a chain that skips
        samples is an error naming the tables and tokens, never a silently dropped frame. With
        ``skip_bad`` the samples reachable before the break are kept and the scene's problem
        is recorded in ``skipped`` (the index keeps it)."""
        tables = os.path.join(self.source.root, self.source.version)
        out, seen, tok = [], set(), scene["first_sample_token"]
        problem = None
        while tok:
            if tok in seen:
                problem = (
                    f"{tables}: the samples of scene {scene['name']} loop back to sample {tok} "
                    "(sample.json 'next' links)"
                )
                break
            seen.add(tok)
            try:
                sample = self.nusc.get("sample", tok)
            except KeyError:
                problem = (
                    f"{tables}: scene {scene['name']} links to sample {tok}, which sample.json "
                    "does not hold (scene.json first_sample_token or a sample's 'next')"
                )
                break
            if out and sample["timestamp"] <= out[-1]["timestamp"]:
                problem = (
                    f"{tables}/sample.json: keyframe timestamps of scene {scene['name']} go "
                    f"backwards along 'next': sample {tok} has timestamp {sample['timestamp']}, "
                    f"not after {out[-1]['timestamp']} of sample {out[-1]['token']}"
                )
                break
            out.append(sample)
            tok = sample["next"]
        if problem is None and len(out) != scene["nbr_samples"]:
            problem = (
                f"{tables}: scene {scene['name']} ({scene['token']}) lists nbr_samples="
                f"{scene['nbr_samples']} in scene.json, but {len(out)} samples are reachable "
                "from its first_sample_token along 'next' in sample.json"
            )
        if problem is not None:
            if not self.source.skip_bad:
                raise DatasetError(
                    f"{problem}; rerun with --skip-bad to index the {len(out)} reachable "
                    "samples and record the scene as damaged"
                )
            self.skipped[scene["name"]] = f"{problem} ({len(out)} reachable samples kept)"
        return out

    def _neighbour(self, sample: dict, side: str, row_of: dict[str, int]) -> int | None:
        other = sample[side]
        if not other or other not in row_of:
            return None
        gap = abs(self.nusc.get("sample", other)["timestamp"] - sample["timestamp"])
        return row_of[other] if gap <= MAX_NEIGHBOUR_GAP_US else None
