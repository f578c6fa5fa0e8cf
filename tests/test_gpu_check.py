"""``benchmarks/gpu_check.py`` on a machine without CUDA: it runs, says for every part what it
needs, writes its JSON and exits 0 (the GPU figures themselves come from a CUDA machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, whatever the machine has
    run = subprocess.run(
        [sys.executable, SCRIPT, "--json", out, "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["device"].startswith("no CUDA")
    parts = {r["part"].split()[0] for r in report["rows"]}
    assert parts == {"1", "2", "3", "4"}
    assert all(r["status"] == "needs CUDA" for r in report["rows"]), report["rows"]
    assert run.stdout.count("needs CUDA") == len(report["rows"])
