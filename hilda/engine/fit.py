"""The fitting engine every hilda training goes through: pre-training (``hilda-train run``) and
every ``hilda-eval`` fit (linear probes, fine-tunes, the table, the teacher probe).

A ``Fit`` holds what an optimisation step changes and a checkpoint saves: the module (and
its DDP wrapper), AdamW with a OneCycle schedule, the AMP grad scaler, and the position
(step, epoch, batches done in the epoch). ``Fit.update(loss)`` is one step: backward
(scaled under fp16 AMP), optional gradient clipping, optimiser and schedule. ``Fit.state`` /
``Fit.load`` round-trip through ``hilda.engine.checkpoint``, so a run killed with -9 resumes
exactly where its last checkpoint stands. The caller owns its data and its loss: it draws
the epoch's batches from a ``ResumableSampler`` positioned at ``fit.batches_done``; the one
epoch loop over a ``Fit`` (autocast, the non-finite policy, logging, checkpoints) is
``hilda.engine.loop.run_loop``.

Under torchrun each process builds the same ``Fit``: BatchNorm is synchronised and the trained
module is wrapped in DistributedDataParallel; losses are the process's share of the global
mean (``hilda.engine.distributed.global_mean``), so N processes of B/N samples train like one
of B.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hilda.engine.checkpoint import set_rng_state
from hilda.engine.distributed import World, sync_batchnorm
from hilda.engine.optim import build_optimizer, build_scheduler


class FitSettings(Protocol):
    """The ``optim`` section fields the engine reads (pre-training's and evaluation's)."""

    weight_decay: float
    pct_start: float
    div_factor: float
    final_div_factor: float
    amp: bool  # autocast on CUDA (on the CPU only with cpu_amp)
    amp_dtype: str  # "float16" (with a grad scaler) or "bfloat16"
    cpu_amp: bool  # autocast on the CPU too (tests of the AMP path; slower than float32 there)
    grad_clip: float | None


def amp_dtype(name: str) -> torch.dtype:
    return torch.float16 if name == "float16" else torch.bfloat16


@dataclass
class Fit:
    """One training's optimisation state and position (see the module doc)."""

    module: nn.Module  # what ``state`` saves (the trained module, unwrapped)
    net: nn.Module  # the module called in a step: ``module`` or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    world: World
    device: torch.device
    total: int  # optimiser steps of the whole run
    per_epoch: int  # optimiser steps of one epoch
    amp: bool
    dtype: torch.dtype
    grad_clip: float | None
    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # optimiser steps done in ``epoch``

    @classmethod
    def build(
        cls,
        module: nn.Module,
        groups: Callable[[], list[dict[str, Any]]],
        optim: FitSettings,
        *,
        world: World,
        device: torch.device,
        total: int,
        per_epoch: int,
        sync_bn: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> Fit:
        """A fresh run of ``total`` steps over the parameter groups ``groups()`` returns
        ({"params", "lr": peak lr}) of ``module`` (already on ``device``). ``groups`` is
        called after BatchNorm synchronisation, which replaces BatchNorm modules and their
        parameters: groups listed before it would train the replaced ones."""
        if world.distributed and sync_bn:
            sync_batchnorm(module, device.type)
        net: nn.Module = module
        if world.distributed:
            ids = [device.index] if device.type == "cuda" else None
            net = DistributedDataParallel(module, device_ids=ids)
        optimizer = build_optimizer(groups(), optim.weight_decay, betas)
        scheduler = build_scheduler(optimizer, total, optim)
        amp = bool(optim.amp) and (device.type == "cuda" or bool(optim.cpu_amp))
        dtype = amp_dtype(optim.amp_dtype)
        scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
        return cls(
            module,
            net,
            optimizer,
            scheduler,
            scaler,
            world,
            device,
            total,
            per_epoch,
            amp,
            dtype,
            optim.grad_clip,
        )

    @property
    def done(self) -> bool:
        return self.step >= self.total

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward's autocast: AMP on the fit's device when the config asks for it (on the
        CPU only with ``cpu_amp``), else nothing."""
        if self.amp:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def update(self, loss: torch.Tensor) -> None:
        """One optimiser step on ``loss``: backward (scaled for fp16), clip, step, schedule;
        the position advances by one batch."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step, self.batches_done = self.step + 1, self.batches_done + 1

    def epochs(self) -> Iterator[tuple[int, int]]:
        """(epoch, batches already done in it) from the run's position until its last step;
        the caller runs the epoch's remaining batches through ``update``."""
        while not self.done:
            yield self.epoch, self.batches_done
            if self.batches_done >= self.per_epoch:
                self.epoch, self.batches_done = self.epoch + 1, 0
            elif not self.done:
                raise RuntimeError(
                    f"epoch {self.epoch} ended after {self.batches_done} of its {self.per_epoch} "
                    "steps: the loader yields fewer batches than the schedule counts"
                )

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state(self) -> dict[str, Any]:
        """The checkpoint after this step (positioned at the next epoch if this one ended);
        ``save_checkpoint`` adds the RNG states."""
        ended = self.batches_done >= self.per_epoch
        epoch, done = (self.epoch + 1, 0) if ended else (self.epoch, self.batches_done)
        return {
            "step": self.step,
            "epoch": epoch,
            "batches_done": done,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load(self, blob: dict[str, Any]) -> None:
        """Continue from a checkpoint written by ``state`` (weights, optimiser, schedule,
        scaler, RNG states, position)."""
        self.module.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        if blob.get("scaler"):
            self.scaler.load_state_dict(blob["scaler"])
        if "rng" in blob:
            set_rng_state(blob["rng"])
        self.step, self.epoch, self.batches_done = blob["step"], blob["epoch"], blob["batches_done"]
