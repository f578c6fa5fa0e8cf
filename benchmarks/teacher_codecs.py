"""Bytes per frame of the teacher group vs fidelity, per storage codec, for DINOv2 ViT-S/14 and
ViT-B/14 (16x32 patches at 224x448) and DINOv3 ViT-S/16 and ViT-B/16 (14x28 patches) with last2
and last4. Prints a table; not a test.

Features come from randomly initialised models (no weights can be downloaded here)
run on the synthetic world's six camera images, and from the same features with planted
outliers (three channels x60, two tokens x40 per image) standing in for a trained DINOv2's
huge channels and high-norm tokens. Bytes are what zarr stores (compressed) for one frame.

    .venv/bin/python benchmarks/teacher_codecs.py [--images DIR]
"""

from __future__ import annotations

import argparse
import glob
import uuid

import numpy as np
import torch
import zarr

from hilda.pipeline.stages.teacher import load_images
from hilda.store import codecs
from hilda.teachers import MultiLayerTeacher, build_teacher, parse_layers, preprocess


def stored_bytes(values: np.ndarray, codec: str) -> int:
    """Compressed bytes of one frame (6, h, w, D) as the teacher stage stores it (one chunk)."""
    store = f"memory://bench-{uuid.uuid4().hex}"
    extra = {
        "float16": {"compressors": None},  # stored uncompressed: faster reads (the stage's rule)
        "bitround": {"compressors": codecs.bitround_compressor()},
    }.get(codec, {})
    arr = zarr.create_array(
        store, shape=values.shape, dtype=values.dtype, chunks=values.shape, **extra
    )
    arr[...] = values
    return int(arr.nbytes_stored())


def plant_outliers(x: np.ndarray) -> np.ndarray:
    y = x.copy()
    y[..., [7, 100, 300]] *= 60.0
    y[:, 3, 5] *= 40.0
    y[:, 10, 20] *= 40.0
    return y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--images", default="out/demo/nuscenes/samples", help="folder of CAM_* folders"
    )
    parser.add_argument(
        "--archs", default="vits14,vitb14,dinov3_vits16,dinov3_vitb16", help="teacher sizes"
    )
    args = parser.parse_args()
    paths = [
        sorted(glob.glob(f"{args.images}/CAM_{c}/*.jpg"))[0]
        for c in ("FRONT", "FRONT_RIGHT", "BACK_RIGHT", "BACK", "BACK_LEFT", "FRONT_LEFT")
    ]
    images = preprocess(load_images(paths, (448, 224), "bench"))
    torch.set_num_threads(2)
    header = ("teacher", "layers", "features", "codec", "KiB/frame", "mean cos", "min cos")
    print("{:14} {:6} {:9} {:9} {:>10} {:>10} {:>10}".format(*header))
    for arch in args.archs.split(","):
        model, info = build_teacher(f"random:{arch}")
        for layers in ("last2", "last4"):
            blocks = parse_layers(layers, info.depth)
            patches, _ = MultiLayerTeacher(model, blocks)(images)  # (6, K, h, w, D)
            feats = patches.numpy().astype(np.float32)
            for kind in ("random", "outliers"):
                for codec in codecs.CODECS:
                    total, cos_all = 0, []
                    for k in range(len(blocks)):
                        x = feats[:, k] if kind == "random" else plant_outliers(feats[:, k])
                        values, scales = codecs.encode(x, codec)
                        total += stored_bytes(values, codec)
                        if scales is not None:
                            total += scales[0].nbytes + scales[1].nbytes
                        cos_all.append(codecs.token_cosines(x, codecs.decode(values, scales)))
                    cos = np.concatenate(cos_all)
                    print(
                        f"{arch:14} {layers:6} {kind:9} {codec:9} {total / 1024:10.1f} "
                        f"{cos.mean():10.6f} {cos.min():10.6f}"
                    )


if __name__ == "__main__":
    main()
