"""Model quality on real imagery: train from scratch within a budget, export, score with the numpy runtime.

Trains on the unlabeled ``train`` tiles of every bundled sample dataset (never the labeled ones) for
the config's ``steps`` (the shipped defaults unless ``--config``), stopping early if the wall budget
runs out (15 minutes by default; the defaults need about 2 on 2 idle cores), and exports the runtime
artifact. Then for every labeled dataset it scores, side by side on the same val pixels (mapping
fitted on ``metrics_train``): the model through the numpy runtime, its untrained twin, k-means on RGB,
and the constant predictor (``training_core.eval``, which fits each method's cluster centres for the
dataset as ``runtime_export.segment`` does for one raster). One JSON line per dataset.

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

from training_core.checkpoint import latest_checkpoint
from training_core.config import TrainConfig, load_config
from training_core.datasets.discovery import discover_datasets
from training_core.eval.report import BASELINE, CONSTANT, MODEL
from training_core.eval.scoring import dataset_label_space, evaluate_checkpoint
from training_core.export import export_artifact
from training_core.export_datasets import input_rules_of
from training_core.shards.write import build_shards
from training_core.train import train

SAMPLE_ROOT = Path(__file__).resolve().parents[1] / "sample_data" / "extracted"
CHUNK_STEPS = 25  # training runs in resumable chunks so the wall budget is checked between them


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


def score_dataset(checkpoint: Path, processed_root: Path, dataset_id: str, seed: int) -> dict | None:
    """The JSON record of one labeled dataset (None when it has no labels): ``training_core.eval``'s report,
    which runs the model through the numpy runtime beside its controls."""
    n_classes, _, _ = dataset_label_space(processed_root, dataset_id)
    if n_classes is None:
        return None
    report = evaluate_checkpoint(checkpoint, processed_root, dataset_id, seed=seed)
    record: dict = {"dataset_id": dataset_id, "data_version": report.data_version, "k": report.k}
    record["mapping_fitted_on"] = report.mapping_fitted_on
    record["val_tiles"] = report.n_eval_tiles
    for name, method in report.methods.items():
        record[name] = {
            "hungarian_miou": method.hungarian.miou,
            "per_class_iou": method.hungarian.per_class_iou,
            "pixel_accuracy": method.hungarian.pixel_accuracy,
            "majority_miou_k8": method.majority_k8.miou,
            "cluster_shares": [round(share, 4) for share in method.cluster_shares],
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
    checkpoint = latest_checkpoint(work / f"ckpt-{seed}")
    export_artifact(checkpoint, work / f"artifact-{seed}", {}, {}, input_rules_of(processed, dataset_ids))
    records = []
    for dataset_id in dataset_ids:
        record = score_dataset(checkpoint, processed, dataset_id, seed)
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
