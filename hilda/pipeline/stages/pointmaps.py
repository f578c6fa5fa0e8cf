"""Stage 2, ``hilda-prep build-pointmaps``: point-pixel pairs per frame and camera (CSR)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import numpy as np

from hilda.errors import HildaError
from hilda.pipeline.ops.occlusion import OcclusionRule, visible_mask
from hilda.pipeline.ops.projection import frame_pairs
from hilda.pipeline.stages.common import StageOptions, locked_stage, stage_client, write_ragged
from hilda.store.reader import PointsBlock, index_info, open_store, read_index
from hilda.store.schema import INDEX, POINTMAPS, POINTMAPS_COLUMNS, POINTS, normalize_store
from hilda.store.writer import open_for_stage, prepare_group, record_stage

CALIBRATION = (
    "lidar_to_ego",
    "ego_to_global",
    "cam_intrinsics",
    "cam_to_ego",
    "cam_ego_to_global",
    "image_size",
)

MIN_DEPTH = 1.0  # nuscenes-devkit map_pointcloud_to_image
BORDER_PX = 1.0


@dataclass(frozen=True)
class PointmapConfig:
    store: str
    occlusion: bool = True
    rule: OcclusionRule = field(default_factory=OcclusionRule)

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", normalize_store(self.store))


class _FrameSource:
    """Reads what one frame's pairs need from the store (opened once per task)."""

    def __init__(self, store: str, f0: int, f1: int) -> None:
        root = open_store(store)
        self.f0 = f0
        self.points = PointsBlock(root, f0, f1)
        self.tokens = read_index(root, ("token",), f0, f1)["token"]
        self.calib = read_index(root, CALIBRATION, f0, f1)

    def pairs(self, f: int, cfg: PointmapConfig) -> tuple[np.ndarray, ...]:
        i = f - self.f0
        for name, value in self.calib.items():
            if not np.all(np.isfinite(value[i])):  # a damaged store or a hand-edited index
                raise ValueError(f"{INDEX.name}/{name} holds NaN or inf")
        pts = self.points.frame(f)
        visible = functools.partial(visible_mask, rule=cfg.rule) if cfg.occlusion else None
        c = self.calib
        return frame_pairs(
            pts,
            c["lidar_to_ego"][i],
            c["ego_to_global"][i],
            c["cam_intrinsics"][i],
            c["cam_to_ego"][i],
            c["cam_ego_to_global"][i],
            c["image_size"][i],
            visible=visible,
            min_depth=MIN_DEPTH,
            border=BORDER_PX,
        )


def compute_pairs(cfg: PointmapConfig, f0: int, f1: int) -> list[tuple[np.ndarray, ...] | str]:
    """Dask task: (point, cam, uv, depth) pairs of each frame of [f0, f1), or the error that
    names a frame whose pairs cannot be computed (a singular calibration, say)."""
    src = _FrameSource(cfg.store, f0, f1)
    out: list[tuple[np.ndarray, ...] | str] = []
    for f in range(f0, f1):
        try:
            out.append(src.pairs(f, cfg))
        except (ValueError, np.linalg.LinAlgError, HildaError) as exc:
            out.append(f"frame {src.tokens[f - f0]} (row {f}): point-pixel pairs failed: {exc}")
    return out


@locked_stage("build-pointmaps")
def run_pointmaps(cfg: PointmapConfig, options: StageOptions) -> dict[str, int]:
    root = open_for_stage(cfg.store, require=(INDEX.name, POINTS.name), builds=POINTMAPS.name)
    info = index_info(root)
    num_frames, fps = info.num_frames, info.frames_per_shard
    dims = {"F": num_frames, "V": len(info.cameras), "Q": 0}
    attrs = {
        "occlusion": cfg.rule.describe() if cfg.occlusion else None,
        "min_depth": MIN_DEPTH,
        "border_px": BORDER_PX,
        "projection": "nuscenes-devkit map_pointcloud_to_image chain: lidar -> ego(t_lidar) -> "
        "global -> ego(t_cam) -> camera; uv in original-image pixels",
    }
    group = prepare_group(root, POINTMAPS, dims, fps, attrs, overwrite=options.overwrite)
    with stage_client(cfg.store, options.cluster) as client:
        offsets = write_ragged(
            client,
            group,
            store=cfg.store,
            columns=POINTMAPS_COLUMNS,
            compute_fn=compute_pairs,
            compute_args=lambda a, b: (cfg, a, b),
            num_frames=num_frames,
            frames_per_shard=fps,
            skip_bad=options.skip_bad,
            label="pointmaps",
        )
    record_stage(root, POINTMAPS.name, {"occlusion": cfg.occlusion, **asdict(cfg.rule)})
    return {
        "frames": num_frames,
        "pairs": int(offsets[-1]),
        "skipped": len(group.attrs.get("skipped", {})),
    }
