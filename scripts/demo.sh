#!/usr/bin/env bash
# The main job on the bundled default: set up (idempotent), generate the synthetic world in
# nuScenes format, read it back through nuscenes-devkit, and build the training cache with
# every hilda-prep stage. Training and evaluation join this script as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${HILDA_DEMO_OUT:-out/demo}
WORKERS=${HILDA_WORKERS:-2}
export PATH="$PWD/.venv/bin:$PATH"

echo "[demo] 1/4 synthetic world (nuScenes format) -> $OUT/nuscenes"
hilda-prep make-synthetic --format nuscenes --out "$OUT/nuscenes" --scenes 3 --frames-per-scene 6 \
  --seed 0 --image-size 640x360
echo "[demo] 2/4 read it back through nuscenes-devkit"
hilda-prep frames --dataset nuscenes --root "$OUT/nuscenes" --version v1.0-mini --split mini_train
hilda-prep frames --dataset nuscenes --root "$OUT/nuscenes" --version v1.0-mini --split mini_val
echo "[demo] 3/4 the training cache: $OUT/cache.zarr ($WORKERS Dask workers)"
STORE="$OUT/cache.zarr"
hilda-prep index --dataset nuscenes --root "$OUT/nuscenes" --version v1.0-mini --split mini_train \
  --out "$STORE" --frames-per-shard 4 --workers "$WORKERS"
hilda-prep build-pointmaps --store "$STORE" --workers "$WORKERS"
# No DINOv2 weights can be downloaded here: the demo uses a randomly initialised ViT-S/14.
hilda-prep extract-teacher --store "$STORE" --teacher random:vits14 --layers last2 \
  --image-size 448x224 --workers "$WORKERS"
hilda-prep build-occupancy --store "$STORE" --workers "$WORKERS"
echo "[demo] 4/4 what the cache holds"
hilda-prep validate --store "$STORE"
hilda-prep info --store "$STORE"
echo "[demo] done: dataset in $OUT/nuscenes, cache in $STORE"
