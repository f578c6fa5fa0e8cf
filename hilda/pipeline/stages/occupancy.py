"""Stage 4, ``hilda-prep build-occupancy``: the ego-compensated t+1 BEV occupancy of every
frame that has a next keyframe, bit-packed; ``valid`` is false where there is none."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from hilda.errors import FrameError
from hilda.pipeline.ops.occupancy import OccupancyConfig, future_occupancy
from hilda.pipeline.stages.common import (
    StageOptions,
    locked_stage,
    run_frame_shards,
    stage_client,
)
from hilda.store.reader import (
    PointsBlock,
    index_info,
    open_store,
    read_index,
    read_valid,
)
from hilda.store.schema import INDEX, OCCUPANCY, POINTS, normalize_store
from hilda.store.writer import open_for_stage, prepare_group, record_stage, write_frames


@dataclass(frozen=True)
class OccupancyStageConfig:
    store: str
    occupancy: OccupancyConfig = field(default_factory=OccupancyConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", normalize_store(self.store))


def _futures(root, f0: int, f1: int, horizon: int, frames: int) -> dict[int, int]:
    """Frame f -> the keyframe ``horizon`` steps after it (-1: none), for f in [f0, f1).
    Reads ``next`` around the shard only (a scene's keyframes are consecutive rows, so the
    futures lie within ``horizon`` rows of it); a pointer that leaves that window costs one
    more small read. A task's reads do not grow with the store (34k frames: 1k shards)."""
    hi = min(frames, f1 + horizon)
    window = read_index(root, ("next",), f0, hi)["next"]

    def after(g: int) -> int:
        if f0 <= g < hi:
            return int(window[g - f0])
        return int(read_index(root, ("next",), g, g + 1)["next"][0])

    out = {}
    for f in range(f0, f1):
        g = f
        for _ in range(horizon):
            g = after(g)
            if g < 0:
                break
        out[f] = g
    return out


def build_shard(cfg: OccupancyStageConfig, f0: int, f1: int, skip_bad: bool) -> dict[str, dict]:
    """Dask task: occupancy of frames [f0, f1); writes exactly one shard of bev and valid."""
    root = open_store(cfg.store)
    occ = cfg.occupancy
    futures = _futures(root, f0, f1, occ.horizon, index_info(root).num_frames)
    wanted = [g for g in futures.values() if g >= 0]
    lo, hi = min([f0, *wanted]), max([f1, *(g + 1 for g in wanted)])  # rows this shard reads
    index = read_index(root, ("token", "lidar_to_ego", "ego_to_global"), lo, hi)
    tokens = index["token"]  # (hi - lo,) rows of [lo, hi)
    lidar_to_ego, ego_to_global = index["lidar_to_ego"], index["ego_to_global"]  # (n, 4, 4)
    points = PointsBlock(root, min(wanted), max(wanted) + 1) if wanted else None
    bev = np.zeros((f1 - f0, occ.grid, occ.grid // 8), dtype=np.uint8)
    valid = np.zeros(f1 - f0, dtype=bool)
    bad: dict[int, str] = {}
    for f in range(f0, f1):
        g = futures[f]
        if g < 0 or points is None:
            continue
        i, j = f - lo, g - lo
        if points.count(g) == 0:
            bad[f] = (
                f"frame {tokens[i]}: its t+{occ.horizon} frame {tokens[j]} has no points (skipped)"
            )
            continue
        transforms = (lidar_to_ego[j], ego_to_global[j], lidar_to_ego[i], ego_to_global[i])
        try:
            bev[f - f0] = future_occupancy(points.frame(g), transforms, occ, seed=f)
        except ValueError as exc:
            sweep = read_index(root, ("lidar_path",), g, g + 1)["lidar_path"][0]
            msg = f"frame {tokens[i]}: occupancy from {sweep} failed: {exc}"
            if not skip_bad:
                raise FrameError(msg + "; rerun with --skip-bad to record it as skipped") from None
            bad[f] = msg
            continue
        valid[f - f0] = True
    write_frames(cfg.store, OCCUPANCY.name, f0, f1, {"bev": bev, "valid": valid})
    return {"skipped": bad}


@locked_stage("build-occupancy")
def run_occupancy(cfg: OccupancyStageConfig, options: StageOptions) -> dict[str, int]:
    root = open_for_stage(cfg.store, require=(INDEX.name, POINTS.name), builds=OCCUPANCY.name)
    info = index_info(root)
    num_frames, fps = info.num_frames, info.frames_per_shard
    occ = cfg.occupancy
    dims = {"F": num_frames, "H": occ.grid, "W8": occ.grid // 8}
    group = prepare_group(root, OCCUPANCY, dims, fps, occ.attrs(), overwrite=options.overwrite)
    with stage_client(cfg.store, options.cluster) as client:
        skipped, _ = run_frame_shards(
            client,
            group,
            build_shard,
            lambda a, b: (cfg, a, b, options.skip_bad),
            num_frames=num_frames,
            frames_per_shard=fps,
            label="occupancy",
            store=cfg.store,
        )
    record_stage(root, OCCUPANCY.name, asdict(occ))
    valid = int(read_valid(root).sum())
    return {
        "frames": num_frames,
        "valid": valid,
        "no_future": num_frames - valid - len(skipped),
        "skipped": len(skipped),
    }
