"""Evaluation CLI: score a checkpoint on a processed dataset, or a model on seeded synthetic tiles.

::

    python -m training_core.eval --synthetic --seed 7
    python -m training_core.eval --data-source shards --processed-root DIR --dataset-id ID --checkpoint PATH

prints the JSON report and writes it to ``--output``; a user error (a K outside the model's range, a missing
or damaged checkpoint or dataset, an unwritable output) is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import rasterio
import torch

import training_core.eval
from runtime_export.atomic import atomic_write_text
from runtime_export.cli import run_cli
from training_core.checkpoint import model_from_checkpoint
from training_core.config import ModelConfig
from training_core.eval.picture import render_comparison
from training_core.eval.scoring import evaluate_checkpoint, evaluate_synthetic
from training_core.model import SegmentationModel

SYNTHETIC_K = 4  # the synthetic tiles' K unless --k (at most the model's max_k)
PROG = "python -m training_core.eval"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=training_core.eval.__doc__.split("\n\n")[0])
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
