"""Confusion matrices, mappings and IoU checked against matrices computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training_core.metrics import (
    UNMAPPED,
    confusion_matrix,
    hungarian_mapping,
    hungarian_scores,
    label_proxies,
    majority_mapping,
    majority_scores,
    view_consistency,
)


def _pixels_for(confusion: list[list[int]], ignored: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flat (pred, label) arrays realising a confusion matrix, plus ``ignored`` label-0 pixels, shuffled."""
    pred, label = [], []
    for cluster, row in enumerate(confusion):
        for column, count in enumerate(row):
            pred += [cluster] * count
            label += [column + 1] * count
    pred += [0] * ignored
    label += [0] * ignored
    order = np.random.default_rng(0).permutation(len(pred))
    return np.array(pred, np.uint8)[order], np.array(label, np.uint8)[order]


def test_confusion_matrix_by_hand() -> None:
    pred = np.array([[0, 0, 1], [1, 2, 2]], np.uint8)
    label = np.array([[1, 1, 2], [0, 2, 1]], np.uint8)
    expected = [[2, 0], [0, 1], [1, 1]]  # the label-0 pixel (cluster 1) is ignored
    np.testing.assert_array_equal(confusion_matrix(pred, label, 3, 2), expected)


def test_confusion_matrix_ignore_threshold_and_signed_labels() -> None:
    pred = np.array([0, 1, 1, 0, 1])
    label = np.array([-1, 1, 2, 3, 3])  # ignore_leq=1: -1 and 1 are ignored, columns are labels 2 and 3
    np.testing.assert_array_equal(confusion_matrix(pred, label, 2, 2, ignore_leq=1), [[0, 1], [1, 1]])


def test_confusion_matrix_across_chunks_matches_a_plain_count() -> None:
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 5, 700_001).astype(np.uint8)
    label = rng.integers(0, 4, 700_001).astype(np.uint8)
    expected = np.zeros((5, 3), np.int64)
    keep = label > 0
    np.add.at(expected, (pred[keep], label[keep] - 1), 1)
    np.testing.assert_array_equal(confusion_matrix(pred, label, 5, 3), expected)


def test_all_ignored_tile() -> None:
    confusion = confusion_matrix(np.array([[0, 1], [1, 0]]), np.zeros((2, 2), np.uint8), 2, 2)
    assert confusion.sum() == 0 and confusion.shape == (2, 2)
    scores = hungarian_scores(confusion, confusion)
    assert scores.miou is None and scores.pixel_accuracy is None and scores.n_pixels == 0
    assert scores.per_class_iou == {"1": None, "2": None}
    assert scores.cluster_to_class == [None, None]  # no fitting pixels, no evidence for any pair


@pytest.mark.parametrize(
    ("pred", "label", "message"),
    [
        (np.array([0, 3]), np.array([1, 1]), "cluster id 3"),
        (np.array([0, -1]), np.array([1, 1]), "negative"),
        (np.array([0, 1]), np.array([1, 4]), "label value 4"),
        (np.array([0, 1]), np.array([1]), "shape"),
        (np.array([0.0, 1.0]), np.array([1, 1]), "integers"),
    ],
)
def test_confusion_matrix_rejects_bad_input(pred, label, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        confusion_matrix(pred, label, 3, 3)


# More clusters than classes: Hungarian leaves cluster 2 unmatched, its 4 pixels are errors.
K_ABOVE_CLASSES = [[5, 1], [0, 3], [2, 2]]


def test_hungarian_with_more_clusters_than_classes() -> None:
    pred, label = _pixels_for(K_ABOVE_CLASSES, ignored=9)
    confusion = confusion_matrix(pred, label, 3, 2)
    np.testing.assert_array_equal(confusion, K_ABOVE_CLASSES)
    np.testing.assert_array_equal(hungarian_mapping(confusion), [0, 1, UNMAPPED])
    scores = hungarian_scores(confusion, confusion)
    # class 1: hits 5, truth 7, predicted 6 -> 5/8; class 2: hits 3, truth 6, predicted 3 -> 3/6
    assert scores.per_class_iou == {"1": 5 / 8, "2": 3 / 6}
    assert scores.miou == pytest.approx((5 / 8 + 3 / 6) / 2)
    assert scores.pixel_accuracy == pytest.approx(8 / 13)
    assert scores.cluster_to_class == [1, 2, None] and scores.k == 3 and scores.n_pixels == 13


def test_majority_with_more_clusters_than_classes() -> None:
    confusion = np.array(K_ABOVE_CLASSES)
    np.testing.assert_array_equal(majority_mapping(confusion), [0, 1, 0])  # tie 2/2 -> the first class
    scores = majority_scores(confusion, confusion)
    # class 1: hits 7, truth 7, predicted 10 -> 0.7; class 2: 3/6
    assert scores.per_class_iou == {"1": 0.7, "2": 0.5}
    assert scores.miou == pytest.approx(0.6) and scores.pixel_accuracy == pytest.approx(10 / 13)
    assert scores.mapping == "majority" and scores.k == 3


def test_fewer_clusters_than_classes_scores_the_orphan_class_zero() -> None:
    confusion = np.array([[5, 1, 0], [0, 0, 4]])
    scores = hungarian_scores(confusion, confusion)
    assert scores.cluster_to_class == [1, 3]
    assert scores.per_class_iou == {"1": 5 / 6, "2": 0.0, "3": 1.0}
    assert scores.miou == pytest.approx((5 / 6 + 0 + 1) / 3)


def test_class_absent_from_scored_labels_is_left_out_of_the_mean() -> None:
    fit = np.array([[4, 0, 0], [0, 4, 0], [0, 0, 4]])
    scored = np.array([[3, 0, 0], [0, 2, 0], [1, 0, 0]])  # no class-3 truth; cluster 2 still predicts it once
    scores = hungarian_scores(fit, scored)
    assert scores.per_class_iou == {"1": 3 / 4, "2": 1.0, "3": None}
    assert scores.miou == pytest.approx((3 / 4 + 1.0) / 2)
    assert scores.pixel_accuracy == pytest.approx(5 / 6)


def test_mapping_comes_from_the_fit_matrix_only() -> None:
    fit = np.array([[10, 0], [0, 10]])
    scored = np.array([[0, 10], [10, 0]])  # a mapping fitted here would score 1.0
    assert hungarian_scores(fit, scored).miou == 0.0
    assert majority_scores(fit, scored).miou == 0.0
    assert hungarian_scores(scored, scored).miou == 1.0


def test_label_proxies_by_hand() -> None:
    labels = np.array([[0, 0, 1], [0, 2, 1]])
    proxies = label_proxies(labels, 4)
    shares = np.array([3, 2, 1]) / 6
    assert proxies["utilisation"] == 0.75
    assert proxies["usage_entropy"] == pytest.approx(float(-(shares * np.log(shares)).sum() / math.log(4)))
    assert proxies["boundary_density"] == pytest.approx(4 / 7)  # 3 of 4 horizontal pairs, 1 of 3 vertical
    assert proxies["speckle"] == pytest.approx(1 / 6)  # only the 2 is isolated


def test_view_consistency_matches_cluster_ids() -> None:
    assert view_consistency(np.array([[0, 0, 1, 1]]), np.array([[1, 1, 0, 2]]), 3) == 0.75
    assert view_consistency(np.array([[0, 1]]), np.array([[1, 0]]), 2) == 1.0
