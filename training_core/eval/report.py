"""Evaluation report: the report types (each method's scores, the kept tiles) and the verdicts.

Verdicts (``training_helped``, ``model_beats_baseline``) need a lead of more than ``DECISION_MARGIN``: the
report gives each difference beside the margin, so a near tie reads as one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training_core.metrics import Scores

# The methods' names, the report's keys (training_core.eval.methods builds the methods).
MODEL, UNTRAINED, BASELINE, CONSTANT = "model", "untrained_model", "kmeans_rgb", "constant"
# One evaluation resolves mIoU differences of about 0.02: one training config spans 0.41 to 0.52 on kampala
# over 16 seeds (docs/MODEL_NOTES.md). A closer score is a tie, not evidence that training helped or that the
# model beats its baseline (kampala 0.4655 vs its untrained twin's 0.4653 is a tie).
DECISION_MARGIN = 0.02


@dataclass
class Sample:
    """One scored tile kept for the picture: pixels, labels and each method's cluster ids at K."""

    item_id: str
    rgb: np.ndarray
    label: np.ndarray | None
    predictions: dict[str, np.ndarray]


@dataclass
class MethodReport:
    hungarian: Scores | None  # at K = classes
    majority: Scores | None  # at K = classes
    majority_k8: Scores | None  # at K = OVERCLUSTER_K
    proxies: dict[str, float]
    cluster_shares: list[float]  # share of the eval tiles' pixels in each cluster at K (collapse shows here)

    def to_dict(self) -> dict[str, Any]:
        return {
            "hungarian": self.hungarian.to_dict() if self.hungarian else None,
            "majority": self.majority.to_dict() if self.majority else None,
            "majority_k8": self.majority_k8.to_dict() if self.majority_k8 else None,
            "proxies": self.proxies,
            "cluster_shares": self.cluster_shares,
        }


@dataclass
class EvalReport:
    """Every method's scores for one dataset (or synthetic tiles) at K and at the over-clustering K."""

    dataset_id: str | None
    k: int
    k_majority: int
    ignore_leq: int
    mapping_fitted_on: str | None  # "metrics_train", "val" (no labeled metrics_train pixel), None (no labels)
    n_fit_tiles: int
    n_eval_tiles: int
    methods: dict[str, MethodReport]
    data_version: str | None = None
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list, repr=False)  # for render_comparison, not serialised

    def miou(self, method: str) -> float | None:
        """Hungarian mIoU at K of one method (None: method not run, or no labels)."""
        report = self.methods.get(method)
        return report.hungarian.miou if report and report.hungarian else None

    def majority_k8_miou(self, method: str) -> float | None:
        report = self.methods.get(method)
        return report.majority_k8.miou if report and report.majority_k8 else None

    @property
    def val_miou(self) -> float | None:
        """The model's Hungarian mIoU on val: the number promotion compares."""
        return self.miou(MODEL)

    def to_dict(self) -> dict[str, Any]:
        model, baseline, untrained = self.miou(MODEL), self.miou(BASELINE), self.miou(UNTRAINED)
        return {
            "dataset_id": self.dataset_id,
            "k": self.k,
            "k_majority": self.k_majority,
            "ignore_leq": self.ignore_leq,
            "mapping_fitted_on": self.mapping_fitted_on,
            "n_fit_tiles": self.n_fit_tiles,
            "n_eval_tiles": self.n_eval_tiles,
            "data_version": self.data_version,
            "checkpoint": self.checkpoint,
            "checkpoint_step": self.checkpoint_step,
            "wall_s": self.wall_s,
            "val_miou": model,
            "baseline_miou": baseline,
            "untrained_miou": untrained,
            **verdicts(model, baseline, untrained),
            "scores": {
                name: {
                    "hungarian_miou": self.miou(name),
                    f"majority_k{self.k_majority}_miou": self.majority_k8_miou(name),
                }
                for name in self.methods
            },
            "methods": {name: report.to_dict() for name, report in self.methods.items()},
        }


def verdicts(model: float | None, baseline: float | None, untrained: float | None) -> dict[str, Any]:
    """``model_beats_baseline`` and ``training_helped`` (None when a score is missing), each true only for a
    lead of more than ``DECISION_MARGIN``, with the differences they rest on and the margin."""
    beats, helped = _difference(model, baseline), _difference(model, untrained)
    return {
        "decision_margin": DECISION_MARGIN,
        "model_minus_baseline": beats,
        "model_beats_baseline": None if beats is None else beats > DECISION_MARGIN,
        "model_minus_untrained": helped,
        "training_helped": None if helped is None else helped > DECISION_MARGIN,
    }


def _difference(score: float | None, control: float | None) -> float | None:
    return None if score is None or control is None else score - control
