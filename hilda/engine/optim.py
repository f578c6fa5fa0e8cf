"""The optimiser and schedule every hilda run uses (pre-training, linear probes, fine-tunes,
the teacher probe): AdamW over parameter groups, each with its own peak learning rate, and a
OneCycle schedule stepped once per optimiser step."""

from __future__ import annotations

import math
from typing import Protocol

import torch

from hilda.errors import ConfigError


def build_optimizer(
    groups: list[dict], weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over ``groups`` ({"params": ..., "lr": peak lr}); OneCycle sets the lr itself."""
    return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay)


class OneCycleSettings(Protocol):
    """The schedule fields of a config's ``optim`` section (trainer and evaluation alike)."""

    pct_start: float
    div_factor: float
    final_div_factor: float


def build_scheduler(
    optimizer: torch.optim.Optimizer, total: int, o: OneCycleSettings
) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycle over ``total`` steps peaking at each group's ``lr`` (cosine unless the
    settings have ``anneal``)."""
    pct_start = o.pct_start
    if math.isclose(pct_start * total, 1.0):
        # torch ends the warm-up at step pct_start x total - 1 and divides by that: 0 here
        # (e.g. 5 steps at 0.2) raises ZeroDivisionError. A hair off keeps the schedule.
        pct_start *= 1.0 + 1e-6 if pct_start < 1.0 else 1.0 - 1e-6
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=total,
        pct_start=pct_start,
        anneal_strategy=getattr(o, "anneal", "cos"),
        div_factor=o.div_factor,
        final_div_factor=o.final_div_factor,
    )


def total_steps(epochs: int, steps_per_epoch: int, max_steps: int | None) -> int:
    """``epochs`` x ``steps_per_epoch``, capped at ``max_steps``; at least one step."""
    total = epochs * steps_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    if total < 1:
        raise ConfigError("the run has no steps: raise optim.epochs or optim.max_steps")
    return total


def steps_per_epoch(samples: int, batch_size: int) -> int:
    """Optimiser steps of one pass over ``samples`` in batches of at most ``batch_size``."""
    return math.ceil(samples / min(batch_size, samples))
