"""Stage 3, ``hilda-prep extract-teacher``: a teacher's (``hilda.teachers``) multi-layer
patch grids and CLS tokens of every camera image, stored on the patch grid (the trainer
samples it bilinearly at each pair's uv, which equals upsample-then-index). The stage knows
no family: DINOv2, DINOv3 and the synthetic world's oracle are one ``Teacher`` protocol."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hilda.datasets.io import (
    DatasetError,
    check_image_size,
    read_class_map,
    read_image,
    require_file,
)
from hilda.errors import ConfigError, FrameError
from hilda.pipeline.gpus import assign_gpus, worker_device
from hilda.pipeline.stages.common import (
    StageOptions,
    locked_stage,
    run_frame_shards,
    stage_client,
)
from hilda.store import codecs
from hilda.store.reader import index_info, open_store, read_index
from hilda.store.schema import INDEX, TEACHERS, normalize_store, teacher_group, teacher_path
from hilda.store.teacher_record import DEFAULT_LAYERS, Layers, TeacherInfo, TeacherRecord
from hilda.store.writer import (
    open_for_stage,
    prepare_group,
    record_stage,
    set_attr,
    shard_stats,
    write_frames,
    write_teacher_block,
)
from hilda.teachers import Teacher, load_teacher, parse_teacher, teacher_info


@dataclass(frozen=True)
class TeacherConfig:
    store: str
    teacher: str  # required: a randomly initialised teacher only when the user names one
    layers: str = DEFAULT_LAYERS
    # (width, height), multiples of the patch size: 14 (DINOv2) or 16 (DINOv3); 448x224 is both
    image_size: tuple[int, int] = (448, 224)
    norm: bool = True
    # int8 with token x channel scales: half float16's bytes, min token cosine 0.99998 with
    # planted outlier channels and tokens (docs/benchmarks.md); read as stored by the loader
    # and dequantised on the training device.
    codec: str = "int8"
    batch_size: int = 6
    device: str = "cpu"
    name: str | None = None  # group name under teacher/; default from the teacher id

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", normalize_store(self.store))

    def group_name(self) -> str:
        if self.name:
            return self.name
        base = os.path.basename(self.teacher.rstrip("/")).replace(":", "_").replace(".", "_")
        return base or "teacher"


_CACHE: dict[tuple, tuple[Teacher, torch.device]] = {}


def _cuda_device() -> torch.device:
    """This Dask worker's own GPU (``hilda.pipeline.gpus``); outside a worker, the current
    device."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", worker_device())


def _teacher(cfg: TeacherConfig) -> tuple[Teacher, torch.device]:
    """The worker's teacher on its device, built once per process."""
    key = (cfg.teacher, cfg.layers, cfg.norm, cfg.device)
    if key not in _CACHE:
        device = _cuda_device() if cfg.device == "cuda" else torch.device("cpu")
        teacher = load_teacher(cfg.teacher, cfg.layers, cfg.norm).to(device)
        _CACHE[key] = (teacher, teacher.device)  # where its inputs are decoded
    return _CACHE[key]


def load_images(
    paths: list[str],
    size: tuple[int, int],
    frame: str,
    threads: int = 1,
    expect: list[tuple[int, int]] | None = None,
) -> list[np.ndarray]:
    """Decode (libjpeg draft mode to near the target size) and resize to ``size`` (W, H),
    ``threads`` images at a time (libjpeg and PIL's resize release the GIL). ``expect``:
    each file's (W, H) as its dataset table gives it, checked."""
    from PIL import Image

    sizes = expect if expect is not None else [None] * len(paths)

    def one(path: str, expected: tuple[int, int] | None) -> np.ndarray:
        img = read_image(path, frame, draft=size, expect_size=expected)
        return np.asarray(img.resize(size, Image.Resampling.BICUBIC), dtype=np.uint8)

    if threads <= 1 or len(paths) <= 1:
        return [one(p, e) for p, e in zip(paths, sizes, strict=True)]
    with ThreadPoolExecutor(min(threads, len(paths))) as pool:
        return list(pool.map(one, paths, sizes))


def cuda_decode_available(device: str) -> bool:
    """JPEG decoding on the GPU: CUDA and torchvision's nvjpeg decoder."""
    if device != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


def load_images_cuda(
    paths: list[str],
    size: tuple[int, int],
    frame: str,
    device: torch.device,
    expect: list[tuple[int, int]] | None = None,
) -> list[torch.Tensor]:
    """Decode on the GPU (nvjpeg) and resize to ``size`` (W, H) with antialiased bicubic;
    (3, H, W) uint8 CUDA tensors. ``expect``: each file's (W, H) from its table, checked."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    for path in paths:
        require_file(path, "camera image", frame)
    try:
        data = [read_file(p) for p in paths]
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        raise DatasetError(f"corrupt image ({exc}) in frame {frame}: {paths}") from None
    for path, img, expected in zip(paths, images, expect or [None] * len(paths), strict=True):
        check_image_size((img.shape[2], img.shape[1]), expected, path, frame)
    w, h = size
    out = []
    for img in images:  # (3, H0, W0) uint8
        x = F.interpolate(img[None].float(), (h, w), mode="bicubic", antialias=True)
        out.append(x[0].round().clamp(0, 255).to(torch.uint8))
    return out


def load_class_maps(paths: list[str], size: tuple[int, int], frame: str) -> list[np.ndarray]:
    """The images' per-pixel classes, resized to ``size`` (W, H) by nearest neighbour."""
    from PIL import Image

    return [
        np.asarray(Image.fromarray(read_class_map(p, frame)).resize(size, Image.Resampling.NEAREST))
        for p in paths
    ]


@dataclass
class _Decoded:
    images: list[np.ndarray]
    class_maps: list[np.ndarray]  # for a teacher that reads them (the oracle)
    where: list[tuple[int, int]]  # (frame in shard, camera) of each image
    skipped: dict[int, str]


def _decode(
    cfg: TeacherConfig,
    teacher: Teacher,
    tokens: np.ndarray,
    paths: np.ndarray,
    sizes: np.ndarray,
    f0: int,
    skip_bad: bool,
    threads: int,
    device: torch.device,
) -> _Decoded:
    """Every present image of the shard's frames (and its class map for a teacher that reads
    them); a bad frame is an error naming it, or recorded as skipped with ``skip_bad``. On
    CUDA with torchvision the JPEGs are decoded on the GPU, else by ``threads`` threads."""
    out = _Decoded([], [], [], {})
    on_gpu = device.type == "cuda" and cuda_decode_available("cuda")
    for i in range(len(paths)):
        present = [j for j in range(paths.shape[1]) if paths[i, j]]
        files = [str(paths[i, j]) for j in present]
        expect = [(int(sizes[i, j, 0]), int(sizes[i, j, 1])) for j in present]
        try:
            if on_gpu:
                images = load_images_cuda(files, cfg.image_size, str(tokens[i]), device, expect)
            else:
                images = load_images(files, cfg.image_size, str(tokens[i]), threads, expect)
            maps = (
                load_class_maps(files, cfg.image_size, str(tokens[i]))
                if teacher.needs_class_maps
                else []
            )
        except DatasetError as exc:
            if not skip_bad:
                raise FrameError(
                    f"{exc}; rerun with --skip-bad to record the frame as skipped"
                ) from None
            out.skipped[f0 + i] = str(exc)
            continue
        out.images += images
        out.class_maps += maps
        out.where += [(i, j) for j in present]
    return out


def _forward(cfg: TeacherConfig, teacher: Teacher, decoded: _Decoded) -> list[tuple]:
    """Per image: patches (K, h, w, D) and CLS (K, D) as float32."""
    out = []
    for s in range(0, len(decoded.images), cfg.batch_size):
        images = decoded.images[s : s + cfg.batch_size]
        maps = decoded.class_maps[s : s + cfg.batch_size]
        patches, cls = teacher.features(images, maps)  # (B, K, h, w, D), (B, K, D)
        out += list(zip(patches, cls, strict=True))
    return out


def _write_layers(
    cfg: TeacherConfig,
    blocks: list[int],
    feats: np.ndarray,
    where: list[tuple[int, int]],
    f0: int,
    f1: int,
) -> dict[str, list[float]]:
    """Encode and write each block's (n, V, h, w, D) grids; returns the codec's fidelity over
    the present images per block: [sum of token cosines, tokens, minimum]."""
    path = teacher_path(cfg.group_name())
    stats: dict[str, list[float]] = {}
    rows, cams = (
        (np.array(x, dtype=np.int64) for x in zip(*where, strict=True)) if where else ([], [])
    )
    for layer, block in enumerate(blocks):
        x = feats[:, :, layer]  # (n, V, h, w, D)
        values, scale = codecs.encode(x, cfg.codec)
        write_teacher_block(cfg.store, path, block, f0, f1, values, scale)
        if where:
            decoded = codecs.decode(
                values[rows, cams],
                None if scale is None else (scale[0][rows, cams], scale[1][rows, cams]),
            )
            cos = codecs.token_cosines(x[rows, cams], decoded)
            stats[f"layer_{block}"] = [float(cos.sum()), float(cos.size), float(cos.min())]
    return stats


def extract_shard(
    cfg: TeacherConfig, f0: int, f1: int, skip_bad: bool, threads: int
) -> dict[str, Any]:
    """Dask task: features of frames [f0, f1); writes exactly one shard of each array."""
    torch.set_num_threads(threads)
    teacher, device = _teacher(cfg)
    info = teacher.info
    root = open_store(cfg.store)
    index = read_index(root, ("token", "image_path", "image_size"), f0, f1)
    tokens, paths = index["token"], index["image_path"]  # (n,), (n, V) ("" = no image)
    width, height = cfg.image_size
    n, v = paths.shape
    p = info.patch_size
    k, h, w, dim = len(teacher.blocks), height // p, width // p, info.dim
    sizes = index["image_size"]  # (n, V, 2) width, height
    decoded = _decode(cfg, teacher, tokens, paths, sizes, f0, skip_bad, threads, device)
    feats = np.zeros((n, v, k, h, w, dim), dtype=np.float32)  # skipped frames stay zero
    cls = np.zeros((n, v, k, dim), dtype=np.float32)
    for (i, j), (p, c) in zip(decoded.where, _forward(cfg, teacher, decoded), strict=True):
        feats[i, j], cls[i, j] = p, c
    stats = _write_layers(cfg, teacher.blocks, feats, decoded.where, f0, f1)
    write_frames(cfg.store, teacher_path(cfg.group_name()), f0, f1, {"cls": cls})
    return {"skipped": decoded.skipped, "stats": stats}


@locked_stage("extract-teacher")
def run_teacher(cfg: TeacherConfig, options: StageOptions) -> dict[str, Any]:
    """The extract-teacher stage: patch features and CLS tokens of every camera image."""
    spec = parse_teacher(cfg.teacher)
    info = teacher_info(spec)
    _check_options(cfg, info.patch_size)
    builds = teacher_path(cfg.group_name())
    root = open_for_stage(cfg.store, require=(INDEX.name,), builds=builds)
    if spec.reads_class_maps:  # synthetic worlds alone have them
        _require_class_maps(root)
    if info.random_init:
        from hilda.pipeline.runner import console

        console.print(
            f"[bold yellow]WARNING: teacher {cfg.teacher} is a RANDOMLY INITIALISED "
            f"{info.label} ({info.arch}); its features carry no learned semantics. "
            "Recorded as such in the store.[/]"
        )
    blocks = list(Layers.parse(cfg.layers, info.depth).blocks)
    index = index_info(root)
    num_frames, fps = index.num_frames, index.frames_per_shard
    dtype = codecs.storage_dtype(cfg.codec)
    attrs = _group_attrs(cfg, info, blocks, dtype)
    width, height = cfg.image_size
    dims = {"F": num_frames, "V": len(index.cameras)}
    dims |= {"h": height // info.patch_size, "w": width // info.patch_size, "D": info.dim}
    root.require_group(TEACHERS)
    spec = teacher_group(cfg.group_name(), blocks, dtype)
    compressors = codecs.teacher_compressors(cfg.codec, blocks)
    group = prepare_group(
        root, spec, dims, fps, attrs, overwrite=options.overwrite, compressors=compressors
    )
    threads = max(1, (os.cpu_count() or 1) // max(1, options.cluster.workers))
    cluster, resources = options.cluster, None
    if cfg.device == "cuda":
        cluster, resources = replace(cluster, gpu_workers=True), {"GPU": 1}
    with stage_client(cfg.store, cluster) as client:
        if cfg.device == "cuda":
            assign_gpus(client.client, local=cluster.scheduler is None)
        skipped, _ = run_frame_shards(
            client,
            group,
            extract_shard,
            lambda a, b: (cfg, a, b, options.skip_bad, threads),
            num_frames=num_frames,
            frames_per_shard=fps,
            label=f"teacher {cfg.group_name()}",
            store=cfg.store,
            resources=resources,
        )
    fidelity = codec_fidelity(shard_stats(group))
    set_attr(group, "codec_fidelity", fidelity)
    record_stage(root, builds, {**attrs, "layers": cfg.layers})
    return {
        "frames": num_frames,
        "blocks": blocks,
        "skipped": len(skipped),
        "mean_cos": min((e["mean_cos"] for e in fidelity.values()), default=1.0),
    }


def _check_options(cfg: TeacherConfig, patch: int) -> None:
    width, height = cfg.image_size
    if width % patch or height % patch:
        raise ConfigError(
            f"--image-size {width}x{height}: both sides must be multiples of the teacher's "
            f"patch size {patch}"
        )
    if cfg.codec not in codecs.CODECS:
        raise ConfigError(f"--codec {cfg.codec!r}: use one of {codecs.CODECS}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to torch")


def _group_attrs(cfg: TeacherConfig, info: TeacherInfo, blocks: list[int], dtype: str) -> dict:
    """The teacher group's provenance (``TeacherRecord``): what was extracted, how, and how
    it is stored."""
    norm = "final LayerNorm (get_intermediate_layers norm=True)" if cfg.norm else None
    codec = (
        cfg.codec if cfg.codec != "bitround" else f"bitround keepbits={codecs.BITROUND_KEEPBITS}"
    )
    resize = (
        "nvjpeg + antialiased bicubic to image_size, ImageNet mean/std"
        if cuda_decode_available(cfg.device)
        else "PIL draft + bicubic to image_size, ImageNet mean/std"
    )
    record = TeacherRecord(
        teacher=info,
        blocks=tuple(blocks),
        image_size=cfg.image_size,
        norm=norm or "none (raw block output)",
        codec=codec,
        storage_dtype=dtype,
        resize=resize,
    )
    return record.to_attrs()


def codec_fidelity(shard_stats: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    """Per block: mean and minimum token cosine of the stored features against the float32
    ones, over every shard's [cosine sum, tokens, minimum]."""
    fidelity: dict[str, dict[str, float]] = {}
    for shard in sorted(shard_stats, key=int):  # a fixed order: resumed runs sum identically
        for layer, (total, count, low) in shard_stats[shard].items():
            old = fidelity.get(layer, {"cos_sum": 0.0, "tokens": 0, "min_cos": 1.0})
            fidelity[layer] = {
                "cos_sum": old["cos_sum"] + total,
                "tokens": old["tokens"] + int(count),
                "min_cos": min(old["min_cos"], low),
            }
    for entry in fidelity.values():
        entry["mean_cos"] = entry["cos_sum"] / max(entry["tokens"], 1)
    return fidelity


def _require_class_maps(root) -> None:
    """The oracle needs the synthetic world's class maps: refuse other datasets up front,
    naming the first image without one."""
    from hilda.datasets.io import class_map_path

    paths = read_index(root, ("image_path",), 0, 1)["image_path"].ravel()
    first = next((str(p) for p in paths if p), None)
    if first is not None and not os.path.isfile(class_map_path(first)):
        raise ConfigError(
            f"--teacher oracle works on synthetic worlds only (written by `hilda-prep "
            f"make-synthetic`, which saves per-pixel class maps beside the images); "
            f"{class_map_path(first)} does not exist"
        )
