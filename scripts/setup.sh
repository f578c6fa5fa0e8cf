#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with hilda and its dependencies.
# Re-running it is cheap: it reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP=$VENV/.hilda-setup-stamp
want=$(cat pyproject.toml scripts/setup.sh scripts/build_sparse.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup] .venv is up to date (delete .venv/.hilda-setup-stamp to force a reinstall)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
# torch 2.13.0 from the configured package index: on Linux from PyPI that is the CUDA build
# (several GB, runs on the CPU too). HILDA_TORCH=cpu takes the CPU-only build from PyTorch's
# CPU index instead; HILDA_TORCH_SPEC replaces the whole requirement (e.g. another CUDA).
case "${HILDA_TORCH:-default}" in
  cpu) TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" ;;
  default) TORCH_SPEC="torch==2.13.0" ;;
  *) echo "[setup] HILDA_TORCH must be cpu or unset, got '$HILDA_TORCH'" >&2; exit 2 ;;
esac
TORCH_SPEC=${HILDA_TORCH_SPEC:-$TORCH_SPEC}
echo "[setup] installing torch ($TORCH_SPEC)"
$PIP install -q $TORCH_SPEC
echo "[setup] installing hilda (editable) with its dependencies and the dev tools"
$PIP install -q -e ".[dev]"
echo "[setup] sparse libraries: MinkowskiEngine, torch-scatter, spconv (built once, then cached)"
VENV=$VENV bash scripts/build_sparse.sh
$VENV/bin/python -c "import hilda, nuscenes, av2, zarr, dask.distributed, torch_scatter; print('[setup] ok: hilda', hilda.__version__, '| zarr', zarr.__version__)"
echo "$want" > "$STAMP"
