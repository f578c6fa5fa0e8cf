#!/usr/bin/env bash
# Builds (once) and installs the compiled sparse libraries into .venv:
#   - MinkowskiEngine 0.5.4, CPU build against OpenBLAS (no wheel exists for current torch),
#   - torch-scatter 2.1.2 from source (no CPU wheel for torch 2.13 on PyPI),
#   - the spconv CPU wheel (forward on CPU; see hilda/models/sparse/spconv_ops.py).
# Built wheels are cached per torch version under $HILDA_WHEEL_CACHE (default
# ~/.cache/hilda/wheels), so a second set-up on the same machine installs in seconds instead
# of rebuilding for ~25 min. Called by scripts/setup.sh; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=$(pwd)
VENV=${VENV:-.venv}
PY="$ROOT/$VENV/bin/python"
PIP="$PY -m pip"
TORCH=$($PY -c "import torch; print(torch.__version__.replace('+', '_'))")
PYTAG=$($PY -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
CACHE=${HILDA_WHEEL_CACHE:-$HOME/.cache/hilda/wheels}/torch-$TORCH-$PYTAG
mkdir -p "$CACHE"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

ME_VERSION=0.5.4
# PyPI has only the sdist; pinned by hash because we fetch it without pip (pip's metadata step
# runs setup.py, which fails under setuptools >= 60 before any build option is parsed).
ME_URL=https://files.pythonhosted.org/packages/21/5c/c543c4bc5fbe73ac3e38465b3da4f24a61f7a4ac5baec867e582e94aa551/MinkowskiEngine-0.5.4.tar.gz
ME_SHA256=b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94

# Newest cached wheel of a project (names are normalised differently by setuptools versions).
cached() { find "$CACHE" -maxdepth 1 -iname "$1-*.whl" | sort | tail -1; }

have() { $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

need_openblas() {
  if [ -e /usr/include/x86_64-linux-gnu/cblas.h ] || [ -e /usr/include/cblas.h ] \
    || [ -e /usr/include/openblas/cblas.h ]; then
    return 0
  fi
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[sparse] installing libopenblas-dev (apt)"
    # A fresh container has no package lists: update them first.
    apt-get update -q >/dev/null
    apt-get install -y -q libopenblas-dev >/dev/null
  else
    echo "[sparse] MinkowskiEngine needs the OpenBLAS headers: install libopenblas-dev" \
      "(Debian/Ubuntu) or openblas-devel (Fedora) and re-run scripts/setup.sh" >&2
    exit 1
  fi
}

build_minkowski() {
  local wheel
  need_openblas # the wheel links libopenblas at run time too
  wheel=$(cached "minkowskiengine-$ME_VERSION")
  if [ -z "$wheel" ]; then
    local work
    work=$(mktemp -d)
    echo "[sparse] building MinkowskiEngine $ME_VERSION (CPU, OpenBLAS; ~15 min on 2 cores," \
      "once per machine; log: $work/build.log)"
    curl -fsSL -m 300 -o "$work/me.tar.gz" "$ME_URL"
    echo "$ME_SHA256  $work/me.tar.gz" | sha256sum -c --quiet
    tar xzf "$work/me.tar.gz" -C "$work"
    $PIP install -q wheel ninja
    # --blas=openblas skips numpy.distutils' BLAS probe (gone from setuptools >= 60), so no
    # setuptools pin is needed. setup.py wipes build/ and calls `pip uninstall` itself: we only
    # ever let it produce a wheel, which we cache.
    if ! (cd "$work/MinkowskiEngine-$ME_VERSION" \
      && PATH="$ROOT/$VENV/bin:$PATH" "$PY" setup.py \
        bdist_wheel --cpu_only --blas=openblas -d "$CACHE" >"$work/build.log" 2>&1); then
      tail -30 "$work/build.log" >&2
      echo "[sparse] MinkowskiEngine build failed (full log: $work/build.log). It needs g++," \
        "the Python headers and libopenblas-dev; torch must be installed first." >&2
      exit 1
    fi
    rm -rf "$work"
    wheel=$(cached "minkowskiengine-$ME_VERSION")
  fi
  $PIP install -q --no-deps --force-reinstall "$wheel"
}

build_scatter() {
  local wheel
  wheel=$(cached "torch_scatter-2.1.2")
  if [ -z "$wheel" ]; then
    echo "[sparse] building torch-scatter 2.1.2 from source (~10 min on 2 cores, once per machine)"
    $PIP wheel -q --no-deps --no-build-isolation -w "$CACHE" torch-scatter==2.1.2
    wheel=$(cached "torch_scatter-2.1.2")
  fi
  $PIP install -q --no-deps --force-reinstall "$wheel"
}

if have MinkowskiEngine; then echo "[sparse] MinkowskiEngine present"; else build_minkowski; fi
if have torch_scatter; then echo "[sparse] torch-scatter present"; else build_scatter; fi
if have spconv; then
  echo "[sparse] spconv present"
else
  # The CPU wheel; CUDA machines install the `cuda` extra (spconv-cu120) instead.
  echo "[sparse] installing the spconv CPU wheel"
  $PIP install -q "spconv==2.3.8"
fi
$PY - <<'EOF'
from hilda.models.sparse import BACKENDS, load_ops

print("[sparse] ok:", ", ".join(load_ops(name).name for name in BACKENDS))
EOF
