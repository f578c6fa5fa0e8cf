"""The CUDA paths in one command: prints one table and writes JSON.

1. Teacher forward throughput (images/s) of random-init ViT-S/B/L at 224x448 in bf16, with
   SDPA attention and with xformers when it is installed.
2. ``hilda-prep extract-teacher --device cuda`` end to end on a synthetic cache (frames/s):
   GPU JPEG decoding when torchvision is installed, one GPU per Dask worker.
3. MinkUNet34 and PTv3 forward + backward with AMP on spconv (and MinkowskiEngine when it was
   built with CUDA); PTv3 with its fastest attention kernel (flash-attention / xformers when
   installed) and with torch SDPA: samples/s and peak GPU memory, on the real nuScenes
   keyframe sweep when it is beside the checkout, else on a synthetic sweep.
4. spconv on CUDA against MinkowskiEngine on the CPU with the same weights: relative
   difference of the point features and of every parameter's gradient.

Every part prints one line, ``PASS``, ``FAIL <reason>`` or ``SKIP <reason>`` (e.g. a
library that is not installed), then its figures. The exit code is 0 only when every part
that could run passed and at least one ran: 1 when a part failed, 3 without CUDA (nothing
could be checked). ``--budget-s`` keeps the whole check inside that many seconds: a part
that would start past the budget is skipped and says so, and the figures measured so far are
printed and written either way.

    .venv/bin/python benchmarks/gpu_check.py [--json gpu_check.json] [--quick] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared/realdata/nuscenes-keyframe"


@dataclass
class Row:
    part: str
    what: str
    value: str
    status: str = "ok"  # ok | needs ... (skipped) | failed: ...

    @property
    def verdict(self) -> str:
        """PASS, FAIL <reason> or SKIP <reason>."""
        if self.status == "ok":
            return "PASS"
        if self.status.startswith("failed"):
            return f"FAIL {self.status.removeprefix('failed:').strip()}"
        return f"SKIP {self.status}"


_DEADLINE: list[float] = []  # perf_counter() past which no further measurement starts


def over_budget() -> bool:
    return bool(_DEADLINE) and time.perf_counter() > _DEADLINE[0]


def cuda() -> bool:
    return torch.cuda.is_available()


def has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def timed_cuda(fn: Callable[[], object], iters: int, warmup: int = 2) -> float:
    """Seconds per call of ``fn`` on the GPU (synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def teacher_throughput(quick: bool) -> list[Row]:
    if not cuda():
        what = "DINOv2 ViT-S/B/L 14, DINOv3 ViT-S/B/L 16, 224x448 bf16"
        return [Row("1 teacher forward", what, "-", "needs CUDA")]
    from hilda.teachers import MultiLayerTeacher, build_teacher, enable_xformers

    rows, batch = [], 8 if quick else 32
    x = torch.randn(batch, 3, 224, 448, device="cuda")
    archs = ("vits14", "vitb14", "vitl14", "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16")
    for arch in archs:
        for attention in ("sdpa", "xformers"):
            if over_budget():
                rows.append(Row("1 teacher forward", f"{arch} {attention}", "-", "budget spent"))
                continue
            model, info = build_teacher(f"random:{arch}")
            model = model.cuda()
            if attention == "xformers" and not (has("xformers") and enable_xformers(model)):
                rows.append(Row("1 teacher forward", f"{arch} xformers", "-", "needs xformers"))
                continue
            teacher = MultiLayerTeacher(model, [info.depth - 2, info.depth - 1])

            def step(teacher=teacher) -> object:
                with torch.autocast("cuda", dtype=torch.bfloat16), torch.inference_mode():
                    return teacher(x)

            seconds = timed_cuda(step, 3 if quick else 10)
            rows.append(
                Row("1 teacher forward", f"{arch} {attention}", f"{batch / seconds:.1f} img/s")
            )
            del model, teacher
            torch.cuda.empty_cache()
    return rows


def extract_teacher(quick: bool) -> list[Row]:
    what = "extract-teacher --device cuda, random ViT-S/14 448x224"
    if not cuda():
        return [Row("2 extract-teacher", what, "-", "needs CUDA")]
    from hilda.datasets.synthetic.generate import SyntheticConfig, make_synthetic
    from hilda.pipeline.runner import ClusterConfig
    from hilda.pipeline.stages.common import StageOptions
    from hilda.pipeline.stages.index import IndexConfig, run_index
    from hilda.pipeline.stages.teacher import TeacherConfig, cuda_decode_available, run_teacher

    with tempfile.TemporaryDirectory() as tmp:
        frames = 4 if quick else 12
        world = SyntheticConfig(
            out=Path(tmp) / "world", scenes=1, frames_per_scene=frames, image_size=(800, 450)
        )
        make_synthetic(world)
        store = str(Path(tmp) / "cache.zarr")
        opts = StageOptions(cluster=ClusterConfig(workers=1, gpu_workers=True))
        run_index(IndexConfig("nuscenes", str(world.out), store, frames_per_shard=4), opts)
        start = time.perf_counter()
        run_teacher(TeacherConfig(store, "random:vits14", "last2", device="cuda"), opts)
        seconds = time.perf_counter() - start
    decode = "GPU decode" if cuda_decode_available("cuda") else "CPU decode"
    return [Row("2 extract-teacher", f"{what}, {decode}", f"{frames / seconds:.2f} frames/s")]


def _sweep() -> tuple[torch.Tensor, str]:
    files = sorted(SHARED.glob("*LIDAR_TOP*.pcd.bin"))
    if files:
        from hilda.datasets.io import read_nuscenes_sweep

        return torch.from_numpy(read_nuscenes_sweep(files[0])), "real keyframe"
    rng = np.random.default_rng(0)
    pts = rng.normal(0, 15, (30000, 4)).astype(np.float32)
    pts[:, 2] = rng.uniform(-2, 3, 30000)
    pts[:, 3] = rng.uniform(0, 255, 30000)
    return torch.from_numpy(pts), "synthetic sweep"


def student_amp(quick: bool) -> list[Row]:
    if not cuda():
        return [Row("3 students fwd+bwd AMP", "MinkUNet34 / PTv3", "-", "needs CUDA")]
    from hilda.models.ptv3 import PTv3Config, attention_backend
    from hilda.models.sparse import backend_installed
    from hilda.models.student import StudentConfig, build_student
    from hilda.models.voxelize import VoxelConfig, voxelize

    points, source = _sweep()
    points = points.cuda()
    batch = torch.zeros(len(points), dtype=torch.long, device="cuda")
    variants = [("MinkUNet34", StudentConfig(backend=b), b) for b in ("spconv", "minkowski")]
    for attention in ("auto", "sdpa"):
        kernel = attention_backend(attention, torch.device("cuda"), torch.float16)
        cfg = StudentConfig(arch="ptv3", backend="spconv", ptv3=PTv3Config(attention=attention))
        variants.append(("PTv3", cfg, f"spconv, attention {kernel}"))
    rows = []
    for arch, cfg, what in variants:
        part = f"3 {arch} fwd+bwd AMP"
        if over_budget():
            rows.append(Row(part, what, "-", "budget spent"))
            continue
        if not backend_installed(cfg.backend):
            rows.append(Row(part, what, "-", f"needs {cfg.backend}"))
            continue
        try:
            model = build_student(cfg).cuda().train()
            optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
            scaler = torch.amp.GradScaler("cuda")

            def step(model=model, optim=optim, scaler=scaler) -> object:
                vox = voxelize(points, batch, VoxelConfig())
                with torch.autocast("cuda", dtype=torch.float16):
                    out = model(vox)
                    loss = sum(f.float().square().mean() for f in out.point_feats)
                optim.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optim)
                scaler.update()
                return loss

            torch.cuda.reset_peak_memory_stats()
            seconds = timed_cuda(step, 3 if quick else 10)
            peak = torch.cuda.max_memory_allocated() / 2**30
            value = f"{1 / seconds:.2f} samples/s, peak {peak:.2f} GiB ({source})"
            rows.append(Row(part, what, value))
        except Exception as exc:  # e.g. a CPU-only MinkowskiEngine build
            rows.append(Row(part, what, "-", f"failed: {exc}"[:200]))
        finally:
            torch.cuda.empty_cache()
    return rows


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def spconv_vs_minkowski(quick: bool) -> list[Row]:
    what = "spconv CUDA vs MinkowskiEngine CPU, same weights"
    from hilda.models.sparse import backend_installed

    if not cuda():
        return [Row("4 gradients", what, "-", "needs CUDA")]
    if not (backend_installed("spconv") and backend_installed("minkowski")):
        return [Row("4 gradients", what, "-", "needs spconv and MinkowskiEngine")]
    from hilda.models.convert import convert_state
    from hilda.models.student import StudentConfig, build_student
    from hilda.models.voxelize import VoxelConfig, voxelize

    points, _ = _sweep()
    points = points[: 8000 if quick else len(points)]
    batch = torch.zeros(len(points), dtype=torch.long)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    me = build_student(StudentConfig(backend="minkowski")).train()
    sp = build_student(StudentConfig(backend="spconv")).cuda().train()
    sp.load_state_dict(convert_state(me.state_dict(), "spconv"))
    results = {}
    for name, model, device in (("minkowski", me, "cpu"), ("spconv", sp, "cuda")):
        vox = voxelize(points.to(device), batch.to(device), VoxelConfig())
        out = model(vox)
        loss = sum(f.square().mean() for f in out.point_feats)
        loss.backward()
        grads = {k: p.grad.detach().cpu() for k, p in model.named_parameters()}
        if name == "spconv":
            grads = convert_state(grads, "minkowski")
        results[name] = (out.point_feats[0].detach().cpu(), grads)
    feats = _relative(results["spconv"][0], results["minkowski"][0])
    worst = max(_relative(results["spconv"][1][k], g) for k, g in results["minkowski"][1].items())
    status = "ok" if feats < 1e-3 and worst < 1e-2 else "failed: differences too large"
    value = f"features {feats:.1e}, worst parameter gradient {worst:.1e} (relative, float32)"
    return [Row("4 gradients", what, value, status)]


PARTS = (teacher_throughput, extract_teacher, student_amp, spconv_vs_minkowski)


def run_parts(quick: bool, budget_s: float | None) -> list[Row]:
    """Every part in order, each failure kept as a row (one part failing must not hide the
    others); a part that would start past ``budget_s`` is skipped."""
    start, rows = time.perf_counter(), []
    _DEADLINE[:] = [] if budget_s is None else [start + budget_s]
    for number, part in enumerate(PARTS, 1):
        spent = time.perf_counter() - start
        if budget_s is not None and spent >= budget_s:
            rows.append(Row(f"{number} {part.__name__}", "-", "-", f"budget spent ({spent:.0f} s)"))
            continue
        try:
            rows += part(quick)
        except Exception as exc:
            reason = f"failed: {type(exc).__name__}: {exc}"[:300]
            rows.append(Row(f"{number} {part.__name__}", "-", "-", reason))
    return rows


def exit_code(rows: list[Row]) -> int:
    """1: a part that could run failed; 3: none could run (no CUDA); 0: all that ran passed."""
    if any(r.verdict.startswith("FAIL") for r in rows):
        return 1
    if not any(r.verdict == "PASS" for r in rows):
        return 3
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--quick", action="store_true", help="smaller batches and inputs")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="start no part after this many seconds"
    )
    args = parser.parse_args()
    rows = run_parts(args.quick, args.budget_s)
    device = torch.cuda.get_device_name(0) if cuda() else f"no CUDA ({platform.processor()})"
    from hilda.models.scatter import BACKEND as SCATTER

    print(f"gpu_check on {device}, torch {torch.__version__}, scatter reductions on {SCATTER}")
    for r in rows:
        print(f"{r.part} | {r.what}: {r.verdict}" + (f" | {r.value}" if r.value != "-" else ""))
    code = exit_code(rows)
    report = {
        "device": device,
        "torch": torch.__version__,
        "scatter": SCATTER,
        "rows": [{**asdict(r), "verdict": r.verdict} for r in rows],
        "exit_code": code,
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"-> {args.json}; exit {code}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
