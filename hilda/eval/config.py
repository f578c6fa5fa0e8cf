"""Downstream segmentation configuration: typed, frozen dataclasses (YAML + ``--set``).

Protocol (HilDA Sec. 4.1, C.2, D.1): a BatchNorm1d + Linear head on the backbone's final point
features, cross-entropy on the dataset's evaluation classes (16 nuScenes-lidarseg classes, 19
SemanticKITTI classes, 22 Waymo classes; the rest ignored), mIoU and per-class IoU on the
validation frames.
Linear probing freezes the backbone; fine-tuning trains everything on a fraction of the
labelled training frames (1, 5, 10, 25, 100% of nuScenes and 1% of SemanticKITTI in Table 1).
The paper gives no optimiser for these runs; the defaults are the downstream schedule of the
SLidR / SuperFlow code base that most camera-LiDAR distillation papers report with: AdamW
(lr 1e-3, the head at 10x, weight decay 0.01), OneCycle (pct_start 0.2, div 25, final div
100), 100 epochs, 16 frames a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from hilda.datasets.labelled import labelled_dataset
from hilda.engine.augment import AugmentConfig
from hilda.engine.metrics import require_tensorboard
from hilda.errors import ConfigError


@dataclass(frozen=True)
class SegDataConfig:
    dataset: str = "nuscenes"  # a name of the registry (hilda.datasets.labelled.DATASETS)
    root: str = ""  # the dataset's root folder
    version: str | None = None  # a release version (nuScenes'); None: the dataset's default
    train_split: str | None = None
    val_split: str | None = None
    # Labelled training frames used (Table 1's label fractions), chosen by ``subset``.
    fraction: float = 1.0
    # How a fraction picks its frames (hilda.eval.data.subset_frames), k = round(1/fraction):
    # "scenes": the k-th, 2k-th, ... scene of the split in table order with all its keyframes
    #   (SLidR's nuScenes protocol: 1% = 7 of the 700 train scenes);
    # "frames": every k-th frame in split order (SemanticKITTI's 1% in SLidR and ScaLR,
    #   sorted(scan paths)[::100]; an evenly spaced subset when the fraction is not 1/k);
    # "file": the frames ``subset_file`` lists (lidar tokens or sweep file names, one a line,
    #   or a .npy of them, e.g. ScaLR's lists);
    # "auto": the dataset's own rule ("scenes" on nuScenes and the synthetic world, "frames"
    #   on SemanticKITTI and Waymo).
    subset: Literal["auto", "scenes", "frames", "file"] = "auto"
    subset_file: str | None = None
    max_val_frames: int | None = None  # evaluate on an evenly spaced subset (quick checks)
    num_workers: int = 2  # DataLoader worker processes reading sweeps and labels

    def __post_init__(self) -> None:
        ds = labelled_dataset(self.dataset)  # a ConfigError naming the registered ones
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"data.fraction must be in (0, 1], got {self.fraction}")
        if self.version is not None and not ds.versions:
            raise ConfigError(
                f"data.version is a nuScenes setting (its release); {ds.label} has none"
            )
        if self.subset not in ("auto", "scenes", "frames", "file"):
            raise ConfigError(
                f"data.subset must be auto, scenes, frames or file, got {self.subset!r}"
            )
        if (self.subset == "file") != (self.subset_file is not None):
            raise ConfigError("data.subset=file and data.subset_file go together")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")

    @property
    def subset_rule(self) -> str:
        """The subset rule in force: ``subset`` with "auto" resolved for the dataset."""
        if self.subset != "auto":
            return self.subset
        return labelled_dataset(self.dataset).default_subset

    def resolved(self) -> tuple[str | None, str, str]:
        """(version (None for a dataset without versions), train split, val split): the
        dataset's defaults, a named version's own splits, the config's own splits."""
        ds = labelled_dataset(self.dataset)
        version, train, val = ds.default_splits
        if self.version is not None:
            version = self.version
            train, val = ds.versions.get(version, (train, val))
        return (version, self.train_split or train, self.val_split or val)


@dataclass(frozen=True)
class SegOptimConfig:
    epochs: int = 100
    max_steps: int | None = None  # stop (and size the schedule) at this many steps
    batch_size: int = 16  # frames a step
    lr: float = 1e-3  # backbone's OneCycle max lr (fine-tuning)
    head_lr_mult: float = 10.0  # the head's lr = lr x this
    weight_decay: float = 0.01
    pct_start: float = 0.2
    div_factor: float = 25.0
    final_div_factor: float = 100.0
    grad_clip: float | None = None  # max global gradient norm
    # Mixed precision on CUDA (on the CPU only with cpu_amp): float16 with a grad scaler, or
    # bfloat16.
    amp: bool = True
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    cpu_amp: bool = False  # autocast on the CPU too: tests of the AMP path

    def __post_init__(self) -> None:
        for name in ("lr", "head_lr_mult"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"optim.{name} must be finite and > 0, got {value}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(
                f"optim.epochs and optim.batch_size must be >= 1, got {self.epochs}, "
                f"{self.batch_size}"
            )
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise ConfigError(f"optim.amp_dtype must be float16 or bfloat16, got {self.amp_dtype}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"optim.grad_clip must be > 0 (or null), got {self.grad_clip}")


@dataclass(frozen=True)
class SegConfig:
    mode: Literal["linear", "finetune"] = "linear"
    data: SegDataConfig = field(default_factory=SegDataConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Linear probing without augmentation: compute the frozen backbone's features of each
    # training frame once and train the head on them (the same result as recomputing them
    # every epoch, an epoch then costs a head pass). Needs the features of every training
    # frame in memory (float16: N points x C x 2 bytes per frame).
    cache_features: bool = False
    seed: int = 0
    # The backbone's voxel size, for a checkpoint that records none (hilda's exports record
    # theirs; a checkpoint without one is refused rather than fed voxels of a guessed size).
    voxel_size: float | None = None
    # One thread and deterministic kernels: a run equals the next, bit for bit (tests; slower).
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10  # steps (the loss curve, <result>.metrics.jsonl)
    # TensorBoard of the run in <result>.tb/ (off by default: a table would write one per
    # entry; on to watch a long fine-tune).
    tensorboard: bool = False
    # Steps between checkpoints of a run in progress (<result>.partial.pt; 0: none). Rerunning
    # the same command resumes from the last one; the finished result removes it.
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        if self.mode not in ("linear", "finetune"):
            raise ConfigError(f"mode must be 'linear' or 'finetune', got {self.mode!r}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.log_every < 1:
            raise ConfigError(f"log_every must be >= 1, got {self.log_every}")
        if self.voxel_size is not None and not self.voxel_size > 0:
            raise ConfigError(f"voxel_size must be > 0 (or null), got {self.voxel_size}")
        if self.tensorboard:
            require_tensorboard("tensorboard")
        if self.cache_features and (self.mode != "linear" or self.augment.enabled):
            raise ConfigError(
                "cache_features needs mode=linear and augment.enabled=false: cached features "
                "are those of the unaugmented frames under a frozen backbone"
            )


# Keys that change how a run goes, not what it measures: a result or a partial run is reused
# (hilda-eval table, resume) whatever they were.
OPERATIONAL_KEYS = ("data.num_workers", "device", "log_every", "checkpoint_every", "tensorboard")


def protocol(config: dict) -> dict:
    """A config's plain mapping (``to_dict``) without the ``OPERATIONAL_KEYS``."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for key in OPERATIONAL_KEYS:
        *sections, name = key.split(".")
        node = out
        for section in sections:
            node = node.get(section, {})
        node.pop(name, None)
    return out
