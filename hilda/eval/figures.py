"""The PNGs a researcher looks at after pre-training (matplotlib, Agg backend).

- ``pca_bev.png``: the student's final point features of one frame, PCA -> RGB, from above.
- ``pca_camera.png``: the same colours on the points one camera sees, beside the PCA of the
  teacher's patch features of that image.
- ``similarity.png``: cosine similarity of one anchor point's feature to every other point
  (from above and projected in the image), and of the teacher feature at the anchor's pixel
  to every patch (HilDA Fig. B9-B11).
- ``loss_curves.png``: a run's loss terms and learning rate from its metrics.jsonl.

Every figure has a fixed pixel size (``SIZES``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hilda.atomic import write_json
from hilda.datasets.io import read_image
from hilda.errors import HildaError
from hilda.eval.cache import CameraView, read_camera_view
from hilda.eval.segment import build_backbone, frame_features
from hilda.eval.viz import central_anchor, cosine_to, patch_of, pca_basis, pca_rgb

DPI = 100
SIZES: dict[str, tuple[int, int]] = {  # (width, height) pixels
    "pca_bev.png": (1000, 1000),
    "pca_camera.png": (1600, 520),
    "similarity.png": (1800, 560),
    "loss_curves.png": (1200, 480),
}
LOSS_KEYS = ("loss", "distill", "cls", "aux")


def _figure(name: str, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, h = SIZES[name]
    fig, axes = plt.subplots(1, ncols, figsize=(w / DPI, h / DPI), dpi=DPI, squeeze=False)
    return fig, axes[0]


def _save(fig, out: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = out / name
    fig.savefig(path, dpi=DPI)  # no tight bbox: the size stays SIZES[name]
    plt.close(fig)
    return path


def _bev(ax, points: np.ndarray, colours, range_m: float, title: str, **kw) -> None:
    near = (np.abs(points[:, 0]) < range_m) & (np.abs(points[:, 1]) < range_m)
    c = colours[near] if isinstance(colours, np.ndarray) else colours
    ax.scatter(points[near, 0], points[near, 1], c=c, s=0.6, linewidths=0, **kw)
    ax.set_xlim(-range_m, range_m)
    ax.set_ylim(-range_m, range_m)
    ax.set_aspect("equal")
    ax.set_facecolor("black")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")


def _image(ax, view: CameraView, title: str) -> None:
    w, h = view.image_size
    image = read_image(view.image_path, view.token)
    ax.imshow(np.asarray(image), extent=(0, w, h, 0))  # uv are pixels of this (W, H)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def pca_figures(view: CameraView, feats: np.ndarray, out: Path, range_m: float) -> list[Path]:
    basis = pca_basis(feats)
    rgb = pca_rgb(feats, basis)  # (N, 3)
    fig, (ax,) = _figure("pca_bev.png")
    _bev(ax, view.points, rgb, range_m, f"student features, PCA -> RGB (frame {view.frame})")
    paths = [_save(fig, out, "pca_bev.png")]

    fig, (left, right) = _figure("pca_camera.png", 2)
    _image(left, view, f"{view.camera}: student features of the points it sees")
    left.scatter(*view.uv.T, c=rgb[view.visible], s=3, linewidths=0)
    gh, gw, d = view.patches.shape
    teacher_rgb = pca_rgb(view.patches.reshape(-1, d)).reshape(gh, gw, 3)
    w, h = view.image_size
    right.imshow(teacher_rgb, extent=(0, w, h, 0), interpolation="nearest")
    right.set_title(f"teacher {view.teacher} block {view.block} patches, PCA -> RGB", fontsize=10)
    right.axis("off")
    paths.append(_save(fig, out, "pca_camera.png"))
    return paths


def similarity_figure(
    view: CameraView, feats: np.ndarray, anchor: int, out: Path, range_m: float
) -> Path:
    """``anchor``: row of ``view.visible`` (a point the camera sees)."""
    point = int(view.visible[anchor])
    sim = cosine_to(feats[point], feats)  # (N,)
    gh, gw, _ = view.patches.shape
    row, col = patch_of(view.uv[anchor : anchor + 1], view.image_size, (gh, gw))[0]
    teacher_sim = cosine_to(view.patches[row, col], view.patches)  # (h, w)
    fig, (bev, cam, teach) = _figure("similarity.png", 3)
    x, y = view.points[point, :2]
    _bev(
        bev,
        view.points,
        sim,
        range_m,
        "student: cosine to the anchor",
        cmap="magma",
        vmin=-1,
        vmax=1,
    )
    bev.scatter([x], [y], marker="*", s=250, c="cyan", edgecolors="black")
    _image(cam, view, f"{view.camera}: student cosine, projected")
    cam.scatter(*view.uv.T, c=sim[view.visible], s=3, linewidths=0, cmap="magma", vmin=-1, vmax=1)
    u, v = view.uv[anchor]
    cam.scatter([u], [v], marker="*", s=250, c="cyan", edgecolors="black")
    _image(teach, view, f"teacher block {view.block}: cosine to the anchor's patch")
    w, h = view.image_size
    teach.imshow(
        teacher_sim,
        extent=(0, w, h, 0),
        cmap="magma",
        vmin=-1,
        vmax=1,
        alpha=0.75,
        interpolation="nearest",
    )
    teach.scatter([u], [v], marker="*", s=250, c="cyan", edgecolors="black")
    return _save(fig, out, "similarity.png")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise HildaError(f"no metrics file {path}: pass the run folder of hilda-train run")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise HildaError(f"{path} line {i} is not JSON: {exc}") from None
    if not records:
        raise HildaError(f"{path} holds no records (the run logged no step yet)")
    return records


def loss_figure(metrics: Path, out: Path) -> Path:
    records = read_metrics(metrics)
    steps = [r["step"] for r in records]
    fig, (losses, lr) = _figure("loss_curves.png", 2)
    for key in LOSS_KEYS:
        if key in records[0]:
            losses.plot(steps, [r.get(key, np.nan) for r in records], label=key, marker=".")
    losses.set_yscale("log")
    losses.set_xlabel("step")
    losses.set_title(f"loss terms ({metrics.parent.name})", fontsize=10)
    losses.legend()
    losses.grid(alpha=0.3)
    lr.plot(steps, [r.get("lr", np.nan) for r in records], color="black")
    lr.set_xlabel("step")
    lr.set_title("learning rate", fontsize=10)
    lr.grid(alpha=0.3)
    fig.tight_layout()  # moves axes inside the figure; the canvas size is unchanged
    return _save(fig, out, "loss_curves.png")


def write_figures(
    backbone: str | Path,
    store: str,
    out: str | Path,
    *,
    frame: int = 0,
    camera: str | None = None,
    teacher: str | None = None,
    anchor: int | None = None,
    run: str | Path | None = None,
    range_m: float = 50.0,
    voxel_size: float | None = None,
) -> dict[str, Path]:
    """Write the figures into ``out``; ``anchor`` is a point index of the frame (default: the
    point seen nearest the image centre), ``run`` the hilda-train folder with metrics.jsonl
    (default: the checkpoint's folder, when it has one)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    view = read_camera_view(store, frame, camera, teacher)
    if len(view.visible) == 0:
        raise HildaError(f"{store}: camera {view.camera} sees no point of frame {frame}")
    net = build_backbone(str(backbone), voxel_size=voxel_size)
    feats = frame_features(net, view.points)[0].numpy()  # (N, C)
    if anchor is None:
        row = central_anchor(view.uv, view.image_size)
    else:
        rows = np.flatnonzero(view.visible == anchor)
        if len(rows) == 0:
            raise HildaError(f"point {anchor} of frame {frame} is not seen by {view.camera}")
        row = int(rows[0])
    paths = pca_figures(view, feats, out, range_m)
    paths.append(similarity_figure(view, feats, row, out, range_m))
    metrics = Path(run) / "metrics.jsonl" if run is not None else None
    if metrics is None and (Path(backbone).parent / "metrics.jsonl").is_file():
        metrics = Path(backbone).parent / "metrics.jsonl"
    if metrics is not None:
        paths.append(loss_figure(metrics, out))
    meta = {
        "backbone": str(backbone),
        "store": view.store,
        "frame": frame,
        "token": view.token,
        "camera": view.camera,
        "teacher": view.teacher,
        "teacher_block": view.block,
        "anchor_point": int(view.visible[row]),
        "anchor_uv": [float(x) for x in view.uv[row]],
        "metrics": str(metrics) if metrics else None,
        "figures": [p.name for p in paths],
    }
    write_json(out / "figures.json", meta)
    return {p.name: p for p in paths}
