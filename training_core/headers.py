"""Header extraction CLI: extract (or load the committed) dataset header and validate every file against it.

``python -m training_core.headers --extracted-root DIR [--dataset-id ID] [--out DIR | --dry-run]``

A bad input (a missing folder, a file that does not open, a link leading out of the dataset folder, a
dataset without a valid pixel...) is one line ``segpipe-headers: error: ...`` on stderr and exit 2, with
nothing written. The schema, discovery, raster checks and inference live in ``training_core.datasets``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import rasterio

from runtime_export.cli import run_cli
from training_core.datasets.discovery import dataset_folder, discover_datasets
from training_core.datasets.scan import scan_dataset
from training_core.datasets.schema import HEADER_FILENAME, dump_header, header_hash, header_to_yaml

PROG = "segpipe-headers"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a user error is reported as one line (``runtime_export.cli``)."""
    return run_cli(PROG, _main, argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Extract (or load the committed) dataset header and validate every file against it.",
    )
    parser.add_argument("--extracted-root", required=True, type=Path, help="folder of <dataset_id>/ folders")
    parser.add_argument("--dataset-id", help="one dataset (default: every sub-folder)")
    parser.add_argument("--out", type=Path, help=f"write <out>/<dataset_id>/{HEADER_FILENAME}; default: print YAML")
    parser.add_argument("--dry-run", action="store_true", help="validate and summarise only; write nothing")
    parser.add_argument("--workers", type=int, default=None, help="processes reading files (default: CPU count)")
    args = parser.parse_args(argv)
    # Inside an Env, GDAL's errors (a truncated TIFF's) reach rasterio, which raises them, instead of being
    # printed on stderr beside the one line naming the file.
    with rasterio.Env():
        ids = [args.dataset_id] if args.dataset_id else discover_datasets(args.extracted_root)
        for dataset_id in ids:
            scan = scan_dataset(dataset_folder(args.extracted_root, dataset_id), dataset_id, args.workers)
            header = scan.header
            summary = {
                "dataset_id": dataset_id,
                "header": "committed" if scan.committed else "inferred",
                "items": len(scan.items),
                "labeled": sum(item.labeled for item in scan.items),
                "label_values": scan.label_values,
                "crs": scan.crs,
                "ground_resolution_m": header.input.ground_resolution_m,
                "licence": header.licence,
                "header_hash": header_hash(header),
            }
            if args.dry_run:
                print(json.dumps(summary))
            elif args.out is not None:
                summary["written"] = str(dump_header(header, args.out / dataset_id / HEADER_FILENAME))
                print(json.dumps(summary))
            else:
                print("---\n" + header_to_yaml(header), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
