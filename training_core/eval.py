"""Evaluation: score a model's clusters against labels, with the k-means-on-RGB baseline beside it.

Labels are only used here. The cluster-to-class mapping is fitted on ``metrics_train`` and scored
on ``val`` (a dataset whose ``metrics_train`` holds no labeled pixel fits on ``val``, and the report
says so). Tiles are scored whole: the model handles any size.

CLI::

    python -m training_core.eval --synthetic --seed 7
    python -m training_core.eval --data-source shards --processed-root DIR --dataset-id ID --checkpoint PATH

prints the JSON report and writes it to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training_core.atomic import atomic_path, atomic_write_text
from training_core.baseline import fit_rgb_centres, nearest_centre_labels
from training_core.checkpoint import load_checkpoint, model_from_checkpoint
from training_core.config import ModelConfig
from training_core.data.synthetic import synthetic_tile
from training_core.datasets.pixels import PixelRule
from training_core.datasets.rasters import read_item
from training_core.datasets.schema import HEADER_FILENAME, load_header
from training_core.metrics import (
    Scores,
    confusion_matrix,
    hungarian_scores,
    label_proxies,
    majority_scores,
    view_consistency,
)
from training_core.model import SegmentationModel, soft_kmeans
from training_core.shards import iter_split_items, read_manifest

PredictFn = Callable[[np.ndarray], np.ndarray]  # [3, H, W] uint8 -> cluster ids [H, W]
# Fits one set of cluster centres on a dataset's tiles (pixels only, never labels) and returns the
# predictor that labels any tile against those centres, so cluster ids mean the same in every tile.
FitFn = Callable[[Sequence[np.ndarray], int], PredictFn]
MAX_FIT_CELLS = 65_536  # stride-4 cells (model) or pixels (baseline) sampled to fit the centres
MODEL, BASELINE = "model", "kmeans_rgb"
FIT_SPLIT, EVAL_SPLIT = "metrics_train", "val"


@dataclass
class LabeledTile:
    item_id: str
    rgb: np.ndarray  # [3, H, W] uint8
    label: np.ndarray | None  # [H, W]; nodata input pixels carry an ignored value


@dataclass
class Sample:
    """One scored tile kept for the picture: pixels, labels and each method's cluster ids."""

    item_id: str
    rgb: np.ndarray
    label: np.ndarray | None
    predictions: dict[str, np.ndarray]


@dataclass
class MethodReport:
    hungarian: Scores | None
    majority: Scores | None
    proxies: dict[str, float]
    cluster_shares: list[float]  # share of the eval tiles' pixels in each cluster (collapse shows here)

    def to_dict(self) -> dict[str, Any]:
        return {
            "hungarian": self.hungarian.to_dict() if self.hungarian else None,
            "majority": self.majority.to_dict() if self.majority else None,
            "proxies": self.proxies,
            "cluster_shares": self.cluster_shares,
        }


@dataclass
class EvalReport:
    """Model and baseline scores for one dataset (or synthetic tiles) at one K."""

    dataset_id: str | None
    k: int
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
        """Hungarian mIoU of one method (None: method not run, or no labels)."""
        report = self.methods.get(method)
        return report.hungarian.miou if report and report.hungarian else None

    @property
    def val_miou(self) -> float | None:
        """The model's Hungarian mIoU on val: the number promotion compares."""
        return self.miou(MODEL)

    def to_dict(self) -> dict[str, Any]:
        model, baseline = self.miou(MODEL), self.miou(BASELINE)
        return {
            "dataset_id": self.dataset_id,
            "k": self.k,
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
            "model_beats_baseline": None if model is None or baseline is None else model > baseline,
            "methods": {name: report.to_dict() for name, report in self.methods.items()},
        }


# -- predictors ----------------------------------------------------------------------------------


def model_fit_fn(model: SegmentationModel, seed: int = 0) -> FitFn:
    """The torch model (CPU) with one set of prototypes for the dataset, as ``runtime_export.segment`` does
    for one raster: soft k-means seeded by the model's own seed channels over a seeded sample of the
    stride-4 embeddings of all tiles, then each tile assigned to those prototypes."""
    model = model.eval()

    def fit(tiles: Sequence[np.ndarray], k: int) -> PredictFn:
        embeddings, seed_logits = [], []
        with torch.inference_mode():
            for rgb in tiles:
                emb, seeds = model.encode(_as_batch(rgb))
                embeddings.append(emb[0].flatten(1).T)
                seed_logits.append(seeds[0, :k].flatten(1).T)
        cells = torch.cat(embeddings)
        picks = sample_fit_rows(cells.shape[0], seed)
        _, prototypes = soft_kmeans(
            cells[picks].T[None].contiguous(),
            torch.cat(seed_logits)[picks].T[None].contiguous(),
            model.config.eval_cluster_iters,
            model.config.temperature,
        )

        def predict(rgb: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                probs = model(_as_batch(rgb), k, prototypes=prototypes[0]).probs
            return probs[0].argmax(dim=0).to(torch.uint8).numpy()

        return predict

    return fit


def baseline_fit_fn(seed: int = 0) -> FitFn:
    """k-means on RGB with one set of centres for the dataset."""

    def fit(tiles: Sequence[np.ndarray], k: int) -> PredictFn:
        centres = fit_rgb_centres(tiles, k, seed=seed, max_fit_pixels=MAX_FIT_CELLS)
        return lambda rgb: nearest_centre_labels(rgb, centres)

    return fit


def _as_batch(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).float()[None] / 255.0


def sample_fit_rows(n: int, seed: int) -> np.ndarray:
    """A seeded, sorted sample of at most MAX_FIT_CELLS row indices out of ``n``."""
    if n <= MAX_FIT_CELLS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, MAX_FIT_CELLS, replace=False))


# -- data ----------------------------------------------------------------------------------------


def read_tile(
    item_id: str, input_path: Path, target_path: Path | None, rule: PixelRule, ignore_value: int = 0
) -> LabeledTile:
    """Model pixels and labels through the raster layer; labels under invalid input pixels become ``ignore_value``."""
    tile = read_item(input_path, target_path, rule)
    label = tile.target
    if label is not None and tile.valid is not None and ignore_value != 0:
        label = np.where(tile.valid, label, ignore_value).astype(label.dtype)
    return LabeledTile(item_id, tile.image, label)


def split_tiles(
    processed_root: str | Path, dataset_id: str, split: str, ignore_value: int = 0
) -> Iterator[LabeledTile]:
    """The tiles of one processed split, in index order, read under the dataset header's pixel rule."""
    rule = load_header(Path(processed_root) / dataset_id / HEADER_FILENAME).pixel_rule
    for shard_dir, entry in iter_split_items(processed_root, dataset_id, split):
        target = shard_dir / entry.target if entry.target else None
        yield read_tile(entry.item_id, shard_dir / entry.input, target, rule, ignore_value)


# -- evaluation ----------------------------------------------------------------------------------


def evaluate_tiles(
    fit_fns: dict[str, FitFn],
    fit_tiles: Iterable[LabeledTile],
    eval_tiles: Iterable[LabeledTile],
    k: int,
    n_classes: int | None,
    ignore_leq: int = 0,
    n_samples: int = 3,
    dataset_id: str | None = None,
) -> EvalReport:
    """Score every method: mapping fitted on ``fit_tiles``, scores and proxies on ``eval_tiles``.

    Each method first fits its cluster centres on the pixels of all tiles (no labels). ``n_classes``
    None means no labels: proxies only. Labeled pixels of the eval tiles never reach the fitted
    mapping unless the fit tiles hold no labeled pixel at all.
    """
    started = time.perf_counter()
    fit_tiles, eval_tiles = list(fit_tiles), list(eval_tiles)
    all_rgb = [tile.rgb for tile in fit_tiles + eval_tiles]
    predict_fns = {name: fit(all_rgb, k) for name, fit in fit_fns.items()}
    shape = (k, n_classes or 1)
    fit_conf = {name: np.zeros(shape, np.int64) for name in predict_fns}
    eval_conf = {name: np.zeros(shape, np.int64) for name in predict_fns}
    proxies: dict[str, list[dict[str, float]]] = {name: [] for name in predict_fns}
    cluster_pixels = {name: np.zeros(k, np.int64) for name in predict_fns}
    samples: list[Sample] = []
    n_fit = n_eval = 0
    if n_classes is not None:
        for tile in fit_tiles:
            n_fit += 1
            if tile.label is None:
                continue
            for name, predict in predict_fns.items():
                fit_conf[name] += _confusion(predict(tile.rgb), tile, k, n_classes, ignore_leq)
    for tile in eval_tiles:
        n_eval += 1
        predictions = {}
        for name, predict in predict_fns.items():
            pred = predict(tile.rgb)
            flipped = predict(np.ascontiguousarray(tile.rgb[:, :, ::-1]))[:, ::-1]
            proxies[name].append({**label_proxies(pred, k), "view_consistency": view_consistency(pred, flipped, k)})
            cluster_pixels[name] += np.bincount(pred.ravel(), minlength=k)[:k]
            if n_classes is not None and tile.label is not None:
                eval_conf[name] += _confusion(pred, tile, k, n_classes, ignore_leq)
            predictions[name] = pred
        if len(samples) < n_samples:
            samples.append(Sample(tile.item_id, tile.rgb, tile.label, predictions))
    labeled = n_classes is not None and any(conf.sum() for conf in eval_conf.values())
    fitted_on = None
    if labeled:
        fitted_on = FIT_SPLIT if any(conf.sum() for conf in fit_conf.values()) else EVAL_SPLIT
    methods = {}
    for name in fit_fns:
        fit = fit_conf[name] if fitted_on == FIT_SPLIT else eval_conf[name]
        methods[name] = MethodReport(
            hungarian=hungarian_scores(fit, eval_conf[name], ignore_leq) if labeled else None,
            majority=majority_scores(fit, eval_conf[name], ignore_leq) if labeled else None,
            proxies=_mean_proxies(proxies[name]),
            cluster_shares=(cluster_pixels[name] / max(cluster_pixels[name].sum(), 1)).tolist(),
        )
    return EvalReport(
        dataset_id=dataset_id,
        k=k,
        ignore_leq=ignore_leq,
        mapping_fitted_on=fitted_on,
        n_fit_tiles=n_fit,
        n_eval_tiles=n_eval,
        methods=methods,
        wall_s=time.perf_counter() - started,
        samples=samples,
    )


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
    header = load_header(Path(processed_root) / dataset_id / HEADER_FILENAME)
    manifest = read_manifest(processed_root, dataset_id)
    ignore_leq = header.validation_metrics.iou_ignore_label_leq
    classes = [value for value in manifest["label_values"] if value > ignore_leq]
    return (max(classes) - ignore_leq if classes else None), ignore_leq, manifest["data_version"]


def evaluate_dataset(
    fit_fn: FitFn,
    processed_root: str | Path,
    dataset_id: str,
    k: int | None = None,
    seed: int = 0,
    n_samples: int = 3,
) -> EvalReport:
    """Score ``fit_fn`` and the k-means-on-RGB baseline on a processed dataset.

    ``k`` None means one cluster per class (at least 2).
    """
    n_classes, ignore_leq, data_version = dataset_label_space(processed_root, dataset_id)
    k = k if k is not None else max(n_classes or 2, 2)
    report = evaluate_tiles(
        {MODEL: fit_fn, BASELINE: baseline_fit_fn(seed)},
        split_tiles(processed_root, dataset_id, FIT_SPLIT, ignore_leq),
        split_tiles(processed_root, dataset_id, EVAL_SPLIT, ignore_leq),
        k,
        n_classes,
        ignore_leq,
        n_samples=n_samples,
        dataset_id=dataset_id,
    )
    report.data_version = data_version
    return report


def evaluate_checkpoint(
    checkpoint: str | Path, processed_root: str | Path, dataset_id: str, k: int | None = None, seed: int = 0
) -> EvalReport:
    """``evaluate_dataset`` for a training checkpoint (CPU); the report names the checkpoint and its step."""
    model, _ = model_from_checkpoint(checkpoint)
    if k is not None and not 2 <= k <= model.config.max_k:
        raise ValueError(f"k={k} is outside [2, max_k={model.config.max_k}] of {checkpoint}")
    n_classes, _, _ = dataset_label_space(processed_root, dataset_id)
    if k is None:
        k = min(max(n_classes or 2, 2), model.config.max_k)
    report = evaluate_dataset(model_fit_fn(model, seed), processed_root, dataset_id, k, seed)
    report.checkpoint = str(checkpoint)
    report.checkpoint_step = int(load_checkpoint(checkpoint)["step"])
    return report


def evaluate_synthetic(model: SegmentationModel, k: int, seed: int, n_tiles: int, tile_size: int) -> EvalReport:
    """Label-free proxies of the model and the baseline on seeded synthetic tiles.

    Synthetic region ids are arbitrary per tile, so no dataset-level mapping is scored.
    """
    tiles = (LabeledTile(f"synthetic-{i}", synthetic_tile(seed, i, tile_size)[0], None) for i in range(n_tiles))
    methods = {MODEL: model_fit_fn(model, seed), BASELINE: baseline_fit_fn(seed)}
    return evaluate_tiles(methods, [], tiles, k, None, dataset_id=None)


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training_core.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", action="store_true", help="shorthand for --data-source synthetic")
    parser.add_argument("--data-source", choices=["synthetic", "shards"], default=None)
    parser.add_argument("--processed-root", type=Path, help="processed shards root (shards)")
    parser.add_argument("--dataset-id", help="dataset to score (shards)")
    parser.add_argument("--checkpoint", type=Path, help="training checkpoint; synthetic runs default to a seeded model")
    parser.add_argument("--k", type=int, default=None, help="clusters (default: one per class; 4 on synthetic)")
    parser.add_argument("--seed", type=int, default=0, help="seeds synthetic tiles, the untrained model, k-means")
    parser.add_argument("--n-tiles", type=int, default=8, help="synthetic tiles")
    parser.add_argument("--tile-size", type=int, default=256, help="synthetic tile side in pixels")
    parser.add_argument("--output", type=Path, default=None, help="report file (default eval_reports/<name>.json)")
    parser.add_argument("--picture", type=Path, default=None, help="also draw image | truth | predictions here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    source = "synthetic" if args.synthetic else (args.data_source or "synthetic")
    if args.synthetic and args.data_source == "shards":
        raise SystemExit("--synthetic and --data-source shards contradict each other")
    if source == "shards":
        needed = {
            "--processed-root": args.processed_root,
            "--dataset-id": args.dataset_id,
            "--checkpoint": args.checkpoint,
        }
        missing = [flag for flag, value in needed.items() if value is None]
        if missing:
            raise SystemExit(f"--data-source shards needs {', '.join(missing)}")
        report = evaluate_checkpoint(args.checkpoint, args.processed_root, args.dataset_id, args.k, args.seed)
        name = f"{args.dataset_id}-k{report.k}"
    else:
        if args.checkpoint is not None:
            model, _ = model_from_checkpoint(args.checkpoint)
        else:
            torch.manual_seed(args.seed)
            model = SegmentationModel(ModelConfig()).eval()
        report = evaluate_synthetic(model, args.k or 4, args.seed, args.n_tiles, args.tile_size)
        report.checkpoint = str(args.checkpoint) if args.checkpoint else None
        name = f"synthetic-seed{args.seed}-k{report.k}"
    output = args.output or Path("eval_reports") / f"{name}.json"
    text = json.dumps(report.to_dict(), indent=2, sort_keys=True)
    atomic_write_text(output, text + "\n")
    if args.picture is not None:
        render_comparison(report, args.picture)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
