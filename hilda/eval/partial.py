"""Checkpoints of a segmentation run in progress, so an interrupted fine-tune (a 100% nuScenes
fine-tune runs for hours) resumes where it stopped instead of from its first step.

``<result>.partial.pt`` beside the result JSON is a checkpoint of the fitting engine
(``hilda.engine.checkpoint``, the format pre-training writes): the trained module's weights
(the head alone when the backbone is frozen), optimiser, schedule, grad scaler, RNG states and
position, plus the loss curve so far and what the run measures (its protocol config, the
checkpoint's SHA-256, the init). The one before the newest is kept as
``<result>.partial.previous.pt`` and used when the newest is damaged. Batches and
augmentations are seeded by (seed, epoch, index), so a resumed run takes the same steps as an
uninterrupted one. A partial run of another protocol or checkpoint is an error naming the
file; the finished result removes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from hilda.engine.checkpoint import load_latest_checkpoint, previous_path, save_checkpoint
from hilda.engine.fit import Fit
from hilda.errors import HildaError
from hilda.eval.config import protocol


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

    def exists(self) -> bool:
        return self.path.exists() or previous_path(self.path).exists()

    def load(self, fit: Fit, console: Console) -> list[tuple[int, float]]:
        """Restore the run's last checkpoint into ``fit`` and return the loss curve so far
        (empty, and ``fit`` untouched, when there is none)."""
        if not self.exists():
            return []

        def warn(text: str) -> None:
            console.print(f"[yellow]warning[/]: {text}")

        try:
            blob, path = load_latest_checkpoint(self.path, warn)
        except HildaError as exc:  # a torn or foreign file: say which, keep it for inspection
            raise HildaError(f"{exc}: remove {self.path} to start this run afresh") from None
        if blob.get("identity") != self._identity():
            raise HildaError(
                f"{path} is a partial run of another config, checkpoint or init: remove it to "
                "start this run afresh, or rerun the command that started it"
            )
        fit.load(blob)
        return [(int(s), float(v)) for s, v in blob["curve"]]

    def save(self, fit: Fit, curve: list[tuple[int, float]]) -> None:
        """Write the checkpoint atomically (a kill mid-write leaves the previous one)."""
        extra = {"identity": self._identity(), "curve": [list(p) for p in curve]}
        save_checkpoint(self.path, {**fit.state(), **extra})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        previous_path(self.path).unlink(missing_ok=True)
