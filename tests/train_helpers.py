"""A training cache of the synthetic world, and overrides that make any preset CPU-sized."""

from __future__ import annotations

from pathlib import Path

from hilda.pipeline.ops.occupancy import OccupancyConfig
from hilda.pipeline.runner import ClusterConfig
from hilda.pipeline.stages.common import StageOptions
from hilda.pipeline.stages.index import IndexConfig, run_index
from hilda.pipeline.stages.occupancy import OccupancyStageConfig, run_occupancy
from hilda.pipeline.stages.pointmaps import PointmapConfig, run_pointmaps
from hilda.pipeline.stages.teacher import TeacherConfig, run_teacher
from hilda.presets import preset_root

CONFIGS = preset_root()
IMAGE = (112, 56)  # DINOv2: 8 x 4 patches of 14
IMAGE_16 = (128, 64)  # DINOv3: 8 x 4 patches of 16
# Every ablation's teacher blocks (last4 covers Table 8), a ViT-B / ViT-L for their presets,
# and the DINOv3 presets' teachers (named after their arch, as the presets' comments say).
TEACHERS = (
    ("vits", "random:vits14", "last4", IMAGE),
    ("vitb", "random:vitb14", "last2", IMAGE),
    ("vitl", "random:vitl14", "last2", IMAGE),
    ("dinov3_vits16", "random:dinov3_vits16", "last2", IMAGE_16),
    ("dinov3_vitb16", "random:dinov3_vitb16", "last2", IMAGE_16),
    ("dinov3_vitl16", "random:dinov3_vitl16", "last2", IMAGE_16),
)

# The presets' losses, heads and data path at a size that runs in about a second a step on
# 2 cores: a narrow one-block MinkUNet on 0.2 m voxels (BEV stride 2 keeps 0.4 m cells), small
# heads and UNet, a subset of the point-pixel pairs, one sample per step, in-process loading.
SMALL = [
    "model.student.init_dim=8",
    "model.student.planes=[8,16,16,16,16,16,16,16]",
    "model.student.layers=[1,1,1,1,1,1,1,1]",
    "model.student.out_channels=16",
    "model.student.ptv3.enc_depths=[1,1,1,1,1]",  # the PTv3 presets' student, as small
    "model.student.ptv3.enc_channels=[8,16,16,16,16]",
    "model.student.ptv3.enc_num_head=[1,1,1,1,1]",
    "model.student.ptv3.enc_patch_size=[64,64,64,64,64]",
    "model.student.ptv3.dec_depths=[1,1,1,1]",
    "model.student.ptv3.dec_channels=[16,16,16,16]",
    "model.student.ptv3.dec_num_head=[1,1,1,1]",
    "model.student.ptv3.dec_patch_size=[64,64,64,64]",
    "model.voxel.voxel_size=0.2",
    "model.bev_stride=2",
    "model.bev_grid=256",
    "model.head.hidden=32",
    "model.diffusion.base_channels=4",
    "model.diffusion.history_channels=8",
    "model.diffusion.groups=4",
    "model.diffusion.channel_mults=[1,2]",
    "model.also.hidden=16",
    "model.simple_hidden=8",
    "data.max_pairs_per_image=300",
    "data.num_workers=0",
    "optim.batch_size=1",
    "run.device=cpu",
    "run.log_every=1",
    "run.tensorboard=false",
]


def build_train_cache(dataset_root: Path, store: str) -> None:
    opts = StageOptions(cluster=ClusterConfig(workers=1))
    run_index(
        IndexConfig(
            dataset="nuscenes", root=str(dataset_root), store=store, split="all", frames_per_shard=2
        ),
        opts,
    )
    run_pointmaps(PointmapConfig(store=store), opts)
    run_occupancy(OccupancyStageConfig(store=store, occupancy=OccupancyConfig(grid=256)), opts)
    for name, teacher, layers, image in TEACHERS:
        # float16: the trainer tests' recorded losses were measured on it (int8 has its own
        # tests in test_cache_reader)
        cfg = TeacherConfig(
            store=store,
            teacher=teacher,
            layers=layers,
            image_size=image,
            name=name,
            codec="float16",
        )
        run_teacher(cfg, opts)
