"""How much of the labels a linear read-out of a trained model's embedding recovers, beside its clustering.

The clustering (Hungarian mIoU at K = number of classes) can only find a split that the clustered
embedding holds, and it finds the one its criterion prefers. A linear probe, multinomial logistic
regression on the stride-4 cells of ``metrics_train`` (the tiles whose labels already fit the
cluster-to-class mapping), scored on the ``val`` pixels like the clustering, measures whether the
labels are in the embedding at all. Three probes: the appended colour alone, the encoder features
alone, and both. When the probe is well above the clustering, the features hold the split and the
clustering picks another one; when they are close, better features are what is missing
(docs/MODEL_NOTES.md). One JSON line per labeled dataset.

    python bench/quality.py --seed 1 --threads 2 --work-dir /tmp/q     # keeps /tmp/q/ckpt-1/last.pt
    python bench/probe.py --checkpoint /tmp/q/ckpt-1/last.pt --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training_core.checkpoint import model_from_checkpoint
from training_core.config import STRIDE, TrainConfig
from training_core.datasets.discovery import discover_datasets
from training_core.eval.report import BASELINE, MODEL
from training_core.eval.scoring import EVAL_SPLIT, FIT_SPLIT, dataset_label_space, evaluate_model
from training_core.eval.tiles import LabeledTile, SplitTiles
from training_core.metrics import confusion_matrix, mapped_scores
from training_core.model import SegmentationModel, colour_projection
from training_core.shards.write import build_shards

SAMPLE_ROOT = Path(__file__).resolve().parents[1] / "sample_data" / "extracted"
MIN_LABELED_SHARE = 0.5  # a cell trains the probe when at least half its pixels carry a label
PROBE_ITERS = 200
PROBE_WEIGHT_DECAY = 1e-4
COLOUR_CHANNELS = 3  # the embedding's last channels, when the model appends the colour


def embed_tile(model: SegmentationModel, rgb: np.ndarray) -> torch.Tensor:
    """The clustered embedding [D', h, w] of one [3, H, W] uint8 tile (features, then the colour)."""
    with torch.inference_mode():
        embeddings, _ = model.encode(torch.from_numpy(np.ascontiguousarray(rgb)).float()[None] / 255.0)
    return embeddings[0]


def cell_targets(label: np.ndarray, n_classes: int, ignore_leq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(class index [h, w], labeled share [h, w]) of each stride-4 cell: its most frequent class."""
    columns = torch.from_numpy(label.astype(np.int64)) - ignore_leq - 1  # -1 and below: ignored
    one_hot = torch.stack([(columns == c).float() for c in range(n_classes)])[None]
    counts = F.avg_pool2d(one_hot, STRIDE, ceil_mode=True)[0]
    return counts.argmax(dim=0), counts.sum(dim=0)


def probe_inputs(embedding: torch.Tensor, part: str) -> torch.Tensor:
    """The channels of ``embedding`` [D', h, w] a probe reads: "colour", "features" or "both"."""
    if part == "colour":
        return embedding[-COLOUR_CHANNELS:]
    if part == "features":
        return embedding[:-COLOUR_CHANNELS]
    if part == "both":
        return embedding
    raise ValueError(f"unknown probe input {part!r}: expected colour, features or both")


def fit_probe(cells: torch.Tensor, targets: torch.Tensor, n_classes: int) -> torch.nn.Linear:
    """Multinomial logistic regression [N, C] -> n_classes on standardised inputs, every class weighted
    by the inverse of its cell count (mIoU weighs classes equally; unweighted, the probe of a 98.8%
    background tile predicts background everywhere). Full-batch L-BFGS, so no learning-rate schedule.
    Returns the probe as one linear layer on the raw cells (the standardisation folded in)."""
    mean, std = cells.mean(dim=0), cells.std(dim=0).clamp_min(1e-6)
    linear = torch.nn.Linear(cells.shape[1], n_classes, dtype=torch.float64)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    inputs = ((cells - mean) / std).double()
    counts = torch.bincount(targets, minlength=n_classes).double()
    class_weights = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp_min(1)), 0.0)
    optimiser = torch.optim.LBFGS(linear.parameters(), max_iter=PROBE_ITERS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(linear(inputs), targets, weight=class_weights)
        loss = loss + PROBE_WEIGHT_DECAY * linear.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        linear.weight /= std.double()
        linear.bias -= linear.weight @ mean.double()
    return linear.eval()


def score_probe(
    probe: torch.nn.Module,
    embeddings: Iterable[torch.Tensor],
    tiles: Sequence[LabeledTile],
    part: str,
    n_classes: int,
    ignore_leq: int,
) -> float | None:
    """mIoU of the probe's classes on the tiles' labeled pixels (cell logits upsampled bilinearly, as the
    model upsamples its probabilities)."""
    confusion = np.zeros((n_classes, n_classes), np.int64)
    for embedding, tile in zip(embeddings, tiles, strict=True):
        cells = probe_inputs(embedding, part).double()
        with torch.inference_mode():
            logits = probe(cells.flatten(1).T).T.reshape(n_classes, *cells.shape[1:])
            logits = F.interpolate(logits[None], size=tile.label.shape, mode="bilinear", align_corners=False)[0]
        pred = logits.argmax(dim=0).numpy()
        confusion += confusion_matrix(pred, tile.label, n_classes, n_classes, ignore_leq)
    return mapped_scores(confusion, np.arange(n_classes), ignore_leq).miou


def probe_dataset(
    model: SegmentationModel, config: TrainConfig, processed_root: Path, dataset_id: str, seed: int
) -> dict | None:
    """The JSON record of one labeled dataset (None when it has no labels)."""
    n_classes, ignore_leq, data_version = dataset_label_space(processed_root, dataset_id)
    if n_classes is None:
        return None
    fit_tiles = [t for t in SplitTiles(processed_root, dataset_id, FIT_SPLIT, ignore_leq) if t.label is not None]
    val_tiles = [t for t in SplitTiles(processed_root, dataset_id, EVAL_SPLIT, ignore_leq) if t.label is not None]
    fit_embeddings = [embed_tile(model, tile.rgb) for tile in fit_tiles]
    val_embeddings = [embed_tile(model, tile.rgb) for tile in val_tiles]
    cell_labels = [cell_targets(tile.label, n_classes, ignore_leq) for tile in fit_tiles]
    targets = torch.cat([cls.flatten() for cls, _ in cell_labels])
    keep = torch.cat([share.flatten() >= MIN_LABELED_SHARE for _, share in cell_labels])
    record: dict = {"dataset_id": dataset_id, "data_version": data_version, "k": n_classes}
    record["probe_cells"] = int(keep.sum())
    for part in ("colour", "features", "both"):
        cells = torch.cat([probe_inputs(e, part).flatten(1).T for e in fit_embeddings])[keep]
        probe = fit_probe(cells, targets[keep], n_classes)
        record[f"probe_{part}_miou"] = score_probe(probe, val_embeddings, val_tiles, part, n_classes, ignore_leq)
    clustering = evaluate_model(model, config, processed_root, dataset_id, seed=seed, n_samples=0)
    record["model_hungarian_miou"] = clustering.miou(MODEL)
    record["kmeans_rgb_hungarian_miou"] = clustering.miou(BASELINE)
    # The share of the linearly available labels that the clustering recovers.
    record["model_over_probe_both"] = record["model_hungarian_miou"] / max(record["probe_both_miou"], 1e-9)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint (last.pt)")
    parser.add_argument("--extracted-root", type=Path, default=SAMPLE_ROOT)
    parser.add_argument("--seed", type=int, default=42, help="seeds the clustering's sample of cells")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint} is not a file")
    model, config = model_from_checkpoint(args.checkpoint)
    if colour_projection(config.model.luminance_weight, config.model.chroma_weight) is None:
        parser.error(f"checkpoint {args.checkpoint}: the model appends no colour, so there is no colour probe")
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        processed = Path(tmp) / "processed"
        for dataset_id in discover_datasets(args.extracted_root):
            build_shards(args.extracted_root, processed, dataset_id)
            record = probe_dataset(model, config, processed, dataset_id, args.seed)
            if record is not None:
                line = {"bench": "probe", "checkpoint": str(args.checkpoint), "seed": args.seed, **record}
                print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
