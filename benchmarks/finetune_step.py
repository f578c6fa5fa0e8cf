"""Seconds per fine-tune step of MinkUNet34 + the Sec. C.2 head through the fitting engine
(``hilda.engine.fit``), on the real nuScenes keyframe sweep: one process against torchrun DDP
processes with the same global batch, and AMP on CUDA.

A global batch of ``--batch`` frames (the sweep, each copy rotated about z so the frames
differ) is trained for ``--steps`` timed steps after one warm-up step. The labels are random
classes (the keyframe ships without lidarseg labels; the step's cost does not depend on them).
Layouts run in their own subprocesses, so each has the machine to itself; figures are medians.
Prints a table; not a test.

    .venv/bin/python benchmarks/finetune_step.py [--steps 5] [--batch 2] [--procs 1,2]
    .venv/bin/python benchmarks/finetune_step.py --device cuda --amp   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = sorted(
    (Path(__file__).resolve().parents[2] / "shared/realdata/nuscenes-keyframe").glob(
        "*LIDAR_TOP*.pcd.bin"
    )
)


def frames(points, count: int):
    """``count`` copies of the (N, 4) sweep, the i-th rotated by i x 90 degrees about z."""
    import torch

    out = []
    for i in range(count):
        c, s = math.cos(i * math.pi / 2), math.sin(i * math.pi / 2)
        rot = torch.tensor([[c, -s], [s, c]], dtype=points.dtype)
        p = points.clone()
        p[:, :2] = points[:, :2] @ rot.T
        out.append(p)
    return out


def worker(args: argparse.Namespace) -> None:
    """One process of a layout: its share of each global batch, timed steps, rank 0 reports."""
    import torch

    from hilda.datasets.io import read_nuscenes_sweep
    from hilda.engine.distributed import init_distributed, pick_device, shutdown
    from hilda.engine.fit import Fit
    from hilda.eval.config import SegOptimConfig
    from hilda.eval.probe import seg_loss
    from hilda.eval.segment import Segmenter, build_backbone
    from hilda.models.convert import save_backbone
    from hilda.models.student import StudentConfig, build_student
    from hilda.models.voxelize import VoxelConfig

    world = init_distributed(args.device)
    device = pick_device(args.device, world)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ckpt = Path(args.workdir) / "backbone.pt"
    if world.main and not ckpt.exists():
        save_backbone(build_student(StudentConfig()), ckpt, voxel=VoxelConfig())
    if world.distributed:
        torch.distributed.barrier()
    net = build_backbone(str(ckpt), "pretrained", backend=args.backend)
    model = Segmenter(net, 17, frozen=False).to(device)
    optim = SegOptimConfig(amp=args.amp, amp_dtype=args.amp_dtype)
    fit = Fit.build(
        model,
        lambda: [{"params": list(model.parameters()), "lr": optim.lr}],
        optim,
        world=world,
        device=device,
        total=args.steps + 1,
        per_epoch=args.steps + 1,
    )
    sweep = torch.from_numpy(read_nuscenes_sweep(SWEEP[0]))
    mine = frames(sweep, args.batch)[world.rank :: world.size]  # this process's share
    points = torch.cat(mine).to(device)
    batch = torch.cat([torch.full((len(p),), i) for i, p in enumerate(mine)]).to(device)
    labels = torch.randint(1, 17, (len(points),), generator=torch.Generator().manual_seed(1))
    labels = labels.to(device)
    times = []
    for step in range(args.steps + 1):  # the first builds kernel maps and pools: warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        model.train()
        with fit.autocast():
            loss = seg_loss(fit.net(points, batch), labels)
        fit.update(loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - tick)
    if world.main:
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        result = {
            "processes": world.size,
            "threads_each": args.threads,
            "global_batch": args.batch,
            "device": str(device),
            "amp": fit.amp,
            "points_per_frame": len(sweep),
            "median_s": statistics.median(times),
            "min_s": min(times),
            "peak_cuda_mb": peak,
        }
        Path(args.result).write_text(json.dumps(result))
    shutdown(world)


def launch(args: argparse.Namespace, procs: int, threads: int, amp: bool, workdir: str) -> dict:
    result = Path(workdir) / f"result-{procs}-{int(amp)}.json"
    common = [
        "--worker",
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--device",
        args.device,
        "--backend",
        args.backend,
        "--threads",
        str(threads),
        "--workdir",
        workdir,
        "--result",
        str(result),
        "--amp-dtype",
        args.amp_dtype,
    ] + (["--amp"] if amp else [])
    if procs == 1:
        cmd = [sys.executable, __file__, *common]
    else:
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(procs), __file__, *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2, help="global batch (frames a step)")
    parser.add_argument("--procs", default="1,2", help="process counts to compare")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default=None, help="minkowski (CPU) or spconv (CUDA)")
    parser.add_argument("--amp", action="store_true", help="also time AMP (CUDA)")
    parser.add_argument("--amp-dtype", default="float16")
    parser.add_argument("--threads", type=int, default=0, help="per process; 0: cores / procs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.backend = args.backend or ("spconv" if args.device == "cuda" else "minkowski")
    if args.worker:
        worker(args)
        return
    if not SWEEP:
        sys.exit("the real nuScenes keyframe is not at ../shared/realdata/nuscenes-keyframe")
    cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for procs in (int(p) for p in args.procs.split(",")):
            if args.batch % procs:
                continue
            threads = args.threads or max(1, cores // procs)
            for amp in (False, True) if args.amp else (False,):
                rows.append(launch(args, procs, threads, amp, workdir))
    base = rows[0]["median_s"]
    print(f"fine-tune step, MinkUNet34 + head, global batch {args.batch}, {args.device}")
    print("| processes x threads | AMP | median s/step | min s/step | vs first | peak CUDA MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        peak = f"{r['peak_cuda_mb']:.0f}" if r["peak_cuda_mb"] is not None else "-"
        print(
            f"| {r['processes']} x {r['threads_each']} | {'yes' if r['amp'] else 'no'} | "
            f"{r['median_s']:.3f} | {r['min_s']:.3f} | {r['median_s'] / base:.2f}x | {peak} |"
        )


if __name__ == "__main__":
    main()
