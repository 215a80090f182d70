"""Scoring clusters against classes: confusion matrices, cluster-to-class mappings, IoU, label-free proxies.

Clusters carry no class names, so a mapping is fitted on one confusion matrix (``metrics_train``)
and scored on another (``val``):

- Hungarian: one-to-one (``scipy.optimize.linear_sum_assignment`` on the rectangular matrix);
  clusters left without a class (K > classes) count as errors, classes left without a cluster
  score IoU 0.
- majority vote: every cluster takes its most frequent class (many-to-one), so it flatters large
  K; always report it with its K.

Labels ``<= ignore_leq`` are ignored. Column ``j`` of a confusion matrix is label value
``ignore_leq + 1 + j``. A cluster-class pair with no fitting pixels is no evidence: it stays unmapped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

UNMAPPED = -1
_CHUNK = 1 << 18  # pixels per bincount: index buffer stays in cache


def confusion_matrix(
    pred: np.ndarray, label: np.ndarray, n_clusters: int, n_classes: int, ignore_leq: int = 0
) -> np.ndarray:
    """Counts ``[n_clusters, n_classes]`` (int64) of cluster ``pred`` vs label over pixels with label > ignore_leq.

    One ``np.bincount`` per chunk over ``pred * (n_classes + 1) + column``; ignored pixels fall in an
    extra column 0 that is dropped, so no boolean gather is needed.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match label shape {label.shape}")
    if n_clusters < 1 or n_classes < 1:
        raise ValueError(f"need at least one cluster and one class, got {n_clusters} and {n_classes}")
    for name, array in (("prediction", pred), ("label", label)):
        if array.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    width = n_classes + 1
    top_label = ignore_leq + n_classes
    counts = np.zeros(n_clusters * width, dtype=np.int64)
    pred, label = pred.ravel(), label.ravel()
    index = np.empty(min(_CHUNK, pred.size), dtype=np.intp)
    for start in range(0, pred.size, _CHUNK):
        p, lab = pred[start : start + _CHUNK], label[start : start + _CHUNK]
        if lab.max() > top_label:
            raise ValueError(f"label value {lab.max()} is above the last class {top_label} (n_classes={n_classes})")
        buf = index[: p.size]
        np.multiply(p, width, out=buf, casting="unsafe")
        if ignore_leq == 0 and label.dtype.kind == "u":
            buf += lab  # label values already are the columns, 0 being the ignored one
        else:
            buf += np.maximum(lab.astype(np.intp) - ignore_leq, 0)
        if p.dtype.kind == "i" and p.min() < 0:
            raise ValueError(f"cluster id {p.min()} is negative")
        chunk_counts = np.bincount(buf, minlength=counts.size)
        if chunk_counts.size > counts.size:
            raise ValueError(f"cluster id {p.max()} is outside [0, {n_clusters})")
        counts += chunk_counts
    return counts.reshape(n_clusters, width)[:, 1:]


def class_values(n_classes: int, ignore_leq: int = 0) -> list[int]:
    """The label value of each confusion-matrix column."""
    return list(range(ignore_leq + 1, ignore_leq + 1 + n_classes))


def hungarian_mapping(fit_confusion: np.ndarray) -> np.ndarray:
    """Cluster -> class column, one-to-one, maximising matched pixels; ``UNMAPPED`` for the rest."""
    # Imported here: scipy.optimize is a third of a second at import, paid by every train/eval command line
    # (a refused one too) though only scoring needs it.
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(fit_confusion, maximize=True)
    mapping = np.full(fit_confusion.shape[0], UNMAPPED, dtype=np.int64)
    supported = fit_confusion[rows, cols] > 0
    mapping[rows[supported]] = cols[supported]
    return mapping


def majority_mapping(fit_confusion: np.ndarray) -> np.ndarray:
    """Cluster -> its most frequent class column (many-to-one); ``UNMAPPED`` for clusters with no pixels."""
    mapping = fit_confusion.argmax(axis=1).astype(np.int64)
    mapping[fit_confusion.sum(axis=1) == 0] = UNMAPPED
    return mapping


@dataclass
class Scores:
    """IoU scores of one mapping applied to one confusion matrix."""

    mapping: str  # "hungarian" or "majority"
    k: int
    miou: float | None  # macro mean over classes present in the scored labels
    pixel_accuracy: float | None
    per_class_iou: dict[str, float | None]  # label value -> IoU (None: class absent from the scored labels)
    cluster_to_class: list[int | None]  # label value per cluster (None: unmapped, its pixels are errors)
    n_pixels: int

    def to_dict(self) -> dict:
        return asdict(self)


def mapped_scores(confusion: np.ndarray, mapping: np.ndarray, ignore_leq: int = 0, kind: str = "hungarian") -> Scores:
    """Per-class IoU, mIoU (macro over present classes) and pixel accuracy of ``mapping`` on ``confusion``."""
    n_clusters, n_classes = confusion.shape
    if mapping.shape != (n_clusters,):
        raise ValueError(f"mapping has shape {mapping.shape}, expected ({n_clusters},)")
    mapped = mapping != UNMAPPED
    targets = mapping[mapped]
    truth = confusion.sum(axis=0)
    predicted = np.bincount(targets, weights=confusion[mapped].sum(axis=1), minlength=n_classes)
    hits = np.bincount(targets, weights=confusion[mapped, targets], minlength=n_classes)
    union = truth + predicted - hits
    present = truth > 0
    iou = np.where(present, hits / np.maximum(union, 1), np.nan)
    total = int(confusion.sum())
    values = class_values(n_classes, ignore_leq)
    return Scores(
        mapping=kind,
        k=n_clusters,
        miou=float(iou[present].mean()) if present.any() else None,
        pixel_accuracy=float(hits.sum() / total) if total else None,
        per_class_iou={str(v): (float(x) if p else None) for v, x, p in zip(values, iou, present, strict=True)},
        cluster_to_class=[values[c] if c != UNMAPPED else None for c in mapping.tolist()],
        n_pixels=total,
    )


def hungarian_scores(fit_confusion: np.ndarray, eval_confusion: np.ndarray, ignore_leq: int = 0) -> Scores:
    """Fit the one-to-one mapping on ``fit_confusion``; score it on ``eval_confusion``."""
    _check_same_shape(fit_confusion, eval_confusion)
    return mapped_scores(eval_confusion, hungarian_mapping(fit_confusion), ignore_leq, "hungarian")


def majority_scores(fit_confusion: np.ndarray, eval_confusion: np.ndarray, ignore_leq: int = 0) -> Scores:
    """Fit the many-to-one majority mapping on ``fit_confusion``; score it on ``eval_confusion``."""
    _check_same_shape(fit_confusion, eval_confusion)
    return mapped_scores(eval_confusion, majority_mapping(fit_confusion), ignore_leq, "majority")


def _check_same_shape(fit_confusion: np.ndarray, eval_confusion: np.ndarray) -> None:
    if fit_confusion.shape != eval_confusion.shape:
        raise ValueError(f"fit matrix {fit_confusion.shape} and scored matrix {eval_confusion.shape} differ")


def pad_confusion(confusion: np.ndarray, n_classes: int) -> np.ndarray:
    """Widen a confusion matrix with zero columns up to ``n_classes`` (classes a tile did not contain)."""
    if confusion.shape[1] > n_classes:
        raise ValueError(f"cannot shrink a confusion matrix from {confusion.shape[1]} to {n_classes} classes")
    return np.pad(confusion, ((0, 0), (0, n_classes - confusion.shape[1])))


# -- label-free proxies ------------------------------------------------------------------------


def label_proxies(labels: np.ndarray, k: int) -> dict[str, float]:
    """Quality signals that need no ground truth, for one ``[H, W]`` cluster map.

    ``utilisation``: share of the K clusters that own at least one pixel; ``usage_entropy``: entropy
    of the cluster sizes over log K (1 = balanced); ``speckle``: share of pixels whose 4 neighbours
    all carry another cluster; ``boundary_density``: share of adjacent pixel pairs that disagree.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0:
        raise ValueError(f"expected a non-empty [H, W] label map, got shape {labels.shape}")
    counts = np.bincount(labels.ravel(), minlength=k)[:k]
    shares = counts[counts > 0] / labels.size
    entropy = float(-(shares * np.log(shares)).sum() / np.log(k)) if k > 1 else 0.0
    diff_h = labels[:, 1:] != labels[:, :-1]
    diff_v = labels[1:, :] != labels[:-1, :]
    same_neighbour = np.zeros(labels.shape, dtype=bool)
    same_neighbour[:, 1:] |= ~diff_h
    same_neighbour[:, :-1] |= ~diff_h
    same_neighbour[1:, :] |= ~diff_v
    same_neighbour[:-1, :] |= ~diff_v
    pairs = diff_h.size + diff_v.size
    return {
        "utilisation": float((counts > 0).sum() / k),
        "usage_entropy": entropy,
        "speckle": float((~same_neighbour).mean()) if labels.size > 1 else 0.0,
        "boundary_density": float((diff_h.sum() + diff_v.sum()) / pairs) if pairs else 0.0,
    }


def view_consistency(labels: np.ndarray, other_view_labels: np.ndarray, k: int) -> float:
    """Share of pixels two label maps of the same ground agree on, after matching their cluster ids one-to-one."""
    from scipy.optimize import linear_sum_assignment  # see hungarian_mapping

    agreement = confusion_matrix(labels, other_view_labels.astype(np.intp) + 1, k, k)
    rows, cols = linear_sum_assignment(agreement, maximize=True)
    return float(agreement[rows, cols].sum() / max(agreement.sum(), 1))
