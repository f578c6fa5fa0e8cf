"""DDP plumbing: process-group set-up from torchrun's environment, BatchNorm synchronisation
and losses normalised over the global batch.

Two processes with B samples each must train like one process with 2B samples. DDP averages
gradients over processes, so each process's loss is its share of the *global* mean
(``global_mean``), and BatchNorm statistics are computed over the global batch: torch's
SyncBatchNorm on CUDA; on CPU, where torch's SyncBatchNorm refuses to run, ``CpuSyncBatchNorm``
all-reduces the sums itself (gloo, differentiable through ``torch.distributed.nn``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hilda.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def device_type(name: str) -> str:
    """``run.device`` (auto | cpu | cuda) -> "cpu" or "cuda"."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pick_device(name: str, world: World) -> torch.device:
    name = device_type(name)
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("run.device=cuda but torch sees no CUDA device")
        return torch.device("cuda", world.local_rank)
    if name != "cpu":
        raise ConfigError(f"run.device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def init_distributed(device_type: str) -> World:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK), if any:
    NCCL on CUDA, gloo on CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return World(rank, size, local)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def main_process() -> bool:
    """Whether this process writes shared outputs: rank 0, or the only process (before the
    process group is joined, torchrun's ``RANK`` says)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process (what the main one wrote is then visible to all)."""
    if _active():
        dist.barrier()


def close_process_group() -> None:
    """Leave the process group a command joined (its end under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """This process's share of the mean of ``values`` (n,) over all processes: the local sum
    times world / global count, so DDP's gradient average is the global mean's gradient."""
    if not _active():
        return values.mean() if len(values) else values.sum() * 0.0
    count = torch.tensor([float(len(values))], device=values.device)
    dist.all_reduce(count)
    world = dist.get_world_size()
    return values.sum() * world / count.clamp(min=1.0)[0]


def reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over processes of a detached scalar (for logging)."""
    value = value.detach().float().clone()
    if _active():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


class CpuSyncBatchNorm(nn.BatchNorm1d):
    """BatchNorm over (M, C) features with statistics of the global batch, for CPU + gloo.
    Same parameters and buffers as nn.BatchNorm1d, so checkpoints are interchangeable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _active()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        local = torch.cat(
            [xf.sum(0), xf.square().sum(0), xf.new_tensor([float(len(xf))])]
        )  # (2C + 1,)
        total = all_reduce(local)  # differentiable sum over processes
        c = x.shape[1]
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean.square()).clamp(min=0.0)  # biased, as BN normalises
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = (
                self.momentum
                if self.momentum is not None
                else 1.0 / float(self.num_batches_tracked)
            )
            unbiased = var * n / (n - 1).clamp(min=1.0)
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * unbiased)
        out = (xf - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)


def sync_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """Replace every BatchNorm1d (the sparse backends' ``.bn``) with its synchronised form."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm1d:
            sync = CpuSyncBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync)
        else:
            sync_batchnorm(child, device_type)
    return model
