"""Deterministic mode: the same run gives the same numbers, bit for bit, on one machine."""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from collections.abc import Iterator

import torch

# torch's warning when an op has no deterministic kernel (use_deterministic_algorithms with
# warn_only=True): "<op> does not have a deterministic implementation, but you set ..."
_NONDETERMINISTIC = re.compile(r"^(.*?) does not have a deterministic implementation")


@contextlib.contextmanager
def _name_nondeterministic_ops() -> Iterator[set[str]]:
    """Print one line per op that ran without a deterministic kernel (the first time it
    runs), instead of torch's warning at every call or none at all."""
    seen: set[str] = set()
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        found = _NONDETERMINISTIC.match(str(message))
        if found is None:
            shown(message, category, filename, lineno, file, line)
            return
        op = found.group(1).strip()
        if op not in seen:
            seen.add(op)
            print(
                f"[deterministic mode] {op} has no deterministic kernel: results that depend "
                "on it can differ between runs",
                file=sys.stderr,
            )

    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=_NONDETERMINISTIC.pattern)
        warnings.showwarning = show
        try:
            yield seen
        finally:
            warnings.showwarning = shown


@contextlib.contextmanager
def deterministic_mode(enabled: bool = True) -> Iterator[None]:
    """Deterministic kernels and one thread while inside (nothing when not ``enabled``),
    undone afterwards: a process that trains, then evaluates, gets its threads back.

    Deterministic kernels where torch has them, and one thread in every native thread pool
    (torch's OpenMP, and the OpenBLAS that MinkowskiEngine's CPU build calls, which
    torch.set_num_threads does not reach): two 2-thread runs differed by ~5e-6 after 4 steps,
    1-thread runs are bit-identical. Enter it after the sparse backend is imported. An op
    without a deterministic kernel still runs (``warn_only``), and the run's log says which,
    once per op.
    """
    if not enabled:
        yield
        return
    from threadpoolctl import threadpool_limits

    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(1)
    limits = threadpool_limits(limits=1)
    try:
        with _name_nondeterministic_ops():
            yield
    finally:
        limits.restore_original_limits()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was)
