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
    read_offsets,
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


def _future_index(nxt: np.ndarray, f: int, horizon: int) -> int:
    """Index of the keyframe ``horizon`` steps after f, or -1."""
    g = f
    for _ in range(horizon):
        g = int(nxt[g])
        if g < 0:
            return -1
    return g


def build_shard(cfg: OccupancyStageConfig, f0: int, f1: int, skip_bad: bool) -> dict[str, dict]:
    """Dask task: occupancy of frames [f0, f1); writes exactly one shard of bev and valid."""
    root = open_store(cfg.store)
    index = read_index(root, ("next", "token", "lidar_to_ego", "ego_to_global"))
    nxt, tokens = index["next"], index["token"]
    lidar_to_ego, ego_to_global = index["lidar_to_ego"], index["ego_to_global"]  # (F, 4, 4)
    offsets = read_offsets(root, POINTS)
    occ = cfg.occupancy
    futures = {f: _future_index(nxt, f, occ.horizon) for f in range(f0, f1)}
    wanted = [g for g in futures.values() if g >= 0]
    points = PointsBlock(root, min(wanted), max(wanted) + 1) if wanted else None
    bev = np.zeros((f1 - f0, occ.grid, occ.grid // 8), dtype=np.uint8)
    valid = np.zeros(f1 - f0, dtype=bool)
    bad: dict[int, str] = {}
    for f in range(f0, f1):
        g = futures[f]
        if g < 0 or points is None:
            continue
        if offsets[g + 1] == offsets[g]:
            bad[f] = (
                f"frame {tokens[f]}: its t+{occ.horizon} frame {tokens[g]} has no points (skipped)"
            )
            continue
        future = points.frame(g)
        transforms = (lidar_to_ego[g], ego_to_global[g], lidar_to_ego[f], ego_to_global[f])
        try:
            bev[f - f0] = future_occupancy(future, transforms, occ, seed=f)
        except ValueError as exc:
            sweep = read_index(root, ("lidar_path",), g, g + 1)["lidar_path"][0]
            msg = f"frame {tokens[f]}: occupancy from {sweep} failed: {exc}"
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
        )
    record_stage(root, OCCUPANCY.name, asdict(occ))
    valid = int(read_valid(root).sum())
    return {
        "frames": num_frames,
        "valid": valid,
        "no_future": num_frames - valid - len(skipped),
        "skipped": len(skipped),
    }
