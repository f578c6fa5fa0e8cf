"""The trainer's configuration: typed, frozen dataclasses (YAML + ``--set key=value``).

Defaults are the paper's (HilDA Tables F1-F3, Sec. C.1): AdamW, weight decay 0.005, OneCycle
(max lr 1e-3, pct_start 0.04, div 10, final div 100, cosine), 100 epochs, batch 4 per GPU, AMP,
loss weights 1 / 0.05 / 1, lambda 0.5, "Separate, last 2" distillation with cosine distance,
max-pooled CLS distillation and the diffusion head. Presets under ``hilda/configs/`` only change
what differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from hilda.engine.augment import AugmentConfig
from hilda.engine.metrics import require_tensorboard
from hilda.errors import ConfigError
from hilda.models.diffusion import DiffusionConfig
from hilda.models.heads import HeadConfig
from hilda.models.occupancy_heads import AlsoConfig
from hilda.models.student import STAGE_STRIDES, StudentConfig
from hilda.models.voxelize import VoxelConfig
from hilda.train.losses import LossWeights


@dataclass(frozen=True)
class DataConfig:
    # Group under teacher/; None = the store's only teacher (of ``teacher_arch`` if set).
    teacher: str | None = None
    teacher_arch: str | None = None  # e.g. "vits14": refuse a cache of another teacher
    # Move the t-1 sweep into the t0 LiDAR frame (ego-compensated, like the t+1 target), so
    # the fused BEV history of Sec. C.1 is spatially aligned.
    align_history: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Keep at most this many point-pixel pairs per image (a uniform random subset, drawn from
    # the sample's seed): an unbiased estimate of Eq. 1's per-image mean at a fraction of the
    # head's cost. None = every pair (the paper).
    max_pairs_per_image: int | None = None
    num_workers: int = 4  # DataLoader worker processes per rank (0 = in the main process)

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_pairs_per_image is not None and self.max_pairs_per_image < 1:
            raise ConfigError(
                f"data.max_pairs_per_image must be >= 1 (or null), got {self.max_pairs_per_image}"
            )


@dataclass(frozen=True)
class DistillPair:
    """Teacher blocks (offsets from the last block: 0 = Q_L, 1 = Q_{L-1}, ...) supervising
    student layer ``student`` (0 = F_L, 1 = F_{L-1}, ...). Several teacher blocks are
    concatenated into one target (Table 8's Aggregate and KR-style designs)."""

    teacher: tuple[int, ...] = (0,)
    student: int = 0

    def __post_init__(self) -> None:
        if not self.teacher or any(k < 0 for k in self.teacher):
            raise ConfigError(f"distill pair teacher offsets must be >= 0, got {self.teacher}")
        if not 0 <= self.student < len(STAGE_STRIDES):
            raise ConfigError(
                f"distill pair student layer must be in [0, {len(STAGE_STRIDES)}), "
                f"got {self.student}"
            )


SEPARATE_LAST2 = (DistillPair((0,), 0), DistillPair((1,), 1))


@dataclass(frozen=True)
class LossConfig:
    # Eq. 1 pairs; empty = no point-pixel distillation (Table 7 row a).
    distill: tuple[DistillPair, ...] = SEPARATE_LAST2
    distance: Literal["cosine", "l2", "kl"] = "cosine"  # Table 9
    cls: bool = True  # Eq. 2
    # Table 9: "max" (Eq. 2), "attention" (learnable), "mean", "per_image" (one student
    # token per camera frustum against that camera's CLS).
    cls_pooling: Literal["max", "attention", "mean", "per_image"] = "max"
    aux: Literal["diffusion", "simple", "also", "none"] = "diffusion"  # Table 9 decoders
    weights: LossWeights = field(default_factory=LossWeights)
    # Not in the paper (off in its presets): subtract each teacher block's mean feature at
    # the point-pixel pairs (per channel, over ``center_frames`` frames spread over the
    # cache) from the Eq. 1 targets. A randomly initialised ViT's patch features share one
    # dominant direction (cosine ~0.75 with their mean on the synthetic world), so the cosine
    # loss is met by predicting that constant and the student learns nothing that tells
    # points apart; centred targets keep only what differs. The tiny CPU preset turns it on.
    center_teacher: bool = False
    center_frames: int = 32


@dataclass(frozen=True)
class ModelConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    voxel: VoxelConfig = field(default_factory=VoxelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    also: AlsoConfig = field(default_factory=AlsoConfig)
    simple_hidden: int = 32  # Table 9's simple decoder width
    bev_grid: int = 512  # must equal the cache's occupancy grid
    bev_stride: int = 8  # voxels per BEV cell: 8 x 0.05 m = the cache's 0.4 m cell

    def __post_init__(self) -> None:
        for name in ("bev_grid", "bev_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 100
    max_steps: int | None = None  # stop (and size the schedule) at this many steps
    batch_size: int = 4  # samples per process; each sample is two sweeps (t-1, t0)
    lr: float = 1e-3  # OneCycle max lr
    weight_decay: float = 0.005
    betas: tuple[float, float] = (0.9, 0.999)
    pct_start: float = 0.04
    div_factor: float = 10.0
    final_div_factor: float = 100.0
    anneal: Literal["cos", "linear"] = "cos"
    grad_clip: float | None = None  # max global gradient norm
    amp: bool = True  # mixed precision on CUDA (on the CPU only with cpu_amp)
    amp_dtype: Literal["float16", "bfloat16"] = "float16"  # float16 runs with a grad scaler
    cpu_amp: bool = False  # autocast on the CPU too: tests of the AMP path (docs/training.md)

    def __post_init__(self) -> None:
        # Refused when the config is loaded, so `hilda-train check` refuses what `run` would.
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"optim.max_steps must be >= 1 (or null), got {self.max_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not 0.0 < self.pct_start < 1.0:
            raise ConfigError(
                f"optim.lr must be finite and > 0 and optim.pct_start in (0, 1), got {self.lr}, "
                f"{self.pct_start}"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(
                f"optim.weight_decay must be finite and >= 0, got {self.weight_decay}"
            )
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must each be in [0, 1), got {list(self.betas)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"optim.grad_clip must be > 0 (or null), got {self.grad_clip}")


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    deterministic: bool = False  # deterministic kernels (CPU resume checks)
    sync_bn: bool = True  # synchronise BatchNorm statistics across DDP processes
    checkpoint_every: int = 1000  # steps
    log_every: int = 10  # steps
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        if self.tensorboard:
            require_tensorboard("run.tensorboard")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if not self.loss.distill and not self.loss.cls and self.loss.aux == "none":
            raise ConfigError("the config trains nothing: no distillation, CLS or aux loss")
        if self.loss.cls_pooling == "per_image" and not self.loss.cls:
            raise ConfigError("loss.cls_pooling=per_image needs loss.cls=true")

    @property
    def teacher_offsets(self) -> tuple[int, ...]:
        """Every teacher block offset the losses read (0 = last block)."""
        offsets = {k for pair in self.loss.distill for k in pair.teacher}
        return tuple(sorted(offsets))

    @property
    def needs_teacher(self) -> bool:
        """Eq. 1 or Eq. 2 is on: the cache must hold pointmaps and teacher features."""
        return bool(self.loss.distill) or self.loss.cls

    @property
    def needs_occupancy(self) -> bool:
        """The aux head learns the t+1 BEV occupancy (diffusion or the simple decoder); ALSO
        queries the t0 sweep itself."""
        return self.loss.aux in ("diffusion", "simple")
