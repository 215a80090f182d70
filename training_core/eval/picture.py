"""Evaluation picture: one row per kept val tile, image | ground truth | each method's clusters."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime_export.atomic import atomic_path
from training_core.eval.report import EvalReport
from training_core.metrics import Scores


def render_comparison(report: EvalReport, path: str | Path) -> Path:
    """PNG with one row per kept val tile: image | ground truth | model | baseline (written atomically).

    Cluster ids are drawn through the Hungarian mapping, so a class has the same colour in the
    ground truth and the predictions; unmatched clusters are grey, ignored pixels black.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    if not report.samples:
        raise ValueError("the report kept no tiles to draw (n_samples=0 or no eval tiles)")
    path = Path(path)
    methods = list(report.methods)
    labeled = report.mapping_fitted_on is not None
    columns = ["image", "ground truth", *methods] if labeled else ["image", *methods]
    n_classes = max((len(m.hungarian.per_class_iou) for m in report.methods.values() if m.hungarian), default=0)
    n_colours = max(report.k, n_classes) + 2  # + ignored (black) and unmatched (grey)
    distinct = [*plt.get_cmap("tab10").colors, *plt.get_cmap("tab20b").colors, *plt.get_cmap("tab20c").colors]
    palette = ListedColormap(["black", "0.6", *distinct[: n_colours - 2]])
    fig, axes = plt.subplots(len(report.samples), len(columns), figsize=(3 * len(columns), 3 * len(report.samples)))
    axes = np.atleast_2d(axes)
    for row, sample in zip(axes, report.samples, strict=True):
        panels: list[np.ndarray] = [sample.rgb.transpose(1, 2, 0)]
        if labeled:
            panels.append(_class_index(sample.label, report.ignore_leq) if sample.label is not None else None)
        for name in methods:
            pred = sample.predictions[name]
            hungarian = report.methods[name].hungarian
            panels.append(_mapped_index(pred, hungarian, report.ignore_leq) if hungarian else pred.astype(int) + 2)
        for ax, panel, title in zip(row, panels, columns, strict=True):
            if panel is None:
                ax.text(0.5, 0.5, "unlabeled", ha="center", va="center")
            elif panel.ndim == 3:
                ax.imshow(panel)
            else:
                ax.imshow(panel, cmap=palette, vmin=0, vmax=n_colours - 1, interpolation="nearest")
            ax.set_title(f"{title}\n{sample.item_id}" if title == "image" else title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80, format="png")
    finally:
        plt.close(fig)
    return path


def _class_index(label: np.ndarray, ignore_leq: int) -> np.ndarray:
    """Palette index: 0 ignored, class value v -> v - ignore_leq + 1 (index 1 is the unmatched grey)."""
    return np.where(label > ignore_leq, label.astype(np.int64) - ignore_leq + 1, 0)


def _mapped_index(pred: np.ndarray, scores: Scores, ignore_leq: int) -> np.ndarray:
    """Palette index of each cluster's Hungarian class (1, grey, for unmatched clusters)."""
    lookup = np.array([1 if value is None else value - ignore_leq + 1 for value in scores.cluster_to_class])
    return lookup[pred]
