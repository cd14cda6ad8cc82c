"""Dense-prediction metrics from one confusion matrix: pixel accuracy, per-class IoU, mean IoU.

The confusion matrix `cm[t, p]` counts the labelled pixels of true class t predicted as class p. It adds up over
batches and processes, so the metrics of a whole split come from the sum of the per-batch matrices:

    pixel accuracy = 100 * tr(cm) / sum(cm)
    IoU_c          = cm[c, c] / (sum_p cm[c, p] + sum_t cm[t, c] - cm[c, c])      (nan if class c is absent
                                                                                  from truth and prediction)
    mean IoU       = 100 * nanmean_c IoU_c
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["class_iou", "confusion_matrix", "generalisation_gap", "mean_iou", "pixel_accuracy"]


def _is_label_tensor(x: object) -> bool:
    return isinstance(x, Tensor) and not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> Tensor:
    """Confusion matrix (num_classes, num_classes), int64, rows the true class and columns the predicted one.

    `cm[t, p] = #{pixels: target = t, pred = p}` over the pixels whose target is not `ignore_index` (None: none
    ignored); the prediction of an ignored pixel is not looked at. One `torch.bincount` of
    `num_classes * target + pred` on the tensors' device.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not _is_label_tensor(pred):
        raise ValueError(f"pred must be an integer tensor of class labels, got {getattr(pred, 'dtype', type(pred))}")
    if not _is_label_tensor(target):
        raise ValueError(
            f"target must be an integer tensor of class labels, got {getattr(target, 'dtype', type(target))}"
        )
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got pred {tuple(pred.shape)}, target {tuple(target.shape)}"
        )
    if pred.device != target.device:
        raise ValueError(
            f"pred and target must be on the same device, got pred on {pred.device}, target on {target.device}"
        )
    t = target.reshape(-1).to(torch.int64)
    p = pred.reshape(-1).to(torch.int64)
    if ignore_index is not None:
        keep = t != ignore_index
        t, p = t[keep], p[keep]
    for name, labels in (("target", t), ("pred", p)):
        if labels.numel() and bool(((labels < 0) | (labels >= num_classes)).any()):
            lo, hi = int(labels.min()), int(labels.max())
            raise ValueError(
                f"{name} has labels outside [0, {num_classes}) (num_classes={num_classes}, ignore_index="
                f"{ignore_index}): found values in [{lo}, {hi}]"
            )
    counts = torch.bincount(num_classes * t + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _check_cm(cm: Tensor) -> Tensor:
    if not isinstance(cm, Tensor) or cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square (C, C) tensor, got {tuple(getattr(cm, 'shape', ()))}")
    return cm.to(torch.float64)


def pixel_accuracy(cm: Tensor) -> float:
    """Pixel accuracy in percent, `100 * tr(cm) / sum(cm)` (nan for an empty matrix)."""
    c = _check_cm(cm)
    total = float(c.sum())
    return 100.0 * float(c.diagonal().sum()) / total if total > 0 else math.nan


def class_iou(cm: Tensor) -> Tensor:
    """Per-class IoU (C,), float64 in [0, 1]: `cm[c, c] / (row_c + col_c - cm[c, c])`.

    nan for a class absent from both truth and prediction (empty union); a class only predicted, or only
    present in the truth, has IoU 0.
    """
    c = _check_cm(cm)
    inter = c.diagonal()
    union = c.sum(1) + c.sum(0) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, math.nan))


def mean_iou(cm: Tensor) -> float:
    """Mean IoU in percent, `100 * nanmean(class_iou(cm))` over the classes present in truth or prediction."""
    iou = class_iou(cm)
    present = ~torch.isnan(iou)
    return 100.0 * float(iou[present].mean()) if bool(present.any()) else math.nan


def generalisation_gap(train: float, test: float) -> float:
    """Generalisation gap `train - test`.

    The paper's gap is the training metric minus the test metric, both measured by the same evaluation (no
    augmentation, the same metric code) on each split; for a higher-is-better metric a smaller gap is better.
    """
    return float(train) - float(test)
