"""The one epoch loop every hilda fit runs (pre-training and every ``hilda-eval`` fit): from
the ``Fit``'s position to its last step, one batch a step, with the engine's non-finite
policy, the metrics log, progress, and the caller's checkpoint every ``checkpoint_every``
steps and after the last.

The caller gives what differs between fits: the batches of an epoch from a position
(``batches(epoch, batches_done)``), the loss of one batch (``loss_of(batch) -> StepLoss``,
run under the fit's autocast) and what a checkpoint saves (``save()``).

Non-finite policy (one for every fit, so no run trains on silently):
- without a grad scaler (float32, or bfloat16 autocast) a non-finite loss stops the run
  before its optimiser step, so the last checkpoint written holds the last good weights;
- with float16's grad scaler an overflowing step is skipped by the scaler and the scale
  backs off, which is its normal working; ``MAX_SKIPPED`` skipped steps in a row is no longer
  an overflow the scale can absorb (from its initial 2^16 the scale is then 1: the unscaled
  gradients themselves are non-finite), and stops the run.
Either error names the step, the frames and every loss term.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from hilda.engine.distributed import reduce_mean
from hilda.engine.fit import Fit
from hilda.engine.metrics import MetricsLog
from hilda.errors import HildaError

MAX_SKIPPED = 16  # consecutive fp16 steps the grad scaler may skip before the run stops


class NonFiniteLoss(HildaError):
    """A fit's loss (or float16 gradients, step after step) is no longer finite."""


@dataclass(frozen=True)
class StepLoss:
    """One batch's loss and what an error or the log says of it."""

    loss: torch.Tensor  # () the scalar the step minimises
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # its named parts, () each
    frames: str = ""  # the batch's frames, for errors
    samples: int = 1  # samples in the batch (all processes), for the throughput


@dataclass(frozen=True)
class LoopSettings:
    label: str  # progress and plain-log prefix ("train", "linear", "finetune")
    log_every: int
    checkpoint_every: int  # 0: only after the last step


@dataclass
class _SkipCounter:
    """Consecutive optimiser steps the fp16 grad scaler skipped."""

    run: int = 0

    def after(self, fit: Fit, scale_before: float | None) -> None:
        """Count the step just taken if the scaler skipped it (its scale backed off)."""
        if scale_before is not None:
            self.run = self.run + 1 if fit.scaler.get_scale() < scale_before else 0


def describe(out: StepLoss, values: dict[str, float]) -> str:
    terms = ", ".join(f"{k} {v:.6g}" for k, v in values.items())
    return f"frames {out.frames or '?'}; terms: {terms}"


def _values(out: StepLoss) -> dict[str, float]:
    """Global means of the loss and its terms (every process takes part)."""
    values = {k: float(reduce_mean(v)) for k, v in out.terms.items()}
    values["loss"] = float(reduce_mean(out.loss))
    return values


def engine_step(fit: Fit, out: StepLoss, counter: _SkipCounter) -> dict[str, float]:
    """The policy around one ``Fit.update``: refuse a non-finite loss where no scaler skips
    it, count the scaler's skips where one does; returns the step's global means."""
    values = _values(out)
    step = fit.step + 1
    if not fit.scaler.is_enabled() and not math.isfinite(values["loss"]):
        raise NonFiniteLoss(
            f"non-finite loss {values['loss']} at step {step} (epoch {fit.epoch}): "
            f"{describe(out, values)}; the run stopped before this step's update, its last "
            "checkpoint is intact"
        )
    scale = fit.scaler.get_scale() if fit.scaler.is_enabled() else None
    fit.update(out.loss)
    counter.after(fit, scale)
    if counter.run >= MAX_SKIPPED:
        raise NonFiniteLoss(
            f"the float16 grad scaler skipped {counter.run} steps in a row up to step {step} "
            f"(epoch {fit.epoch}; scale now {fit.scaler.get_scale():g}): the gradients are "
            f"non-finite at any scale. Last step: {describe(out, values)}; the weights are "
            "those of the last good step and its checkpoint is intact"
        )
    return values


def run_loop(
    fit: Fit,
    batches: Callable[[int, int], Iterable[Any]],
    loss_of: Callable[[Any], StepLoss],
    settings: LoopSettings,
    *,
    console: Console,
    log: MetricsLog | None = None,
    save: Callable[[], None] | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train from ``fit``'s position to its last step (see the module doc); returns the last
    step's record. ``on_log`` sees every logged record (every ``log_every`` steps and the
    last), before ``save`` runs on a checkpoint step."""
    record: dict[str, float] = {}
    counter = _SkipCounter()
    progress = Progress(
        TextColumn(f"[bold]{settings.label}[/] epoch {{task.fields[epoch]}}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not (console.is_terminal and fit.world.main),
    )
    with progress:
        task = progress.add_task(
            settings.label, total=fit.total, completed=fit.step, epoch=fit.epoch, status=""
        )
        for epoch, done in fit.epochs():
            epoch_batches = batches(epoch, done)
            tick, seen = time.perf_counter(), 0
            for batch in epoch_batches:
                with fit.autocast():
                    out = loss_of(batch)
                values = engine_step(fit, out, counter)
                seen += out.samples
                rate = seen / max(time.perf_counter() - tick, 1e-9)
                record = {"step": fit.step, "epoch": epoch, "lr": fit.lr, **values}
                record |= {"samples_per_s": rate, "time": time.time()}
                status = _status(record)
                if fit.step % settings.log_every == 0 or fit.done:
                    _log(settings, fit, record, status, log, console, on_log)
                progress.update(task, completed=fit.step, epoch=epoch, status=status)
                every = settings.checkpoint_every
                if save is not None and ((every and fit.step % every == 0) or fit.done):
                    save()  # the last step too: a failure after the fit keeps its weights
                if fit.done:
                    break
            if hasattr(epoch_batches, "close"):
                epoch_batches.close()  # stops a DataLoader mid-epoch (its workers) now
    return record


def _status(record: dict[str, float]) -> str:
    skip = ("step", "epoch", "lr", "samples_per_s", "time")
    terms = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in skip)
    return f"{terms} | {record['samples_per_s']:.2f} samples/s"


def _log(
    settings: LoopSettings,
    fit: Fit,
    record: dict[str, float],
    status: str,
    log: MetricsLog | None,
    console: Console,
    on_log: Callable[[dict[str, float]], None] | None,
) -> None:
    if log is not None:
        log.write(record)
    if on_log is not None:
        on_log(record)
    if fit.world.main and not console.is_terminal:  # CI logs: a plain line
        console.print(
            f"{settings.label} step {fit.step}/{fit.total} epoch {record['epoch']} {status}"
        )
