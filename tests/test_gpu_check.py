"""``benchmarks/gpu_check.py`` on a machine without CUDA: it runs, says for every part that it
is skipped and why, writes its JSON and exits non-zero (nothing was checked); a failed part
makes it exit 1 whatever else passed (the GPU figures themselves come from a CUDA machine)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, whatever the machine has
    run = subprocess.run(
        [sys.executable, SCRIPT, "--json", out, "--quick", "--budget-s", "300"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 3, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["device"].startswith("no CUDA") and report["exit_code"] == 3
    parts = {r["part"].split()[0] for r in report["rows"]}
    assert parts == {"1", "2", "3", "4"}
    assert all(r["status"] == "needs CUDA" for r in report["rows"]), report["rows"]
    assert run.stdout.count(": SKIP needs CUDA") == len(report["rows"])


def test_gpu_check_verdicts_and_exit_codes() -> None:
    gpu = _module()
    passed = gpu.Row("1 teacher forward", "vits14 sdpa", "100 img/s")
    failed = gpu.Row("3 PTv3 fwd+bwd AMP", "spconv", "-", "failed: CUDA error: out of memory")
    skipped = gpu.Row("1 teacher forward", "vits14 xformers", "-", "needs xformers")
    assert passed.verdict == "PASS"
    assert failed.verdict == "FAIL CUDA error: out of memory"
    assert skipped.verdict == "SKIP needs xformers"
    assert gpu.exit_code([passed, skipped]) == 0
    assert gpu.exit_code([passed, failed, skipped]) == 1
    assert gpu.exit_code([skipped]) == 3


def test_gpu_check_budget_skips_parts_it_cannot_start(monkeypatch) -> None:
    gpu = _module()
    calls = []

    def slow(quick: bool) -> list:
        calls.append("slow")
        return [gpu.Row("1 slow", "x", "1", "ok")]

    monkeypatch.setattr(gpu, "PARTS", (slow, slow))
    rows = gpu.run_parts(quick=True, budget_s=0.0)
    assert calls == [] and all(r.verdict.startswith("SKIP budget spent") for r in rows)
    rows = gpu.run_parts(quick=True, budget_s=None)
    assert calls == ["slow", "slow"] and gpu.exit_code(rows) == 0
