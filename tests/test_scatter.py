"""The native-torch scatter reductions equal torch-scatter's, values and gradients (on rows
without ties), so a node without a torch-scatter wheel trains the same student."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from hilda.models import scatter as chosen

pytest.importorskip("torch_scatter")


@pytest.fixture(scope="module")
def native():
    os.environ["HILDA_SCATTER"] = "torch"
    try:
        spec = importlib.util.spec_from_file_location("native_scatter", chosen.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        del os.environ["HILDA_SCATTER"]
    assert module.BACKEND == "torch" and chosen.BACKEND == "torch-scatter"
    return module


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, 7, (200,), generator=g)
    index[index == 5] = 6  # group 5 stays empty: both give 0 there
    return torch.randn(200, 3, generator=g, dtype=torch.float64), index, 8


@pytest.mark.parametrize("op", ["scatter_sum", "scatter_mean", "scatter_max", "scatter_min"])
def test_reductions_and_their_gradients_agree(native, op: str) -> None:
    src, index, size = _inputs(0)
    results = []
    for module in (chosen, native):
        x = src.clone().requires_grad_(True)
        out = getattr(module, op)(x, index, size)  # (8, 3)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    assert torch.equal(a[5], torch.zeros(3, dtype=a.dtype))


def test_softmax_and_segment_max_agree(native) -> None:
    src, index, _ = _inputs(1)
    scores = src[:, 0]
    for module_pair in ((chosen, native),):
        outs = []
        for module in module_pair:
            x = scores.clone().requires_grad_(True)
            y = module.scatter_softmax(x, index)
            (y * torch.arange(len(y), dtype=y.dtype)).sum().backward()
            outs.append((y.detach(), x.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0])
        torch.testing.assert_close(outs[0][1], outs[1][1])
    pointer = torch.tensor([0, 3, 3, 10, 200])  # an empty segment
    segs = []
    for module in (chosen, native):
        x = src.clone().requires_grad_(True)
        out = module.segment_max(x, pointer)  # (4, 3)
        out.sum().backward()
        segs.append((out.detach(), x.grad))
    torch.testing.assert_close(segs[0][0], segs[1][0])
    torch.testing.assert_close(segs[0][1], segs[1][1])


STUDENT = """
import sys, torch
from hilda.models import scatter
from hilda.models.sparse import load_ops
from hilda.models.student import build_student
from hilda.models.voxelize import VoxelConfig, voxelize
from tests.models_helpers import batch_of, random_scene
from tests.test_ptv3 import _tiny
load_ops("minkowski")
torch.manual_seed(0)
model = build_student(_tiny()).train()
points, batch = batch_of(random_scene(1500, 0), random_scene(900, 1))
out = model(voxelize(points, batch, VoxelConfig(voxel_size=0.1)))
loss = sum(f.square().mean() for f in out.point_feats)
loss.backward()
grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
blob = {"backend": scatter.BACKEND, "feats": out.point_feats[0].detach(), "grads": grads}
torch.save(blob, sys.argv[1])
"""


def test_a_ptv3_student_trains_the_same_on_either_backend(tmp_path) -> None:
    """PTv3 (grid pooling: segment max) on voxels (scatter mean, min): the same features
    and gradients on torch-scatter and on the native reductions."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    blobs = []
    for name, env in (("ts", {}), ("native", {"HILDA_SCATTER": "torch"})):
        out = tmp_path / f"{name}.pt"
        run = subprocess.run(
            [sys.executable, "-c", STUDENT, str(out)],
            env={**os.environ, **env, "PYTHONPATH": str(repo)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        blobs.append(torch.load(out, weights_only=True))
    assert [b["backend"] for b in blobs] == ["torch-scatter", "torch"]
    torch.testing.assert_close(blobs[0]["feats"], blobs[1]["feats"], rtol=1e-5, atol=1e-6)
    for key, grad in blobs[0]["grads"].items():
        torch.testing.assert_close(grad, blobs[1]["grads"][key], rtol=1e-4, atol=1e-6)
