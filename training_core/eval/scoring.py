"""Evaluation scoring: confusion matrices and Hungarian/majority scores of every method over a dataset (or
synthetic tiles), with label-free proxies.

Labels are only used here. The cluster-to-class mapping is fitted on ``metrics_train`` and scored on
``val`` (a dataset whose ``metrics_train`` holds no labeled pixel fits on ``val``, and the report says so),
at K = number of classes (Hungarian one-to-one and majority) and at K = 8 (majority, many-to-one).

Streaming: pass 1 reads every tile once and keeps only the fit samples (lattice cells, lattice pixels);
pass 2 reads every tile again and accumulates confusion matrices. One tile is in memory at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from runtime_export.numpy_runtime.prototypes import DEFAULT_MAX_FIT_CELLS, lattice_step
from training_core.checkpoint import load_checkpoint, model_from_checkpoint
from training_core.config import TrainConfig
from training_core.data.synthetic import synthetic_tile
from training_core.datasets.built import built_header
from training_core.eval.methods import MAX_FIT_PIXELS, Method, checked_runtime, control_methods
from training_core.eval.report import CONSTANT, EvalReport, MethodReport, Sample
from training_core.eval.tiles import LabeledTile, SplitTiles
from training_core.metrics import (
    confusion_matrix,
    hungarian_scores,
    label_proxies,
    majority_scores,
    view_consistency,
)
from training_core.model import SegmentationModel
from training_core.shards.index import read_manifest

FIT_SPLIT, EVAL_SPLIT = "metrics_train", "val"
OVERCLUSTER_K = 8  # the majority-vote score's K: over-clustering holds splits a K = classes fit misses


def evaluate_tiles(
    methods: dict[str, Method],
    fit_tiles: Iterable[LabeledTile],
    eval_tiles: Iterable[LabeledTile],
    k: int,
    n_classes: int | None,
    ignore_leq: int = 0,
    k_majority: int = OVERCLUSTER_K,
    n_samples: int = 3,
    dataset_id: str | None = None,
) -> EvalReport:
    """Score every method: mapping fitted on ``fit_tiles``, scores and proxies on ``eval_tiles``.

    Both iterables are read twice (pass 1: each method's fit sample over all tiles, no labels; pass 2:
    confusion matrices), so pass re-readable collections (``SplitTiles``, lists), not generators.
    ``n_classes`` None means no labels: proxies only. Labeled pixels of the eval tiles never reach the
    fitted mapping unless the fit tiles hold no labeled pixel at all.
    """
    started = time.perf_counter()
    ks = sorted({k, k_majority})
    index = 0
    for tiles in (fit_tiles, eval_tiles):
        for tile in tiles:
            for method in methods.values():
                method.observe(tile, index)
            index += 1
    for method in methods.values():
        method.fit(ks)

    shape = (n_classes or 1,)
    fit_conf = {(name, kk): np.zeros((kk, *shape), np.int64) for name in methods for kk in ks}
    eval_conf = {(name, kk): np.zeros((kk, *shape), np.int64) for name in methods for kk in ks}
    proxies: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    cluster_pixels = {name: np.zeros(k, np.int64) for name in methods}
    samples: list[Sample] = []
    n_fit = n_eval = 0
    for tile in fit_tiles:
        n_fit += 1
        if n_classes is None or tile.label is None:
            continue
        for name, method in methods.items():
            for kk, pred in method.predict(tile.rgb, tile.valid).items():
                fit_conf[name, kk] += _confusion(pred, tile, kk, n_classes, ignore_leq)
    for tile in eval_tiles:
        n_eval += 1
        predictions = {}
        for name, method in methods.items():
            by_k = method.predict(tile.rgb, tile.valid)
            pred = by_k[k]
            flipped = method.predict(np.ascontiguousarray(tile.rgb[:, :, ::-1]), _flip(tile.valid))[k][:, ::-1]
            proxies[name].append({**label_proxies(pred, k), "view_consistency": view_consistency(pred, flipped, k)})
            cluster_pixels[name] += np.bincount(pred.ravel(), minlength=k)[:k]
            if n_classes is not None and tile.label is not None:
                for kk, labels in by_k.items():
                    eval_conf[name, kk] += _confusion(labels, tile, kk, n_classes, ignore_leq)
            predictions[name] = pred
        if len(samples) < n_samples:
            samples.append(Sample(tile.item_id, tile.rgb, tile.label, predictions))
    labeled = n_classes is not None and any(conf.sum() for conf in eval_conf.values())
    fitted_on = None
    if labeled:
        fitted_on = FIT_SPLIT if any(conf.sum() for conf in fit_conf.values()) else EVAL_SPLIT
    reports = {}
    for name in methods:
        fit = fit_conf if fitted_on == FIT_SPLIT else eval_conf
        reports[name] = MethodReport(
            hungarian=hungarian_scores(fit[name, k], eval_conf[name, k], ignore_leq) if labeled else None,
            majority=majority_scores(fit[name, k], eval_conf[name, k], ignore_leq) if labeled else None,
            majority_k8=(
                majority_scores(fit[name, k_majority], eval_conf[name, k_majority], ignore_leq) if labeled else None
            ),
            proxies=_mean_proxies(proxies[name]),
            cluster_shares=(cluster_pixels[name] / max(cluster_pixels[name].sum(), 1)).tolist(),
        )
    return EvalReport(
        dataset_id=dataset_id,
        k=k,
        k_majority=k_majority,
        ignore_leq=ignore_leq,
        mapping_fitted_on=fitted_on,
        n_fit_tiles=n_fit,
        n_eval_tiles=n_eval,
        methods=reports,
        wall_s=time.perf_counter() - started,
        samples=samples,
    )


def _flip(valid: np.ndarray | None) -> np.ndarray | None:
    return None if valid is None else np.ascontiguousarray(valid[:, ::-1])


def _confusion(pred: np.ndarray, tile: LabeledTile, k: int, n_classes: int, ignore_leq: int) -> np.ndarray:
    try:
        return confusion_matrix(pred, tile.label, k, n_classes, ignore_leq)
    except ValueError as exc:  # e.g. a label value the dataset's manifest does not list
        raise ValueError(f"tile {tile.item_id}: {exc}") from exc


def _mean_proxies(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each proxy averaged over tiles (every tile counts once, whatever its size)."""
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]} if rows else {}


def dataset_label_space(processed_root: str | Path, dataset_id: str) -> tuple[int | None, int, str]:
    """(number of classes or None when unlabeled, iou_ignore_label_leq, data version) of a processed dataset."""
    header = built_header(processed_root, dataset_id)
    manifest = read_manifest(processed_root, dataset_id)
    ignore_leq = header.validation_metrics.iou_ignore_label_leq
    classes = [value for value in manifest["label_values"] if value > ignore_leq]
    return (max(classes) - ignore_leq if classes else None), ignore_leq, manifest["data_version"]


def evaluate_model(
    model: SegmentationModel,
    config: TrainConfig,
    processed_root: str | Path,
    dataset_id: str,
    k: int | None = None,
    seed: int = 0,
    n_samples: int = 3,
) -> EvalReport:
    """Score ``model`` and its controls on a processed dataset; ``k`` None means one cluster per class (>= 2)."""
    processed_root = Path(processed_root)
    n_classes, ignore_leq, data_version = dataset_label_space(processed_root, dataset_id)
    max_k = config.model.max_k
    k = k if k is not None else min(max(n_classes or 2, 2), max_k)
    runtime = checked_runtime(model, config, k)
    counts = read_manifest(processed_root, dataset_id)["counts"]
    if not counts.get(EVAL_SPLIT):
        raise ValueError(f"{processed_root / dataset_id}: no `{EVAL_SPLIT}` tiles to score (split counts {counts})")
    fit_tiles = SplitTiles(processed_root, dataset_id, FIT_SPLIT, ignore_leq)
    eval_tiles = SplitTiles(processed_root, dataset_id, EVAL_SPLIT, ignore_leq)
    pixels = fit_tiles.pixel_count() + eval_tiles.pixel_count()
    cell_step = lattice_step(pixels // 16, DEFAULT_MAX_FIT_CELLS)
    pixel_step = lattice_step(pixels, MAX_FIT_PIXELS)
    report = evaluate_tiles(
        control_methods(runtime, config, cell_step, pixel_step, seed),
        fit_tiles,
        eval_tiles,
        k,
        n_classes,
        ignore_leq,
        k_majority=min(OVERCLUSTER_K, max_k),
        n_samples=n_samples,
        dataset_id=dataset_id,
    )
    report.data_version = data_version
    return report


def evaluate_checkpoint(
    checkpoint: str | Path, processed_root: str | Path, dataset_id: str, k: int | None = None, seed: int = 0
) -> EvalReport:
    """``evaluate_model`` for a training checkpoint; the report names the checkpoint and its step."""
    model, config = model_from_checkpoint(checkpoint)
    report = evaluate_model(model, config, processed_root, dataset_id, k, seed)
    report.checkpoint = str(checkpoint)
    report.checkpoint_step = int(load_checkpoint(checkpoint)["step"])
    return report


def evaluate_synthetic(model: SegmentationModel, k: int, seed: int, n_tiles: int, tile_size: int) -> EvalReport:
    """Label-free proxies of the model, its untrained twin and the baseline on seeded synthetic tiles.

    Synthetic region ids are arbitrary per tile, so no dataset-level mapping is scored.
    """
    config = TrainConfig(model=model.config, seed=seed)
    runtime = checked_runtime(model, config, k)
    tiles = [LabeledTile(f"synthetic-{i}", synthetic_tile(seed, i, tile_size)[0], None) for i in range(n_tiles)]
    pixels = n_tiles * tile_size * tile_size
    methods = control_methods(runtime, config, lattice_step(pixels // 16), lattice_step(pixels, MAX_FIT_PIXELS), seed)
    del methods[CONSTANT]  # no labels: a constant has nothing to show
    return evaluate_tiles(methods, [], tiles, k, None, k_majority=min(OVERCLUSTER_K, model.config.max_k))
