"""mIoU and RankMe against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hilda.engine.optim import build_scheduler
from hilda.eval.config import SegOptimConfig
from hilda.eval.metrics import confusion, iou_per_class, mean_iou, rankme


def test_confusion_and_iou_by_hand() -> None:
    label = np.array([0, 0, 1, 1, 2, 255, 255])
    pred = np.array([0, 1, 1, 1, 0, 2, 0])
    conf = confusion(pred, label, num_classes=4, ignore=255)
    want = np.zeros((4, 4), int)
    want[0, 0], want[0, 1], want[1, 1], want[2, 0] = 1, 1, 2, 1
    np.testing.assert_array_equal(conf, want)
    iou = iou_per_class(conf)
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3;
    # class 2: TP 0, FN 1 -> 0; class 3: absent everywhere -> no IoU.
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 0.0])
    assert math.isnan(iou[3])
    assert mean_iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


def test_confusion_accumulates_and_checks_ranges() -> None:
    a = confusion(np.array([0, 1]), np.array([0, 1]), 2, ignore=-1)
    b = confusion(np.array([1]), np.array([0]), 2, ignore=-1)
    assert mean_iou(a + b) == pytest.approx((1 / 2 + 1 / 2) / 2)
    with pytest.raises(ValueError, match="labels outside"):
        confusion(np.array([0]), np.array([5]), 2, ignore=-1)
    with pytest.raises(ValueError, match="differ"):
        confusion(np.array([0, 1]), np.array([0]), 2, ignore=-1)


def test_rankme_by_hand() -> None:
    # Singular values 3, 1 -> p = (0.75, 0.25): exp(-(0.75 ln 0.75 + 0.25 ln 0.25)).
    z = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    want = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert rankme(z) == pytest.approx(want, rel=1e-5)
    # Equal singular values: full rank; rank one: 1.
    assert rankme(torch.eye(8)) == pytest.approx(8.0, rel=1e-5)
    v = torch.randn(100, 1)
    assert rankme(v @ torch.randn(1, 16)) == pytest.approx(1.0, abs=1e-4)
    # Rotation-invariant.
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    x = torch.randn(200, 16, dtype=torch.float64)
    assert rankme(x @ q) == pytest.approx(rankme(x), rel=1e-9)


@pytest.mark.parametrize(("total", "pct"), [(5, 0.2), (10, 0.1), (4, 0.2), (1, 0.2), (1, 1.0)])
def test_one_cycle_schedules_of_any_length(total: int, pct: float) -> None:
    """torch's OneCycleLR divides by zero when pct_start x total == 1; build_scheduler's
    schedules rise to at most the group's lr and end low whatever the length."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [param], "lr": 1e-3}])
    settings = SegOptimConfig(pct_start=pct)
    scheduler = build_scheduler(optimizer, total, settings)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) <= 1e-3 * (1 + 1e-9) and len(lrs) == total
    if total > 2:
        assert lrs[-1] < max(lrs)
        if pct * total >= 1:  # at least one warm-up step (shorter: torch starts at the peak)
            assert lrs[0] < max(lrs)
