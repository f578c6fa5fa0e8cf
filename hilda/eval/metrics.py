"""Evaluation metrics. Pure numpy / torch: arrays in, numbers out.

- Semantic segmentation: a confusion matrix accumulated over frames (ignored labels dropped),
  per-class IoU = TP / (TP + FP + FN), mIoU over the classes present in the labels or the
  predictions (a class absent from both has no IoU and is left out, as in the nuScenes
  lidarseg evaluation).
- RankMe (Garrido et al. 2023; CleverDistiller Sec. 3.3): the effective rank of an (N, D)
  embedding matrix, exp of the entropy of its normalised singular values,
  p_k = sigma_k / ||sigma||_1 + eps, RankMe = exp(-sum_k p_k log p_k). Label-free; between 1
  and min(N, D).
"""

from __future__ import annotations

import numpy as np
import torch


def confusion(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """(C, C) int64 counts, rows = label, columns = prediction; ``ignore`` labels dropped."""
    pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
    keep = label != ignore
    pred, label = pred[keep].astype(np.int64), label[keep].astype(np.int64)
    if len(label) and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes}) besides the ignore index {ignore}")
    if len(pred) and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions outside [0, {num_classes})")
    flat = label * num_classes + pred
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """(C,) IoU per class; NaN where the class is neither labelled nor predicted."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """mIoU over the classes that have an IoU."""
    iou = iou_per_class(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe of (N, D) embeddings (computed in float64)."""
    z = embeddings.detach().to(torch.float64)
    if z.ndim != 2 or min(z.shape) == 0:
        raise ValueError(f"RankMe needs a non-empty (N, D) matrix, got {tuple(z.shape)}")
    sigma = torch.linalg.svdvals(z)  # (min(N, D),)
    p = sigma / sigma.sum().clamp(min=eps) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))
