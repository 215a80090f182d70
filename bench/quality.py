"""Model quality on real imagery: train from scratch within a budget, export, score with the numpy runtime.

Trains on the unlabeled ``train`` tiles of every bundled sample dataset (never the labeled ones) for
the config's ``steps`` (the shipped defaults unless ``--config``), stopping early if the wall budget
runs out (15 minutes by default; the defaults need about 2 on 2 idle cores), and exports the runtime
artifact. Then for every labeled dataset it scores, side by side on the same val pixels (mapping
fitted on ``metrics_train``): the model through the numpy runtime, k-means on RGB, and the constant
predictor (every pixel one cluster, i.e. the most frequent class). Each method fits one set of cluster
centres for the dataset from its tiles' pixels (no labels), as ``runtime_export.segment`` does for one
raster. One JSON line per dataset.

    python bench/quality.py --seed 1 --seed 2 --seed 3      # shipped defaults, 15 min budget per seed
    python bench/quality.py --budget-s 300 --steps 5000       # as many steps as 5 minutes allow
    python bench/quality.py --device cuda --config my_variant.py
    python bench/quality.py --seed 1 --work-dir /tmp/q   # keeps shards, checkpoints and artifacts there

A CPU run repeats exactly for the same seed *and* the same torch thread count (``--threads``, recorded in
every line): another thread count sums in another order, and training is chaotic enough that those
last-bit differences grow into a different model (docs/MODEL_NOTES.md). So a seed is a draw, not a
setting: compare configurations by their spread over seeds, never one seed against another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from runtime_export.export import export_artifact
from runtime_export.runtime import RuntimeModel, load_runtime_model, soft_kmeans
from training_core.checkpoint import latest_checkpoint
from training_core.config import TrainConfig, load_config
from training_core.datasets.discovery import discover_datasets
from training_core.eval import (
    BASELINE,
    EVAL_SPLIT,
    FIT_SPLIT,
    MODEL,
    FitFn,
    PredictFn,
    baseline_fit_fn,
    dataset_label_space,
    evaluate_tiles,
    sample_fit_rows,
    split_tiles,
)
from training_core.shards import build_shards
from training_core.train import train

SAMPLE_ROOT = Path(__file__).resolve().parents[1] / "sample_data" / "extracted"
CONSTANT = "constant"
MAJORITY_K = 8
CHUNK_STEPS = 25  # training runs in resumable chunks so the wall budget is checked between them


def runtime_fit_fn(model: RuntimeModel, seed: int) -> FitFn:
    """The numpy runtime with one set of prototypes for the dataset (its seeded soft k-means on the same
    sample of pooled cells as ``training_core.eval.model_fit_fn``)."""

    def fit(tiles: Sequence[np.ndarray], k: int) -> PredictFn:
        embeddings = [model.embed(rgb) for rgb in tiles]
        cells = np.concatenate([e.embeddings for e in embeddings])
        seeds = np.concatenate([e.seed_logits[:, :k] for e in embeddings])
        picks = sample_fit_rows(len(cells), seed)
        _, prototypes = soft_kmeans(cells[picks], seeds[picks], model.cluster_iters, model.temperature)

        def predict(rgb: np.ndarray) -> np.ndarray:
            embedding = model.embed(rgb)
            return model.labels_from_assignment(model.assign(embedding, prototypes), embedding)

        return predict

    return fit


def constant_fit_fn(tiles: Sequence[np.ndarray], k: int) -> PredictFn:
    """Every pixel in cluster 0: the Hungarian mapping sends it to the most frequent class."""
    return lambda rgb: np.zeros(rgb.shape[1:], np.uint8)


def train_within_budget(config: TrainConfig, checkpoint_dir: Path, budget_s: float) -> dict:
    """Train in resumable chunks until ``config.steps`` are done or the wall budget is spent; returns what
    was used."""
    started = time.perf_counter()
    done = 0
    while done < config.steps and time.perf_counter() - started < budget_s:
        result = train(config, checkpoint_dir, resume=True, stop_after_steps=min(CHUNK_STEPS, config.steps - done))
        if result.interrupted:  # SIGTERM: train() saved and returned; without this the next chunk resumes it
            raise SystemExit(f"stopped by SIGTERM at step {result.steps}")
        done = result.steps
    return {
        "steps": done,
        "config_steps": config.steps,
        "train_wall_s": round(time.perf_counter() - started, 1),
        "device": result.device,
    }


def score_dataset(model: RuntimeModel, processed_root: Path, dataset_id: str, seed: int) -> dict | None:
    """The JSON record of one labeled dataset (None when it has no labels)."""
    n_classes, ignore_leq, data_version = dataset_label_space(processed_root, dataset_id)
    if n_classes is None:
        return None
    fit_tiles = list(split_tiles(processed_root, dataset_id, FIT_SPLIT, ignore_leq))
    val_tiles = list(split_tiles(processed_root, dataset_id, EVAL_SPLIT, ignore_leq))
    methods = {MODEL: runtime_fit_fn(model, seed), BASELINE: baseline_fit_fn(seed), CONSTANT: constant_fit_fn}
    k = max(n_classes, 2)
    at_k = evaluate_tiles(methods, fit_tiles, val_tiles, k, n_classes, ignore_leq, n_samples=0)
    at_8 = evaluate_tiles(methods, fit_tiles, val_tiles, MAJORITY_K, n_classes, ignore_leq, n_samples=0)
    record: dict = {"dataset_id": dataset_id, "data_version": data_version, "k": k}
    record["mapping_fitted_on"] = at_k.mapping_fitted_on
    record["val_tiles"] = len(val_tiles)
    for name in methods:
        hungarian, majority = at_k.methods[name].hungarian, at_8.methods[name].majority
        record[name] = {
            "hungarian_miou": hungarian.miou,
            "per_class_iou": hungarian.per_class_iou,
            "pixel_accuracy": hungarian.pixel_accuracy,
            "majority_miou_k8": majority.miou,
            "cluster_shares": [round(share, 4) for share in at_k.methods[name].cluster_shares],
        }
    floor = max(record[BASELINE]["hungarian_miou"], record[CONSTANT]["hungarian_miou"])
    record["floor"] = floor
    record["model_minus_floor"] = record[MODEL]["hungarian_miou"] - floor
    record["no_collapse"] = min(record[MODEL]["cluster_shares"]) >= 0.01
    return record


def run(args: argparse.Namespace, seed: int, work: Path) -> list[dict]:
    processed = work / "processed"
    dataset_ids = discover_datasets(args.extracted_root)
    for dataset_id in dataset_ids:
        build_shards(args.extracted_root, processed, dataset_id)
    config = load_config(args.config) if args.config else TrainConfig()
    data = config.data.model_copy(
        update={"source": "shards", "processed_root": str(processed), "dataset_ids": dataset_ids, "split": "train"}
    )
    update = {"data": data, "seed": seed, "device": args.device}
    if args.steps is not None:
        update["steps"] = args.steps
    config = config.model_copy(update=update)
    config = TrainConfig.model_validate(config.model_dump())  # re-run the validators on the final config
    budget = train_within_budget(config, work / f"ckpt-{seed}", args.budget_s)
    artifact = export_artifact(latest_checkpoint(work / f"ckpt-{seed}"), work / f"artifact-{seed}", {}, {})
    model = load_runtime_model(artifact)
    records = []
    for dataset_id in dataset_ids:
        record = score_dataset(model, processed, dataset_id, seed)
        if record is not None:
            config_name = args.config.stem if args.config else "defaults"
            records.append(
                {
                    "bench": "quality",
                    "config": config_name,
                    "seed": seed,
                    "threads": torch.get_num_threads(),
                    "budget_s": args.budget_s,
                    **budget,
                    **record,
                }
            )
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extracted-root", type=Path, default=SAMPLE_ROOT)
    parser.add_argument("--budget-s", type=float, default=900.0, help="training wall budget per seed")
    parser.add_argument("--steps", type=int, default=None, help="steps to train (default: the config's)")
    parser.add_argument("--seed", type=int, action="append", help="repeatable; default 42")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", type=Path, default=None, help="training config (python module or YAML)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="keep shards, checkpoints (ckpt-SEED) and artifacts here"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seed or [42]
    if args.work_dir:
        # A kept checkpoint would be resumed, not retrained, and scored as if this config had trained it.
        taken = [str(path) for path in (args.work_dir / f"ckpt-{seed}" for seed in seeds) if path.exists()]
        if taken:
            parser.error(f"--work-dir {args.work_dir} already holds {', '.join(taken)}: use a fresh folder")
    by_dataset: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        work = args.work_dir or Path(tmp)
        for seed in seeds:
            for record in run(args, seed, work):
                print(json.dumps(record), flush=True)
                by_dataset.setdefault(record["dataset_id"], []).append(record[MODEL]["hungarian_miou"])
    if len(seeds) > 1:
        spread = {
            ds: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
            for ds, v in by_dataset.items()
        }
        print(json.dumps({"bench": "quality_spread", "seeds": seeds, "model_hungarian_miou": spread}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
