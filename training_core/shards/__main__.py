"""The command line ``segpipe-shards`` (``python -m training_core.shards``): build one dataset's shards or every
dataset's, or print the plan (``--dry-run``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import rasterio

from runtime_export.cli import run_cli
from training_core.datasets.discovery import discover_datasets
from training_core.shards.plan import plan_shards
from training_core.shards.write import build_shards

PROG = "segpipe-shards"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: a bad input is one line ``segpipe-shards: error: ...`` on stderr and exit 2."""
    return run_cli(PROG, _main, argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Build processed shards (layout v0).")
    parser.add_argument("--extracted-root", required=True, type=Path)
    parser.add_argument("--processed-root", required=True, type=Path)
    parser.add_argument("--dataset-id", help="one dataset (default: every sub-folder of the extracted root)")
    parser.add_argument("--seed", type=int, help="override the header's splits.seed")
    parser.add_argument("--shard-size", type=int, help="override the header's sharding.shard_size")
    parser.add_argument("--overwrite", action="store_true", help="replace output built from other data/settings")
    parser.add_argument("--dry-run", action="store_true", help="print the planned split counts; write nothing")
    parser.add_argument("--workers", type=int, help="processes writing tiles (default: CPU count)")
    args = parser.parse_args(argv)
    # Inside an Env, GDAL's errors (a truncated TIFF's) reach rasterio, which raises them, instead of being
    # printed on stderr beside the one line naming the file.
    with rasterio.Env():
        ids = [args.dataset_id] if args.dataset_id else discover_datasets(args.extracted_root)
        for dataset_id in ids:
            if args.dry_run:
                plan = plan_shards(args.extracted_root, dataset_id, seed=args.seed, shard_size=args.shard_size)
                shards = {split: len(members) for split, members in plan.shards().items()}
                summary = {
                    "dataset_id": dataset_id,
                    "dry_run": True,
                    "counts": plan.counts,
                    "tile_counts": plan.tile_counts,
                    "shards": shards,
                    "header": "committed" if plan.header_committed else "inferred",
                }
                print(json.dumps(summary))
                continue
            report = build_shards(
                args.extracted_root,
                args.processed_root,
                dataset_id,
                seed=args.seed,
                shard_size=args.shard_size,
                overwrite=args.overwrite,
                workers=args.workers,
            )
            print(json.dumps(report.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
