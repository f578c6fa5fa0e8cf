#!/usr/bin/env bash
# The main job on the bundled default: set up (idempotent), generate the synthetic world in
# nuScenes format, read it back through nuscenes-devkit, and build the training cache with
# every hilda-prep stage, then pre-train the student with the tiny preset. Evaluation joins
# this script as it lands.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${HILDA_DEMO_OUT:-out/demo}
WORKERS=${HILDA_WORKERS:-2}
export PATH="$PWD/.venv/bin:$PATH"

echo "[demo] 1/5 synthetic world (nuScenes format) -> $OUT/nuscenes"
hilda-prep make-synthetic --format nuscenes --out "$OUT/nuscenes" --scenes 3 --frames-per-scene 6 \
  --seed 0 --image-size 640x360
echo "[demo] 2/5 read it back through nuscenes-devkit"
hilda-prep frames --dataset nuscenes --root "$OUT/nuscenes" --version v1.0-mini --split mini_train
hilda-prep frames --dataset nuscenes --root "$OUT/nuscenes" --version v1.0-mini --split mini_val
echo "[demo] 3/5 the training cache: $OUT/cache.zarr ($WORKERS Dask workers)"
STORE="$OUT/cache.zarr"
hilda-prep index --dataset nuscenes --root "$OUT/nuscenes" --version v1.0-mini --split mini_train \
  --out "$STORE" --frames-per-shard 4 --workers "$WORKERS"
hilda-prep build-pointmaps --store "$STORE" --workers "$WORKERS"
# No DINOv2 weights can be downloaded here: the demo uses a randomly initialised ViT-S/14.
hilda-prep extract-teacher --store "$STORE" --teacher random:vits14 --layers last2 \
  --image-size 448x224 --workers "$WORKERS"
# 256 cells of 0.4 m (+-51 m): the tiny preset's BEV grid (rebuilt each run: cheap, and a demo
# store from an older run may hold another grid).
hilda-prep build-occupancy --store "$STORE" --grid 256 --workers "$WORKERS" --overwrite
echo "[demo] 4/5 what the cache holds"
hilda-prep validate --store "$STORE"
hilda-prep info --store "$STORE"
echo "[demo] 5/5 pre-train the student (configs/tiny_cpu.yaml) -> $OUT/pretrain"
rm -rf "$OUT/pretrain"
hilda-train run --config configs/tiny_cpu.yaml --store "$STORE" --out "$OUT/pretrain"
echo "[demo] done: dataset in $OUT/nuscenes, cache in $STORE, run in $OUT/pretrain"
