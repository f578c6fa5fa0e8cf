"""The engine's one epoch loop and its non-finite policy, on a small regression: a NaN under
float32 or bfloat16 autocast (on the CPU, asked for with cpu_amp) stops the fit before its
update with the step, frames and terms named; under float16's grad scaler a single overflow
is skipped and the fit goes on, a NaN that persists stops it; a clean bf16 fit learns."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from rich.console import Console
from torch import nn

from hilda.engine.distributed import World
from hilda.engine.fit import Fit
from hilda.engine.loop import MAX_SKIPPED, LoopSettings, NonFiniteLoss, StepLoss, run_loop


@dataclass(frozen=True)
class Optim:
    weight_decay: float = 0.0
    pct_start: float = 0.1
    div_factor: float = 1.0
    final_div_factor: float = 1.0
    amp: bool = False
    amp_dtype: str = "float16"
    cpu_amp: bool = False
    grad_clip: float | None = None
    anneal: str = "cos"


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)  # (N, 8)
    return x, x @ torch.randn(8, 1, generator=g)  # (N, 1)


def _fit(steps: int, **optim) -> Fit:
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    return Fit.build(
        model,
        lambda: [{"params": list(model.parameters()), "lr": 0.05}],
        Optim(**optim),
        world=World(),
        device=torch.device("cpu"),
        total=steps,
        per_epoch=4,
    )


def _run(fit: Fit, bad_steps: set[int], saved: list[int] | None = None) -> dict[str, float]:
    x, y = _data()

    def batches(epoch: int, done: int):
        for b in range(done, 4):
            yield b, x[16 * b : 16 * b + 16], y[16 * b : 16 * b + 16]

    def loss_of(batch) -> StepLoss:
        b, xb, yb = batch
        err = (fit.net(xb).float() - yb).square().mean()
        if fit.step + 1 in bad_steps:
            err = err * float("nan")
        return StepLoss(err, {"mse": err}, frames=f"rows {16 * b}-{16 * b + 15}", samples=16)

    save = (lambda: saved.append(fit.step)) if saved is not None else None
    settings = LoopSettings("test", log_every=1, checkpoint_every=1)
    return run_loop(fit, batches, loss_of, settings, console=Console(quiet=True), save=save)


@pytest.mark.parametrize(
    "optim", [{}, {"amp": True, "amp_dtype": "bfloat16", "cpu_amp": True}], ids=["fp32", "bf16"]
)
def test_a_nan_loss_stops_the_fit_before_its_update(optim: dict) -> None:
    fit, saved = _fit(12, **optim), []
    assert fit.amp == bool(optim) and not fit.scaler.is_enabled()
    with pytest.raises(NonFiniteLoss) as caught:
        _run(fit, {3}, saved)
    text = str(caught.value)
    assert "step 3 (epoch 0)" in text and "frames rows 32-47" in text and "mse nan" in text
    assert fit.step == 2 and saved == [1, 2]  # no update and no checkpoint of step 3


def test_bf16_autocast_runs_on_the_cpu_when_asked() -> None:
    fit = _fit(2, amp=True, amp_dtype="bfloat16", cpu_amp=True)
    with fit.autocast():
        assert fit.net(torch.randn(3, 8)).dtype == torch.bfloat16
    off = _fit(2, amp=True, amp_dtype="bfloat16")  # amp alone stays CUDA-only
    assert not off.amp
    with off.autocast():
        assert off.net(torch.randn(3, 8)).dtype == torch.float32


def test_a_clean_bf16_fit_learns() -> None:
    x, y = _data()
    fit = _fit(40, amp=True, amp_dtype="bfloat16", cpu_amp=True)
    with torch.no_grad():
        before = float((fit.net(x) - y).square().mean())
    record = _run(fit, set())
    with torch.no_grad():
        after = float((fit.net(x) - y).square().mean())
    assert fit.step == 40 and after < 0.2 * before, (before, after, record)


def test_fp16_scaler_skips_an_overflow_and_goes_on() -> None:
    fit = _fit(12, amp=True, amp_dtype="float16", cpu_amp=True)
    assert fit.scaler.is_enabled()
    _run(fit, {3, 7})  # two isolated bad steps: the scaler skips them
    assert fit.step == 12 and fit.scaler.get_scale() < 2.0**16


def test_fp16_a_nan_that_persists_stops_the_fit() -> None:
    fit = _fit(64, amp=True, amp_dtype="float16", cpu_amp=True)
    first_bad = 5
    with pytest.raises(NonFiniteLoss, match=f"skipped {MAX_SKIPPED} steps in a row") as caught:
        _run(fit, set(range(first_bad, 65)))
    assert fit.step == first_bad - 1 + MAX_SKIPPED
    assert "terms: mse nan" in str(caught.value) and "frames rows" in str(caught.value)
