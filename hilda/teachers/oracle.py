"""A teacher with known semantics for the synthetic world (``--teacher oracle``).

Its patch feature is a fixed random embedding of the patch's majority class (the synthetic
renderer's per-pixel classes) plus a texture term: a fixed random projection of the patch's
colour statistics (mean and standard deviation of R, G, B), so features of one class spread
with shading and surface detail and the classes are not trivially separable. Each block gets
its own embedding and projection; the CLS token is the mean of the image's patch features.

It is written to the same cache group, with the same codecs, as DINOv2's features, so the
trainer, the evaluation and every test exercise the real path (it is a ``Teacher`` like the
ViTs, so the stage has no oracle branch); what the student can learn from
it is known in advance, which makes "distillation transfers semantics" a testable claim. Pure
numpy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hilda.store.teacher_record import TeacherInfo

FAMILY = "oracle"
PATCH = 14
ORACLE_ID = "oracle"
NUM_LABELS = 256  # uint8 class maps


@dataclass(frozen=True)
class OracleSpec:
    dim: int = 384  # ViT-S's width, so the presets' heads keep their shapes
    depth: int = 12  # blocks that --layers selects from, as for ViT-S
    texture: float = 0.5  # norm of the texture term for a typical patch; class term norm 1
    seed: int = 0

    def weights_hash(self) -> str:
        """Stands in for a model's weights hash: the spec fixes every feature."""
        blob = json.dumps({"oracle": 1, **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def majority_class(class_map: np.ndarray) -> np.ndarray:
    """(H, W) labels, H and W multiples of 14 -> (h, w) the most frequent label of each 14 x 14
    patch (ties: the smaller label)."""
    height, width = class_map.shape
    h, w = height // PATCH, width // PATCH
    patches = class_map.reshape(h, PATCH, w, PATCH).transpose(0, 2, 1, 3).reshape(h * w, -1)
    key = np.arange(h * w)[:, None] * NUM_LABELS + patches  # (h w, 196)
    counts = np.bincount(key.ravel(), minlength=h * w * NUM_LABELS).reshape(h * w, NUM_LABELS)
    return counts.argmax(axis=1).reshape(h, w)


def colour_statistics(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 6): per patch mean and standard deviation of each channel,
    centred and scaled to about unit range."""
    height, width, _ = image.shape
    h, w = height // PATCH, width // PATCH
    x = image.astype(np.float32).reshape(h, PATCH, w, PATCH, 3) / 255.0
    mean = x.mean(axis=(1, 3))  # (h, w, 3)
    std = x.std(axis=(1, 3))  # (h, w, 3)
    return np.concatenate([(mean - 0.5) * 2.0, std * 4.0], axis=-1)


def oracle_info(spec: OracleSpec | None = None) -> TeacherInfo:
    """The oracle's record in the store."""
    spec = spec or OracleSpec()
    return TeacherInfo(
        model_id=ORACLE_ID,
        arch=ORACLE_ID,
        dim=spec.dim,
        depth=spec.depth,
        registers=0,
        weights_hash=spec.weights_hash(),
        random_init=False,
        pos_embed_interpolation="none (no position embeddings)",
        family=FAMILY,
        patch_size=PATCH,
    )


class OracleTeacher:
    """Patch features and CLS tokens of selected blocks, like a ViT teacher's: a ``Teacher``
    that reads each image's class map beside it. Pure numpy, on the CPU whatever the device."""

    needs_class_maps = True
    device = torch.device("cpu")  # numpy: its inputs are decoded on the CPU

    def __init__(self, spec: OracleSpec, blocks: list[int] | tuple[int, ...]) -> None:
        self.spec = spec
        self.blocks = tuple(blocks)
        self.info = oracle_info(spec)
        self.embed, self.project = [], []
        for block in blocks:
            rng = np.random.default_rng([spec.seed, block])
            self.embed.append(_unit_rows(rng.normal(size=(NUM_LABELS, spec.dim))))  # (256, D)
            proj = rng.normal(size=(6, spec.dim)) / np.sqrt(6 * spec.dim)  # (6, D)
            self.project.append(proj * spec.texture / 0.5)  # typical |stats| ~ 0.5 per entry

    def __call__(
        self, images: list[np.ndarray], class_maps: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """images [(H, W, 3) uint8], class_maps [(H, W) uint8] at the teacher's image size ->
        patches (B, K, h, w, D) float32 and cls (B, K, D) float32."""
        patches = []
        for image, classes in zip(images, class_maps, strict=True):
            label = majority_class(classes)  # (h, w)
            stats = colour_statistics(image)  # (h, w, 6)
            per_block = [
                e[label] + stats @ p for e, p in zip(self.embed, self.project, strict=True)
            ]
            patches.append(np.stack(per_block))  # (K, h, w, D)
        out = np.stack(patches).astype(np.float32)  # (B, K, h, w, D)
        return out, out.mean(axis=(2, 3))

    def to(self, device: torch.device) -> OracleTeacher:
        del device  # numpy on the CPU whatever the stage's device
        return self

    def features(
        self, images: list[np.ndarray], class_maps: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        return self(images, class_maps)
