"""Which GPU each Dask worker of a CUDA stage uses, resolved from the worker's environment,
and refused where it cannot be: never every worker on ``cuda:0`` without a word.

A worker's own GPU is
- on the local cluster (``--workers N``, integer names 0..N-1, every GPU visible): the GPU of
  its number (modulo the GPU count: more workers than GPUs share them round-robin);
- where it sees one GPU (``CUDA_VISIBLE_DEVICES=3``): that one;
- where ``CUDA_VISIBLE_DEVICES`` lists several: the first, the convention of dask-cuda
  (``LocalCUDACluster``, ``dask cuda worker``), which lists each worker's own GPU first;
- else, on an external cluster, the GPU of its integer name (``dask worker --name 2``).
A worker that sees several GPUs with none of these is an error naming it, and so are two
workers of one host that would use the same GPU (e.g. one ``CUDA_VISIBLE_DEVICES=0,1`` given
to every worker), checked by the driver over all workers before the stage starts.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from hilda.errors import ConfigError

# worker address -> its GPU (an index into what it sees), set by ``assign_gpus``
_ASSIGNED: dict[str, int] = {}


@dataclass(frozen=True)
class WorkerGpus:
    """What a worker sees of the machine's GPUs."""

    address: str
    name: str
    host: str
    visible: str | None  # its CUDA_VISIBLE_DEVICES (None: unset, every GPU)
    count: int  # torch.cuda.device_count() in the worker

    @property
    def visible_ids(self) -> list[str]:
        return [v.strip() for v in (self.visible or "").split(",") if v.strip()]


def _int_name(name: str) -> int | None:
    try:
        return int(name)
    except ValueError:
        return None


def own_gpu(w: WorkerGpus, local: bool) -> int:
    """The index (into the GPUs ``w`` sees) of the worker's own GPU (module doc)."""
    if w.count < 1:
        raise ConfigError(
            f"Dask worker {w.name} ({w.address} on {w.host}) sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={w.visible!r}): --device cuda needs a GPU on every worker"
        )
    number = _int_name(w.name)
    if local and number is not None:
        return number % w.count
    if w.count == 1:
        return 0
    if len(w.visible_ids) > 1:
        return 0  # dask-cuda lists the worker's own GPU first
    if number is not None and 0 <= number < w.count:
        return number
    raise ConfigError(
        f"Dask worker {w.name} ({w.address} on {w.host}) sees {w.count} GPUs and nothing says "
        "which is its own: start the GPU workers with dask-cuda (`dask cuda worker`, "
        "LocalCUDACluster), give each worker its GPU in CUDA_VISIBLE_DEVICES, or name the "
        "workers 0..N-1 (`dask worker --name K`)"
    )


def physical_gpu(w: WorkerGpus, index: int) -> str:
    """The machine's id of the GPU at ``index`` among those ``w`` sees."""
    ids = w.visible_ids
    return ids[index] if index < len(ids) else str(index)


def resolve_layout(workers: list[WorkerGpus], local: bool) -> dict[str, int]:
    """Every worker's own GPU (address -> index); on an external cluster two workers of one
    host on the same GPU are refused, naming both."""
    layout = {w.address: own_gpu(w, local) for w in workers}
    if local:
        return layout
    used: dict[tuple[str, str], WorkerGpus] = {}
    for w in workers:
        gpu = physical_gpu(w, layout[w.address])
        other = used.setdefault((w.host, gpu), w)
        if other is not w:
            raise ConfigError(
                f"Dask workers {other.name} and {w.name} on {w.host} would both run on GPU "
                f"{gpu} (CUDA_VISIBLE_DEVICES {other.visible!r} and {w.visible!r}): give each "
                "worker its own GPU (dask-cuda does) or run one worker per GPU"
            )
    return layout


def probe(dask_worker: Any = None) -> dict[str, Any]:
    """On a worker (``client.run``): what it sees of the GPUs."""
    import torch

    return {
        "address": dask_worker.address,
        "name": str(dask_worker.name),
        "host": socket.gethostname(),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "count": torch.cuda.device_count(),
    }


def _assign(layout: dict[str, int], dask_worker: Any = None) -> None:
    _ASSIGNED[dask_worker.address] = layout[dask_worker.address]


def assign_gpus(client: Any, local: bool) -> dict[str, int]:
    """Resolve every current worker's GPU on the driver and tell each worker its own."""
    workers = [WorkerGpus(**v) for v in client.run(probe).values()]
    layout = resolve_layout(workers, local)
    client.run(_assign, layout)
    return layout


def worker_device() -> int:
    """In a task: this worker's GPU index (assigned by the driver, or resolved from its own
    environment for a worker that joined after the stage started)."""
    import torch
    from distributed import get_worker

    worker = get_worker()
    if worker.address in _ASSIGNED:
        return _ASSIGNED[worker.address]
    w = WorkerGpus(
        worker.address,
        str(worker.name),
        socket.gethostname(),
        os.environ.get("CUDA_VISIBLE_DEVICES"),
        torch.cuda.device_count(),
    )
    return own_gpu(w, local=False)
