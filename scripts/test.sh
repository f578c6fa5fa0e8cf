#!/usr/bin/env bash
# The test suite: set up (idempotent), lint, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "[test] ruff check + ruff format --check"
.venv/bin/ruff check hilda tests benchmarks
.venv/bin/ruff format --check hilda tests benchmarks
echo "[test] pytest"
.venv/bin/python -m pytest "$@"
