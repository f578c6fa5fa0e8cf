"""Checkpoints of a segmentation run in progress, so an interrupted fine-tune (a 100% nuScenes
fine-tune runs for hours) resumes where it stopped instead of from its first step.

``<result>.partial.pt`` beside the result JSON holds the steps done, the loss curve, the
trained weights (the head alone when the backbone is frozen), the optimiser and the schedule,
and what the run measures (its protocol config, the checkpoint's SHA-256, the init). Batches
and augmentations are seeded by (seed, epoch, index), so a resumed run takes the same steps
as an uninterrupted one. A partial run of another protocol or checkpoint is an error naming
the file; the finished result removes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hilda.atomic import atomic_write
from hilda.errors import HildaError
from hilda.eval.config import protocol
from hilda.eval.segment import Segmenter


@dataclass
class FitState:
    """Where a run stands: optimiser steps done and the loss curve so far."""

    step: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)


def partial_path(result: str | Path) -> Path:
    """``x.json`` -> ``x.partial.pt``."""
    result = Path(result)
    return result.with_name(f"{result.name.removesuffix('.json')}.partial.pt")


@dataclass(frozen=True)
class PartialRun:
    path: Path
    config: dict  # to_dict of the run's SegConfig
    backbone_sha256: str
    init: str

    def _identity(self) -> dict:
        return {
            "protocol": protocol(self.config),
            "backbone_sha256": self.backbone_sha256,
            "init": self.init,
        }

    def load(
        self,
        model: Segmenter,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> FitState:
        """Restore the run's last checkpoint into ``model``, ``optimizer`` and ``scheduler``;
        a fresh FitState when there is none."""
        if not self.path.exists():
            return FitState()
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file: say which, keep it for inspection
            raise HildaError(
                f"{self.path} is not a readable partial run ({exc}): remove it to start afresh"
            ) from None
        if state.get("identity") != self._identity():
            raise HildaError(
                f"{self.path} is a partial run of another config, checkpoint or init: remove "
                "it to start this run afresh, or rerun the command that started it"
            )
        target = model.head if model.frozen else model
        target.load_state_dict(state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return FitState(state["step"], [tuple(p) for p in state["curve"]])

    def save(
        self,
        fit: FitState,
        model: Segmenter,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> None:
        """Write the checkpoint atomically (a kill mid-write leaves the previous one)."""
        weights = (model.head if model.frozen else model).state_dict()
        state = {
            "identity": self._identity(),
            "step": fit.step,
            "curve": [list(p) for p in fit.curve],
            "weights": weights,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
