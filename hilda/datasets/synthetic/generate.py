"""Simulate scenes of the synthetic world and write them in the datasets' real on-disk formats.

``make_synthetic`` is what ``hilda-prep make-synthetic`` runs. The simulation (world, LiDAR,
cameras) is format-independent; ``nuscenes_format`` and ``av2_format`` only serialise it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from hilda.datasets.io import class_map_path
from hilda.datasets.synthetic.render import (
    AV2_RIG,
    KITTI_RIG,
    NUSCENES_RIG,
    CameraImage,
    CameraSpec,
    LidarSweep,
    Rig,
    render_camera,
    scan_lidar,
)
from hilda.datasets.synthetic.world import World, make_world
from hilda.errors import ConfigError

Format = Literal["nuscenes", "av2", "semantickitti", "waymo"]
DEFAULT_IMAGE_SIZE: dict[str, tuple[int, int]] = {
    "nuscenes": (800, 450),
    "av2": (512, 388),
    "semantickitti": (1241, 376),  # KITTI's camera size; no images are written
    "waymo": (1920, 1280),  # Waymo's front camera size; no images are written
}


@dataclass(frozen=True)
class SyntheticConfig:
    format: Format
    out: Path
    scenes: int = 2
    frames_per_scene: int = 6  # keyframes per scene, 0.5 s apart
    seed: int = 0
    image_size: tuple[int, int] | None = None  # (width, height) of landscape cameras
    version: str = "v1.0-mini"  # nuScenes table version
    keyframe_every: int = 5  # AV2: sweeps (10 Hz) between keyframes
    jpeg_quality: int = 90
    lidar_beams: int | None = None  # None: the rig's (nuScenes 32)
    lidar_azimuths: int | None = None  # rays per beam and sweep; None: the rig's
    shared_map: bool = False  # nuScenes: one map for all logs instead of one per log
    workers: int = 1  # processes writing scenes (nuScenes)

    def __post_init__(self) -> None:
        if self.format not in DEFAULT_IMAGE_SIZE:
            raise ConfigError(
                f"format must be one of {sorted(DEFAULT_IMAGE_SIZE)}, got {self.format!r}"
            )
        if self.scenes < 1 or self.frames_per_scene < 1:
            raise ConfigError("scenes and frames_per_scene must be >= 1")
        if min(self.lidar_beams or 1, self.lidar_azimuths or 1, self.workers) < 1:
            raise ConfigError("lidar_beams, lidar_azimuths and workers must be >= 1")
        w, h = self.resolved_image_size
        if w < 16 or h < 16:
            raise ConfigError(f"image size {w}x{h} is too small (min 16x16)")

    @property
    def resolved_image_size(self) -> tuple[int, int]:
        return self.image_size or DEFAULT_IMAGE_SIZE[self.format]

    @property
    def rig(self) -> Rig:
        rigs = {"nuscenes": NUSCENES_RIG, "av2": AV2_RIG, "semantickitti": KITTI_RIG}
        # Waymo: 10 Hz frames; its LiDARs are hilda.datasets.synthetic.waymo_format's.
        rigs["waymo"] = replace(KITTI_RIG, keyframe_period_us=100_000)
        rig = rigs[self.format]
        lidar = rig.lidar
        beams, azimuths = self.lidar_beams or lidar.beams, self.lidar_azimuths or lidar.azimuths
        return replace(rig, lidar=replace(lidar, beams=beams, azimuths=azimuths))


def scale_config(
    out: Path, *, scenes: int = 850, frames_per_scene: int = 40, seed: int = 0, workers: int = 1
) -> SyntheticConfig:
    """A world of nuScenes trainval's size (850 scenes x 40 keyframes = 34,000 against the
    real 34,149) with cheap sensors: 8-beam sweeps of about 2k points, 64x36 cameras, one
    shared map. What a dry run of the pipeline at scale needs (``benchmarks/scale.py``):
    every table and file of the real layout, at a few milliseconds a keyframe."""
    return SyntheticConfig(
        format="nuscenes",
        out=out,
        scenes=scenes,
        frames_per_scene=frames_per_scene,
        seed=seed,
        image_size=(64, 36),
        version="v1.0-trainval",
        lidar_beams=8,
        lidar_azimuths=256,
        shared_map=True,
        workers=workers,
    )


def world_config(
    format: str,
    out: Path,
    *,
    scenes: int | None,
    frames_per_scene: int | None,
    seed: int,
    image_size: tuple[int, int] | None,
    version: str,
    keyframe_every: int,
    scale: bool,
    workers: int | None,
) -> SyntheticConfig:
    """``hilda-prep make-synthetic``'s world: the small default (2 scenes x 6 keyframes) or,
    with ``scale``, nuScenes trainval's size (``scale_config``; nuScenes at its own sizes)."""
    if scale:
        if format != "nuscenes" or image_size is not None:
            raise ConfigError("--scale writes nuScenes v1.0-trainval at its own sizes")
        return scale_config(
            out,
            scenes=scenes or 850,
            frames_per_scene=frames_per_scene or 40,
            seed=seed,
            workers=workers or os.cpu_count() or 1,
        )
    return SyntheticConfig(
        format=format,  # type: ignore[arg-type]
        out=out,
        scenes=scenes or 2,
        frames_per_scene=frames_per_scene or 6,
        seed=seed,
        image_size=image_size,
        version=version,
        keyframe_every=keyframe_every,
        workers=workers or 1,
    )


def read_hint(cfg: SyntheticConfig) -> str:
    """How to read a written world back (what ``hilda-prep make-synthetic`` prints last)."""
    return {
        "nuscenes": f"read it with: hilda-prep frames --dataset nuscenes --root {cfg.out} "
        f"--version {cfg.version}",
        "av2": f"read it with: hilda-prep frames --dataset av2 --root {cfg.out} --split train",
        "semantickitti": f"{cfg.out}/sequences/NN (train 00-07, 09, 10; val 08)",
        "waymo": f"{cfg.out}/{{training,validation}}/<component>/<segment>.parquet (Waymo v2): "
        f"hilda-eval finetune --dataset waymo --root {cfg.out}",
    }[cfg.format]


def token(*parts: object) -> str:
    """A deterministic 32-hex-digit token (the nuScenes token format)."""
    return hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()


def is_val_scene(index: int, scenes: int) -> bool:
    """The last fifth of the scenes (at least one when there are two or more) is validation."""
    return scenes >= 2 and index >= scenes - max(1, scenes // 5)


@dataclass(frozen=True)
class SweepRecord:
    index: int  # sweep index within the scene
    t_us: int
    ego_to_global: np.ndarray  # (4, 4) at t_us
    sweep: LidarSweep
    keyframe: int | None  # keyframe index, None for intermediate sweeps
    images: tuple[
        tuple[CameraSpec, int, np.ndarray, CameraImage], ...
    ]  # (camera, t_us, ego pose, image)


def simulate_scene(
    world: World,
    rig: Rig,
    keyframes: int,
    sweeps_per_keyframe: int,
    image_size: tuple[int, int],
    rng: np.random.Generator,
) -> Iterator[SweepRecord]:
    """Sweeps every ``keyframe_period / sweeps_per_keyframe``; camera images at keyframes."""
    total = (keyframes - 1) * sweeps_per_keyframe + 1
    period = rig.keyframe_period_us // sweeps_per_keyframe
    for j in range(total):
        t = world.start_us + j * period
        key = j // sweeps_per_keyframe if j % sweeps_per_keyframe == 0 else None
        images = ()
        if key is not None:
            images = tuple(
                (
                    cam,
                    t + cam.time_offset_us,
                    world.ego_to_global(t + cam.time_offset_us),
                    render_camera(world, cam, *cam.size(image_size), t + cam.time_offset_us),
                )
                for cam in rig.cameras
            )
        yield SweepRecord(j, t, world.ego_to_global(t), scan_lidar(world, rig, t, rng), key, images)


def scene_world(cfg: SyntheticConfig, index: int, start_us: int) -> World:
    duration = (cfg.frames_per_scene - 1) * cfg.rig.keyframe_period_us * 1e-6
    return make_world(cfg.seed, index, duration, start_us)


def make_synthetic(
    cfg: SyntheticConfig, progress: Callable[[str], None] | None = None
) -> dict[str, int]:
    """Write the synthetic dataset described by ``cfg``; returns counts of what was written."""
    if cfg.format == "nuscenes":
        from hilda.datasets.synthetic.nuscenes_format import write_nuscenes

        return write_nuscenes(cfg, progress)
    if cfg.format == "semantickitti":
        from hilda.datasets.synthetic.kitti_format import write_semantickitti

        return write_semantickitti(cfg, progress)
    if cfg.format == "waymo":
        from hilda.datasets.synthetic.waymo_format import write_waymo

        return write_waymo(cfg, progress)
    from hilda.datasets.synthetic.av2_format import write_av2

    return write_av2(cfg, progress)


def write_class_map(image_path: Path, label: np.ndarray) -> None:
    """The camera's (H, W) per-pixel general-category labels as an 8-bit PNG beside its image
    (``hilda.datasets.io.class_map_path``): what the oracle teacher reads."""
    from PIL import Image

    Image.fromarray(label.astype(np.uint8)).save(  # 2-D uint8: mode "L"
        class_map_path(image_path), optimize=False, compress_level=1
    )
