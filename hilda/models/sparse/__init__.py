"""Sparse convolution backends for the student, behind one interface.

``minkowski`` (MinkowskiEngine; CPU and CUDA; parameter names and layouts as Pointcept's
``MinkUNet34C``) and ``spconv`` (CUDA training; on CPU its forward only, which is enough for
the equivalence tests: see ``spconv_ops.CPU_BACKWARD_ERROR``). Each backend module is imported
only when asked for, so a machine with one of them installed can still use it.
"""

from __future__ import annotations

import importlib.util

from hilda.errors import ConfigError

BACKENDS = ("minkowski", "spconv")


def backend_installed(name: str) -> bool:
    """Whether the backend's library can be found (without importing it)."""
    module = {"minkowski": "MinkowskiEngine", "spconv": "spconv"}[name]
    return importlib.util.find_spec(module) is not None


def available_backends() -> list[str]:
    return [name for name in BACKENDS if backend_installed(name)]


def load_ops(name: str):
    """The ``SparseOps`` of a backend: module factories and tensor helpers."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown sparse backend {name!r}; choose one of {BACKENDS}")
    if not backend_installed(name):
        hint = {
            "minkowski": "run scripts/setup.sh (it builds MinkowskiEngine from source; "
            "see scripts/build_sparse.sh) or choose backend=spconv",
            "spconv": "pip install spconv (CPU) or spconv-cu120 (pip install -e '.[cuda]')",
        }[name]
        raise ConfigError(f"sparse backend {name!r} is not installed: {hint}")
    if name == "minkowski":
        from hilda.models.sparse.minkowski_ops import MinkowskiOps

        return MinkowskiOps()
    from hilda.models.sparse.spconv_ops import SpconvOps

    return SpconvOps()
