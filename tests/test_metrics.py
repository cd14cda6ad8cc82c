"""Dense-prediction metrics against a brute force that counts pixel sets image by image."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from cdgrad.experiments.metrics import (
    class_iou,
    confusion_matrix,
    generalisation_gap,
    mean_iou,
    pixel_accuracy,
)

IGNORE = 255


def brute_force(
    preds: Tensor, targets: Tensor, num_classes: int, ignore_index: int = IGNORE
) -> tuple[float, list[float], float]:
    """Pixel accuracy (%), per-class IoU and mean IoU (%) by building, for each class, the sets of pixels
    (image, row, column) it is predicted at and truly at, over all images, one pixel at a time."""
    pred_sets: list[set[tuple[int, int, int]]] = [set() for _ in range(num_classes)]
    true_sets: list[set[tuple[int, int, int]]] = [set() for _ in range(num_classes)]
    correct = labelled = 0
    for n, (pred, target) in enumerate(zip(preds, targets, strict=True)):
        rows, cols = target.shape
        for i in range(rows):
            for j in range(cols):
                t, p = int(target[i, j]), int(pred[i, j])
                if t == ignore_index:
                    continue
                labelled += 1
                correct += t == p
                true_sets[t].add((n, i, j))
                pred_sets[p].add((n, i, j))
    ious = []
    for c in range(num_classes):
        union = pred_sets[c] | true_sets[c]
        ious.append(len(pred_sets[c] & true_sets[c]) / len(union) if union else math.nan)
    present = [v for v in ious if not math.isnan(v)]
    acc = 100.0 * correct / labelled if labelled else math.nan
    return acc, ious, (100.0 * sum(present) / len(present) if present else math.nan)


@st.composite
def label_maps(draw: st.DrawFn) -> tuple[Tensor, Tensor, int]:
    """A batch of (pred, target) label maps with some pixels ignored (prediction there arbitrary)."""
    num_classes = draw(st.integers(1, 6))
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    p_ignore = draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (n, h, w), generator=g)
    pred = torch.where(
        torch.rand(n, h, w, generator=g) < 0.5, target, torch.randint(0, num_classes, (n, h, w), generator=g)
    )
    ignored = torch.rand(n, h, w, generator=g) < p_ignore
    target[ignored] = IGNORE
    pred[ignored] = torch.randint(0, 300, (int(ignored.sum()),), generator=g)  # not looked at
    return pred, target, num_classes


def _assert_nan_equal(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(label_maps())
def test_against_brute_force(case: tuple[Tensor, Tensor, int]) -> None:
    pred, target, num_classes = case
    cm = confusion_matrix(pred, target, num_classes)
    assert cm.dtype == torch.int64 and cm.shape == (num_classes, num_classes)
    acc, ious, miou = brute_force(pred, target, num_classes)
    assert int(cm.sum()) == int((target != IGNORE).sum())
    _assert_nan_equal([pixel_accuracy(cm)], [acc])
    _assert_nan_equal(class_iou(cm).tolist(), ious)
    _assert_nan_equal([mean_iou(cm)], [miou])


@settings(max_examples=30, deadline=None)
@given(label_maps(), st.integers(1, 3))
def test_per_batch_matrices_add_up(case: tuple[Tensor, Tensor, int], batch: int) -> None:
    pred, target, num_classes = case
    parts = [
        confusion_matrix(pred[i : i + batch], target[i : i + batch], num_classes) for i in range(0, len(pred), batch)
    ]
    total = torch.stack(parts).sum(0)
    assert torch.equal(total, confusion_matrix(pred, target, num_classes))
    acc, ious, miou = brute_force(pred, target, num_classes)
    _assert_nan_equal([pixel_accuracy(total), mean_iou(total)], [acc, miou])


def test_rows_are_truth_columns_prediction() -> None:
    target = torch.tensor([[0, 0, 1, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1, 0]])
    expected = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 1, 0]])
    assert torch.equal(confusion_matrix(pred, target, 3), expected)
    assert torch.equal(confusion_matrix(pred.to(torch.uint8), target.to(torch.uint8), 3), expected)


def test_perfect_prediction_gives_100() -> None:
    target = torch.randint(0, 4, (2, 5, 7), generator=torch.Generator().manual_seed(0))
    target[0, 0, :3] = IGNORE
    cm = confusion_matrix(target.clone(), target, 4)
    assert pixel_accuracy(cm) == 100.0 and mean_iou(cm) == 100.0
    assert torch.equal(class_iou(cm), torch.ones(4, dtype=torch.float64))


def test_nan_only_for_classes_absent_from_truth_and_prediction() -> None:
    # class 0: in both (1 common pixel, a union of 3); class 1: only predicted (IoU 0); class 2: only true
    # (IoU 0); class 3: absent from both (nan, left out of the mean)
    target = torch.tensor([[0, 0, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 0]])
    iou = class_iou(confusion_matrix(pred, target, 4))
    assert iou[0] == pytest.approx(1 / 3) and iou[1] == 0 and iou[2] == 0 and math.isnan(iou[3])
    assert mean_iou(confusion_matrix(pred, target, 4)) == pytest.approx(100 * (1 / 3) / 3)


def test_empty_matrix_gives_nan() -> None:
    cm = confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), IGNORE), 3)
    assert int(cm.sum()) == 0
    assert math.isnan(pixel_accuracy(cm)) and math.isnan(mean_iou(cm)) and bool(torch.isnan(class_iou(cm)).all())


def test_ignore_index_none_and_other_values() -> None:
    target = torch.tensor([[0, 1, 2]])
    pred = torch.tensor([[0, 1, 1]])
    assert int(confusion_matrix(pred, target, 3, ignore_index=None).sum()) == 3
    assert torch.equal(
        confusion_matrix(pred, target, 3, ignore_index=2), torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    )


def test_errors_name_the_parameter() -> None:
    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="pred and target must have the same shape"):
        confusion_matrix(torch.zeros(2, 4, dtype=torch.long), t, 3)
    with pytest.raises(ValueError, match=r"target has labels outside \[0, 3\)"):
        confusion_matrix(t, torch.tensor([[0, 1, 3], [0, 0, 0]]), 3)
    with pytest.raises(ValueError, match=r"target has labels outside"):
        confusion_matrix(t, torch.tensor([[0, 1, -1], [0, 0, 0]]), 3)
    with pytest.raises(ValueError, match=r"pred has labels outside \[0, 3\)"):
        confusion_matrix(torch.tensor([[0, 1, 7], [0, 0, 0]]), t, 3)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(t, t, 0)
    with pytest.raises(ValueError, match="pred must be an integer tensor"):
        confusion_matrix(t.float(), t, 3)
    with pytest.raises(ValueError, match="cm must be a square"):
        pixel_accuracy(torch.zeros(2, 3))


def test_generalisation_gap_is_train_minus_test() -> None:
    assert generalisation_gap(92.5, 71.0) == pytest.approx(21.5)
    assert generalisation_gap(60.0, 65.0) == pytest.approx(-5.0)
