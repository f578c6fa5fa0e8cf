"""How much the learning outcome moves with the pre-training seed and with what differs
between machines (threads, BLAS kernels, torch's CPU kernels): the spread the learning tests'
margins and the demo's verdict are set from. Prints tables; not a test.

    .venv/bin/python benchmarks/learning_spread.py --label seeds --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/learning_spread.py --label threads2 --seeds 0 1 --threads 2 \
        --nondeterministic --parallel 1
    .venv/bin/python benchmarks/learning_spread.py --label skylakex --seeds 0 \
        --env OPENBLAS_CORETYPE=SkylakeX
    .venv/bin/python benchmarks/learning_spread.py --label demo --steps 192 --teachers dinov2
    .venv/bin/python benchmarks/learning_spread.py --report      # every label measured so far

The world is the demo's and the learning tests' (synthetic nuScenes, 3 scenes x 6 keyframes,
seed 0, 640x360), written once under ``--out`` with a cache per teacher (the demo's random
ViT-S/14 and the oracle, 448x224, last2, a 256-cell BEV grid), all through the CLIs a user
runs. Each (teacher, pre-training seed) job is one process: ``hilda-train run --config
tiny_cpu --set run.seed=S`` for ``--steps`` steps, then the demo's linear probe
(``eval/tiny_linear_probe``) of the backbone at every ``--probe-seeds`` seed. A label's
random-init probes (same architecture, probe seeds, environment) are one more job. Jobs run
``--parallel`` at a time with ``--threads`` threads each; results are JSON files under
``--out/LABEL/``, so a rerun skips finished jobs.

Figures per pre-training seed: the probe mIoU at each probe seed, their mean, the gain of
that mean over the random-init mean, and the worst case (smallest pre-trained probe minus
largest random-init probe). The summary gives the smallest, mean and largest gain over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BIN = Path(sys.executable).parent
WORLD = ["--format", "nuscenes", "--scenes", "3", "--frames-per-scene", "6", "--seed", "0"]
WORLD += ["--image-size", "640x360"]
TEACHERS = {"dinov2": "random:vits14", "oracle": "oracle"}


def cli(name: str, *args: str, env: dict | None = None, log: Path | None = None) -> None:
    cmd = [str(BIN / name), *args]
    with open(log or os.devnull, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)} (log: {log})")


def prepare(out: Path) -> Path:
    """The world and one cache per teacher (once)."""
    world = out / "world"
    log = out / "prepare.log"
    if not (world / "v1.0-mini" / "sample.json").exists():
        print(f"writing the demo's world to {world}", flush=True)
        cli("hilda-prep", "make-synthetic", "--out", str(world), *WORLD, log=log)
    for name, teacher in TEACHERS.items():
        store = out / f"{name}.zarr"
        if (out / f"{name}.ready").exists():
            continue
        print(f"building the {name} cache {store}", flush=True)
        common = ["--store", str(store), "--workers", "2"]
        cli(
            "hilda-prep",
            "index",
            "--dataset",
            "nuscenes",
            "--root",
            str(world),
            "--version",
            "v1.0-mini",
            "--split",
            "mini_train",
            "--out",
            str(store),
            "--frames-per-shard",
            "4",
            "--workers",
            "2",
            log=log,
        )
        cli("hilda-prep", "build-pointmaps", *common, log=log)
        cli(
            "hilda-prep",
            "extract-teacher",
            *common,
            "--teacher",
            teacher,
            "--layers",
            "last2",
            "--image-size",
            "448x224",
            "--codec",
            "float16",  # the learning test's caches
            log=log,
        )
        cli("hilda-prep", "build-occupancy", *common, "--grid", "256", log=log)
        (out / f"{name}.ready").touch()
    return world


def job_env(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    for kv in args.env:
        key, _, value = kv.partition("=")
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    # torch's intra-op pool and the OpenBLAS that MinkowskiEngine calls (deterministic mode
    # sets one thread itself; this is what a non-deterministic run gets).
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(args.threads)
    return env


def probe_all(backbone: Path, init: str, world: Path, args, env, folder: Path) -> list[float]:
    out = []
    for p in args.probe_seeds:
        result = folder / f"probe-{init}-{p}.json"
        if not result.exists():
            sets = [f"seed={p}", "data.num_workers=0", *args.probe_set]
            cli(
                "hilda-eval",
                "linear-probe",
                "--backbone",
                str(backbone),
                "--root",
                str(world),
                "--config",
                "eval/tiny_linear_probe",
                "--init",
                init,
                "--out",
                str(result),
                *[a for s in sets for a in ("--set", s)],
                env=env,
                log=folder / "log.txt",
            )
        out.append(json.loads(result.read_text())["miou"])
    return out


def pretrain(teacher: str, seed: int, world: Path, args, env) -> dict:
    """One pre-training and the probes of its backbone (skipped when done)."""
    folder = args.out / args.label / f"{teacher}-s{seed}"
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    run = folder / "run"
    tick = time.perf_counter()
    if not (run / "backbone.pt").exists():
        sets = [f"run.seed={seed}", f"optim.max_steps={args.steps}", "data.num_workers=0"]
        sets += ["run.tensorboard=false", f"run.deterministic={not args.nondeterministic}"]
        sets += args.set
        resume = ["--resume"] if (run / "checkpoints" / "last.pt").exists() else []
        if run.exists() and not resume:
            shutil.rmtree(run)  # killed before its first checkpoint
        cli(
            "hilda-train",
            "run",
            "--config",
            args.config,
            "--store",
            str(args.out / f"{teacher}.zarr"),
            "--out",
            str(run),
            *resume,
            *[a for s in sets for a in ("--set", s)],
            env=env,
            log=folder / "log.txt",
        )
    train_s = time.perf_counter() - tick
    probes = probe_all(run / "backbone.pt", "pretrained", world, args, env, folder)
    result = dict(teacher=teacher, seed=seed, probes=probes, train_seconds=train_s)
    done.write_text(json.dumps(result))
    print(f"  {args.label} {teacher} seed {seed}: {fmt(probes)} ({train_s:.0f} s)", flush=True)
    return result


def random_init(world: Path, args, env) -> list[float]:
    """The random-init probes of the architecture the label's runs pre-train."""
    folder = args.out / args.label / "random"
    folder.mkdir(parents=True, exist_ok=True)
    first = args.out / args.label / f"{args.teachers[0]}-s{args.seeds[0]}" / "run" / "backbone.pt"
    return probe_all(first, "random", world, args, env, folder)


def fmt(xs: list[float]) -> str:
    return " / ".join(f"{100 * x:.2f}" for x in xs)


def report(out: Path) -> None:
    for label_dir in sorted(p for p in out.iterdir() if (p / "spec.json").exists()):
        spec = json.loads((label_dir / "spec.json").read_text())
        rand_files = sorted((label_dir / "random").glob("probe-random-*.json"))
        if not rand_files:
            continue
        rand = [json.loads(f.read_text())["miou"] for f in rand_files]
        r_mean, r_max = statistics.fmean(rand), max(rand)
        print(f"\n## {label_dir.name}: {spec['describe']}")
        print(f"random init: {fmt(rand)} (mean {100 * r_mean:.2f})\n")
        print(
            "| teacher | seed | probes (seeds "
            + " / ".join(map(str, spec["probe_seeds"]))
            + ") | mean | gain of mean | worst case | train s |"
        )
        print("|---|---:|---|---:|---:|---:|---:|")
        for teacher in spec["teachers"]:
            gains, worst = [], []
            for f in sorted(label_dir.glob(f"{teacher}-s*/result.json")):
                r = json.loads(f.read_text())
                mean = statistics.fmean(r["probes"])
                gains.append(mean - r_mean)
                worst.append(min(r["probes"]) - r_max)
                print(
                    f"| {teacher} | {r['seed']} | {fmt(r['probes'])} | {100 * mean:.2f} | "
                    f"{100 * gains[-1]:+.2f} | {100 * worst[-1]:+.2f} | "
                    f"{r['train_seconds']:.0f} |"
                )
            if gains:
                print(
                    f"| {teacher} | {len(gains)} seeds | | | min {100 * min(gains):+.2f}, mean "
                    f"{100 * statistics.fmean(gains):+.2f}, max {100 * max(gains):+.2f} | "
                    f"min {100 * min(worst):+.2f} | |"
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/bench/learning_spread"))
    ap.add_argument("--label", default="seeds", help="name of this set of runs (a folder)")
    ap.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--probe-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--config", default="tiny_cpu", help="pre-training preset, e.g. tiny_cpu_ptv3")
    ap.add_argument("--steps", type=int, default=96, help="pre-training steps (the test's 96)")
    ap.add_argument("--set", action="append", default=[], help="pre-training override")
    ap.add_argument("--probe-set", action="append", default=[], help="probe override")
    ap.add_argument("--threads", type=int, default=1, help="threads per job")
    ap.add_argument(
        "--nondeterministic",
        action="store_true",
        help="pre-train without run.deterministic (threads as --threads)",
    )
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        help="KEY=VALUE for every job (KEY= unsets), e.g. OPENBLAS_CORETYPE=SkylakeX",
    )
    ap.add_argument("--parallel", type=int, default=2, help="jobs at a time")
    ap.add_argument("--report", action="store_true", help="only print every label's tables")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(args.out)
        return
    world = prepare(args.out)
    env = job_env(args)
    spec = {
        "describe": f"{args.config}, {args.steps} steps, {args.threads} thread(s), "
        + ("non-deterministic" if args.nondeterministic else "deterministic")
        + "".join(f", {s}" for s in args.set + args.env + [f"probe {p}" for p in args.probe_set]),
        "teachers": args.teachers,
        "probe_seeds": args.probe_seeds,
        "date": time.strftime("%Y-%m-%d"),
    }
    (args.out / args.label).mkdir(exist_ok=True)
    (args.out / args.label / "spec.json").write_text(json.dumps(spec))
    print(f"{args.label}: {spec['describe']}", flush=True)
    jobs = [(t, s) for s in args.seeds for t in args.teachers]
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda j: pretrain(*j, world, args, env), jobs))
    random_init(world, args, env)
    report(args.out)


if __name__ == "__main__":
    main()
