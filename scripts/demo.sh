#!/usr/bin/env bash
# The main job on the bundled default: set up (idempotent), generate the synthetic world in
# nuScenes format and read it back through nuscenes-devkit. Later stages (hilda-prep cache,
# hilda-train, hilda-eval) join this script as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${HILDA_DEMO_OUT:-out/demo}
export PATH="$PWD/.venv/bin:$PATH"

echo "[demo] 1/2 synthetic world (nuScenes format) -> $OUT/nuscenes"
hilda-prep make-synthetic --format nuscenes --out "$OUT/nuscenes" --scenes 3 --frames-per-scene 6 \
  --seed 0 --image-size 640x360
echo "[demo] 2/2 read it back through nuscenes-devkit"
hilda-prep frames --dataset nuscenes --root "$OUT/nuscenes" --version v1.0-mini --split mini_train
hilda-prep frames --dataset nuscenes --root "$OUT/nuscenes" --version v1.0-mini --split mini_val
echo "[demo] done: dataset in $OUT/nuscenes"
