"""The metrics log of a run: JSON lines (one per logged step) and TensorBoard, written by the
main process, cut back to the resume point when a run continues. Pre-training writes
``OUT/metrics.jsonl`` and ``OUT/tb/``; an evaluation run ``<result>.metrics.jsonl`` (and
``<result>.tb/`` with ``tensorboard=true``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from hilda.errors import ConfigError


def require_tensorboard(key: str) -> None:
    """Refuse ``key=true`` when the tensorboard package is missing: at config time, not as a
    line in a log after the run started."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            f"{key}=true but the tensorboard package is not installed: pip install "
            f"tensorboard, or set {key}=false (metrics.jsonl is written either way)"
        )


class MetricsLog:
    """JSON lines at ``path`` (+ TensorBoard in ``tensorboard``, a folder) on the main
    process; ``resume_step`` < 0 starts afresh, else lines past it are dropped."""

    def __init__(
        self, path: Path, enabled: bool, tensorboard: Path | None, resume_step: int
    ) -> None:
        self.path = path
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step >= 0 and self.path.exists():  # drop lines past the resume point
            keep = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(f"{line}\n" for line in keep))
        elif resume_step < 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        if tensorboard is not None:
            require_tensorboard("tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard), purge_step=max(resume_step, 0) + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch", "time"):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
