"""Confusion-matrix accumulation speed against a bare ``np.bincount`` floor; prints one JSON line.

Floor: ``np.bincount`` over an index array that is already computed (``intp``), for the same pixel
count: the counting alone. ``confusion_matrix`` also builds the index from uint8 predictions and
labels, drops ignored pixels and checks ranges. Target: at least 0.5 of the floor's pixels/s.
"""

from __future__ import annotations

import json
import time

import numpy as np

from training_core.metrics import confusion_matrix

SIDE = 4096
N_CLUSTERS, N_CLASSES = 8, 6
REPEATS = 5
TARGET_RATIO = 0.5


def best_seconds(fn, repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    rng = np.random.default_rng(0)
    pred = rng.integers(0, N_CLUSTERS, (SIDE, SIDE), dtype=np.uint8)
    label = rng.integers(0, N_CLASSES + 1, (SIDE, SIDE), dtype=np.uint8)  # 0 = ignored
    index = pred.astype(np.intp) * (N_CLASSES + 1) + label
    n_bins = N_CLUSTERS * (N_CLASSES + 1)
    floor_s = best_seconds(lambda: np.bincount(index.ravel(), minlength=n_bins))
    ours_s = best_seconds(lambda: confusion_matrix(pred, label, N_CLUSTERS, N_CLASSES))
    expected = np.bincount(index.ravel(), minlength=n_bins).reshape(N_CLUSTERS, -1)[:, 1:]
    assert np.array_equal(confusion_matrix(pred, label, N_CLUSTERS, N_CLASSES), expected)
    pixels = pred.size
    ratio = (pixels / ours_s) / (pixels / floor_s)
    print(
        json.dumps(
            {
                "bench": "iou",
                "pixels": pixels,
                "k": N_CLUSTERS,
                "classes": N_CLASSES,
                "confusion_pixels_per_s": round(pixels / ours_s),
                "bincount_floor_pixels_per_s": round(pixels / floor_s),
                "ratio_of_floor": round(ratio, 3),
                "target_ratio": TARGET_RATIO,
                "passed": ratio >= TARGET_RATIO,
            }
        )
    )


if __name__ == "__main__":
    main()
