"""Forward (+ backward) time and peak memory of both students, MinkUNet34 and PTv3 (Pointcept's
outdoor settings), on the real nuScenes keyframe sweep (34,688 points, 0.05 m voxels), per
sparse backend available on this machine and device.

Each (backend, device) runs in its own subprocess so the peak-memory figures are separate:
CPU peak = the process's max RSS growth over the run (ru_maxrss), CUDA peak =
torch.cuda.max_memory_allocated. Prints a table; not a test.

    .venv/bin/python benchmarks/student_step.py [--repeats 5] [--threads 2] [--amp]
        [--arch minkunet34 ptv3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SWEEP = sorted(
    (Path(__file__).resolve().parents[2] / "shared/realdata/nuscenes-keyframe").glob(
        "*LIDAR_TOP*.pcd.bin"
    )
)


def measure(
    arch: str, backend: str, device: str, repeats: int, threads: int, amp: bool, backward: bool
) -> dict:
    import torch

    from hilda.datasets.io import read_nuscenes_sweep
    from hilda.models.student import StudentConfig, build_student
    from hilda.models.voxelize import VoxelConfig, voxelize

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    points = torch.from_numpy(read_nuscenes_sweep(SWEEP[0])).to(device)
    batch = torch.zeros(len(points), dtype=torch.long, device=device)
    model = build_student(StudentConfig(arch=arch, backend=backend)).to(device).train()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    voxels = 0
    for i in range(repeats + 1):  # the first run builds kernel maps / allocator pools: warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            if i == 1:
                torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        vox = voxelize(points, batch, VoxelConfig())
        with (
            torch.autocast(device_type=device, dtype=torch.float16, enabled=amp),
            torch.set_grad_enabled(backward),
        ):
            out = model(vox)
            loss = sum(f.float().square().mean() for f in out.point_feats)
        if backward:
            loss.backward()
            model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
        voxels = len(vox.coords)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {
        "arch": arch,
        "backend": backend,
        "device": device,
        "pass": "fwd+bwd" if backward else "fwd",
        "points": len(points),
        "voxels": voxels,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_mb": peak_mb,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    parser.add_argument("--arch", nargs="+", default=["minkunet34", "ptv3"])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "arch:backend:device:pass", child
    args = parser.parse_args()
    if args.one:
        arch, backend, device, mode = args.one.split(":")
        backward = mode == "fwd+bwd"
        result = measure(arch, backend, device, args.repeats, args.threads, args.amp, backward)
        print(json.dumps(result))
        return
    if not SWEEP:
        sys.exit("the real keyframe sweep (../shared/realdata/nuscenes-keyframe) is missing")
    import torch

    from hilda.models.sparse import available_backends

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    runs = itertools.product(args.arch, devices, available_backends(), ("fwd", "fwd+bwd"))
    for arch, device, backend, mode in runs:
        if backend == "spconv" and device == "cpu" and mode == "fwd+bwd":
            continue  # spconv's CPU backward is wrong (hilda.models.sparse.spconv_ops)
        cmd = [sys.executable, __file__, "--one", f"{arch}:{backend}:{device}:{mode}"]
        cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
        cmd += ["--amp"] if args.amp and device == "cuda" else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            failure = f"{arch} {backend} {mode} on {device} failed:\n{done.stderr[-2000:]}"
            print(failure, file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"students on the real sweep (train mode), {args.repeats} timed runs after 1 warm-up")
    head = ("arch", "params M", "backend", "device", "pass", "voxels", "median s", "min s")
    print("{:<11} {:>8} {:<10} {:<6} {:<8} {:>7} {:>9} {:>7} {:>8}".format(*head, "peak MB"))
    for r in rows:
        print(
            f"{r['arch']:<11} {r['params_m']:>8.2f} {r['backend']:<10} {r['device']:<6} "
            f"{r['pass']:<8} {r['voxels']:>7} {r['median_s']:>9.3f} {r['min_s']:>7.3f} "
            f"{r['peak_mb']:>8.0f}"
        )
    print(f"threads (CPU): {args.threads}; AMP (CUDA): {args.amp}")


if __name__ == "__main__":
    main()
