"""Evaluation: score a model's clusters against labels, beside the controls a user needs to read them.

Methods, each fitting one set of cluster centres per dataset from pixels alone, then labelling every tile:

- ``model``: the trained model, run by the numpy runtime exactly as ``runtime_export.segment`` runs it
  (invalid pixels filled with the mean colour, tiles padded to the stride, one lattice sample of cells
  over all the dataset's tiles: ``runtime_export.numpy_runtime.prototypes``), so the score describes what a user gets;
- ``untrained_model``: the same architecture with the weights training starts from (same seed), the same
  inference: does training help on this data?
- ``kmeans_rgb``: k-means on the pixels' colours;
- ``constant``: every pixel in one cluster, what an imbalanced label set gives for nothing.

Labels are only used here. The cluster-to-class mapping is fitted on ``metrics_train`` and scored on
``val`` (a dataset whose ``metrics_train`` holds no labeled pixel fits on ``val``, and the report says so),
at K = number of classes (Hungarian one-to-one and majority) and at K = 8 (majority, many-to-one).

Streaming: pass 1 reads every tile once and keeps only the fit samples (lattice cells, lattice pixels);
pass 2 reads every tile again and accumulates confusion matrices. One tile is in memory at a time.

CLI::

    python -m training_core.eval --synthetic --seed 7
    python -m training_core.eval --data-source shards --processed-root DIR --dataset-id ID --checkpoint PATH

prints the JSON report and writes it to ``--output``; a user error (a K outside the model's range, a missing
or damaged checkpoint or dataset, an unwritable output) is one line on stderr, exit 2.

Verdicts (``training_helped``, ``model_beats_baseline``) need a lead of more than ``DECISION_MARGIN``: the
report gives each difference beside the margin, so a near tie reads as one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import rasterio
import torch

from runtime_export.artifact import runtime_meta
from runtime_export.atomic import atomic_path, atomic_write_text
from runtime_export.cli import run_cli
from runtime_export.numpy_runtime.pixels import PixelRule
from runtime_export.numpy_runtime.prototypes import (
    DEFAULT_MAX_FIT_CELLS,
    PrototypeSample,
    cell_grid,
    encoder_input,
    lattice_step,
    valid_cells,
)
from runtime_export.numpy_runtime.runtime import Embedding, RuntimeModel
from runtime_export.rasters import open_raster, read_item
from training_core.baseline import fit_rgb_centres, nearest_centre_labels
from training_core.checkpoint import load_checkpoint, model_from_checkpoint
from training_core.config import ModelConfig, TrainConfig
from training_core.data.synthetic import synthetic_tile
from training_core.datasets.built import built_header
from training_core.export import runtime_arrays
from training_core.metrics import (
    Scores,
    confusion_matrix,
    hungarian_scores,
    label_proxies,
    majority_scores,
    view_consistency,
)
from training_core.model import SegmentationModel
from training_core.shards.index import iter_split_items, read_manifest

MAX_FIT_PIXELS = 65_536  # pixels sampled (on a lattice) to fit the k-means-on-RGB centres
MODEL, UNTRAINED, BASELINE, CONSTANT = "model", "untrained_model", "kmeans_rgb", "constant"
FIT_SPLIT, EVAL_SPLIT = "metrics_train", "val"
OVERCLUSTER_K = 8  # the majority-vote score's K: over-clustering holds splits a K = classes fit misses
SYNTHETIC_K = 4  # the synthetic tiles' K unless --k (at most the model's max_k)
# One evaluation resolves mIoU differences of about 0.02: one training config spans 0.41 to 0.52 on kampala
# over 16 seeds (docs/MODEL_NOTES.md). A closer score is a tie, not evidence that training helped or that the
# model beats its baseline (kampala 0.4655 vs its untrained twin's 0.4653 is a tie).
DECISION_MARGIN = 0.02
PROG = "python -m training_core.eval"


@dataclass
class LabeledTile:
    item_id: str
    rgb: np.ndarray  # [3, H, W] uint8 model pixels
    label: np.ndarray | None  # [H, W]; invalid input pixels carry an ignored value
    valid: np.ndarray | None = None  # [H, W] bool; None = every pixel valid


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


# -- methods -------------------------------------------------------------------------------------


class Method(Protocol):
    """A clustering method: sees every tile once to draw its fit sample, fits, then labels tiles."""

    def observe(self, tile: LabeledTile, index: int) -> None: ...

    def fit(self, ks: Sequence[int]) -> None: ...

    def predict(self, rgb: np.ndarray, valid: np.ndarray | None) -> dict[int, np.ndarray]: ...


class RuntimeMethod:
    """A model run by the numpy runtime as ``segment`` runs it: fill, pad, embed, lattice sample, assign."""

    def __init__(self, model: RuntimeModel, step: int) -> None:
        self.model = model
        self.sample = PrototypeSample(step)
        self.prototypes: dict[int, np.ndarray] = {}

    def _embed(self, rgb: np.ndarray, valid: np.ndarray | None) -> Embedding:
        return self.model.embed(encoder_input(self.model, rgb, valid))

    def observe(self, tile: LabeledTile, index: int) -> None:
        embedding = self._embed(tile.rgb, tile.valid)
        h, w = cell_grid(*tile.rgb.shape[1:])
        usable = None if tile.valid is None else valid_cells(tile.valid)
        self.sample.add(embedding, slice(0, h), slice(0, w), (0, 0), usable, raster=index)

    def fit(self, ks: Sequence[int]) -> None:
        self.prototypes = {k: self.sample.fit(k, self.model.cluster_iters, self.model.temperature) for k in ks}

    def predict(self, rgb: np.ndarray, valid: np.ndarray | None) -> dict[int, np.ndarray]:
        embedding = self._embed(rgb, valid)
        height, width = rgb.shape[1:]
        return {
            k: self.model.labels_from_assignment(self.model.assign(embedding, prototypes), embedding)[:height, :width]
            for k, prototypes in self.prototypes.items()
        }


class KMeansRGB:
    """k-means on colours, fitted on valid pixels on a lattice over all tiles."""

    def __init__(self, step: int, seed: int) -> None:
        self.step, self.seed = step, seed
        self._pixels: list[np.ndarray] = []
        self.centres: dict[int, np.ndarray] = {}

    def observe(self, tile: LabeledTile, index: int) -> None:
        pixels = tile.rgb[:, :: self.step, :: self.step]
        keep = None if tile.valid is None else tile.valid[:: self.step, :: self.step]
        self._pixels.append(pixels.reshape(3, -1) if keep is None else pixels[:, keep])

    def fit(self, ks: Sequence[int]) -> None:
        pixels = np.concatenate(self._pixels, axis=1)[:, None, :]  # one [3, 1, N] "tile"
        self.centres = {k: fit_rgb_centres([pixels], k, seed=self.seed, max_fit_pixels=MAX_FIT_PIXELS) for k in ks}

    def predict(self, rgb: np.ndarray, valid: np.ndarray | None) -> dict[int, np.ndarray]:
        return {k: nearest_centre_labels(rgb, centres) for k, centres in self.centres.items()}


class Constant:
    """Every pixel in cluster 0: the mapping sends it to the most frequent class."""

    def observe(self, tile: LabeledTile, index: int) -> None:
        pass

    def fit(self, ks: Sequence[int]) -> None:
        self.ks = list(ks)

    def predict(self, rgb: np.ndarray, valid: np.ndarray | None) -> dict[int, np.ndarray]:
        return {k: np.zeros(rgb.shape[1:], np.uint8) for k in self.ks}


def runtime_of(model: SegmentationModel, config: TrainConfig) -> RuntimeModel:
    """The numpy runtime of a torch model, in memory: the arrays and fields an export would write."""
    return RuntimeModel(runtime_meta(config, {}, {}, {}), runtime_arrays(model.eval()))


def untrained_twin(config: TrainConfig) -> SegmentationModel:
    """The weights training starts from: the same architecture and seed (``training_core.train``)."""
    torch.manual_seed(config.seed)
    return SegmentationModel(config.model).eval()


# -- data ----------------------------------------------------------------------------------------


def read_tile(
    item_id: str, input_path: Path, target_path: Path | None, rule: PixelRule, ignore_value: int = 0
) -> LabeledTile:
    """Model pixels, validity and labels through the raster layer; labels under invalid input pixels become
    ``ignore_value``."""
    tile = read_item(input_path, target_path, rule)
    label = tile.target
    if label is not None and tile.valid is not None and ignore_value != 0:
        label = np.where(tile.valid, label, ignore_value).astype(label.dtype)
    return LabeledTile(item_id, tile.image, label, tile.valid)


@dataclass(frozen=True)
class SplitTiles:
    """The tiles of one processed split, re-readable: each pass iterates it again (nothing kept)."""

    processed_root: Path
    dataset_id: str
    split: str
    ignore_value: int = 0

    def __iter__(self) -> Iterator[LabeledTile]:
        rule = built_header(self.processed_root, self.dataset_id).pixel_rule
        for shard_dir, entry in iter_split_items(self.processed_root, self.dataset_id, self.split):
            target = shard_dir / entry.target if entry.target else None
            yield read_tile(entry.item_id, shard_dir / entry.input, target, rule, self.ignore_value)

    def pixel_count(self) -> int:
        """Pixels over all tiles, from the files' metadata (no pixel read)."""
        total = 0
        for shard_dir, entry in iter_split_items(self.processed_root, self.dataset_id, self.split):
            with open_raster(shard_dir / entry.input) as src:
                total += src.width * src.height
        return total


# -- evaluation ----------------------------------------------------------------------------------


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


def checked_runtime(model: SegmentationModel, config: TrainConfig, k: int) -> RuntimeModel:
    """The model's runtime, once ``k`` is known to be in its range (the runtime's own check, the one ``segment``
    applies), before any tile is read."""
    runtime = runtime_of(model, config)
    runtime.check_k(k)
    return runtime


def control_methods(
    runtime: RuntimeModel, config: TrainConfig, cell_step: int, pixel_step: int, seed: int
) -> dict[str, Method]:
    """The model (its runtime) beside its controls: its untrained twin, k-means on RGB, the constant predictor."""
    return {
        MODEL: RuntimeMethod(runtime, cell_step),
        UNTRAINED: RuntimeMethod(runtime_of(untrained_twin(config), config), cell_step),
        BASELINE: KMeansRGB(pixel_step, seed),
        CONSTANT: Constant(),
    }


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


# -- picture -------------------------------------------------------------------------------------


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


# -- CLI -----------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", action="store_true", help="shorthand for --data-source synthetic")
    parser.add_argument("--data-source", choices=["synthetic", "shards"], default=None)
    parser.add_argument("--processed-root", type=Path, help="processed shards root (shards)")
    parser.add_argument("--dataset-id", help="dataset to score (shards)")
    parser.add_argument("--checkpoint", type=Path, help="training checkpoint; synthetic runs default to a seeded model")
    parser.add_argument(
        "--k",
        type=int,
        default=None,
        help=f"clusters, 2 to the model's max_k (default: one per class; {SYNTHETIC_K} on synthetic)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds synthetic tiles, the untrained model, k-means")
    parser.add_argument("--n-tiles", type=_positive_int, default=8, help="synthetic tiles")
    parser.add_argument("--tile-size", type=_positive_int, default=256, help="synthetic tile side in pixels")
    parser.add_argument("--output", type=Path, default=None, help="report file (default eval_reports/<name>.json)")
    parser.add_argument("--picture", type=Path, default=None, help="also draw image | truth | predictions here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; a user error is one line on stderr, exit 2 (``runtime_export.cli``)."""
    return run_cli(PROG, _main, argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for flag, path in (("--output", args.output), ("--picture", args.picture)):
        if path is not None and path.is_dir():  # found before the evaluation, not after it
            parser.error(f"{flag} {path} is a folder: give a file name")
    source = "synthetic" if args.synthetic else (args.data_source or "synthetic")
    if args.synthetic and args.data_source == "shards":
        parser.error("--synthetic and --data-source shards contradict each other")
    if source == "shards":
        needed = {
            "--processed-root": args.processed_root,
            "--dataset-id": args.dataset_id,
            "--checkpoint": args.checkpoint,
        }
        missing = [flag for flag, value in needed.items() if value is None]
        if missing:
            parser.error(f"--data-source shards needs {', '.join(missing)}")
        # Inside an Env, GDAL's errors (a truncated tile's) reach rasterio, which raises them, instead of being
        # printed on stderr beside the one line naming the file.
        with rasterio.Env():
            report = evaluate_checkpoint(args.checkpoint, args.processed_root, args.dataset_id, args.k, args.seed)
        name = f"{args.dataset_id}-k{report.k}"
    else:
        if args.checkpoint is not None:
            model, _ = model_from_checkpoint(args.checkpoint)
        else:
            torch.manual_seed(args.seed)
            model = SegmentationModel(ModelConfig()).eval()
        k = args.k if args.k is not None else min(SYNTHETIC_K, model.config.max_k)
        report = evaluate_synthetic(model, k, args.seed, args.n_tiles, args.tile_size)
        report.checkpoint = str(args.checkpoint) if args.checkpoint else None
        name = f"synthetic-seed{args.seed}-k{report.k}"
    output = args.output or Path("eval_reports") / f"{name}.json"
    text = json.dumps(report.to_dict(), indent=2, sort_keys=True)
    if args.picture is not None:  # first: a picture that cannot be drawn leaves no report without it
        render_comparison(report, args.picture)
    atomic_write_text(output, text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
