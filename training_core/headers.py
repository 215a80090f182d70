"""Header extraction CLI: extract (or load the committed) dataset header and validate every file against it.

``python -m training_core.headers --extracted-root DIR [--dataset-id ID] [--out DIR | --dry-run]``

The schema, discovery, raster checks and inference live in ``training_core.datasets``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from training_core.datasets.discovery import discover_datasets
from training_core.datasets.errors import DatasetError
from training_core.datasets.scan import scan_dataset
from training_core.datasets.schema import HEADER_FILENAME, dump_header, header_hash, header_to_yaml


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="segpipe-headers",
        description="Extract (or load the committed) dataset header and validate every file against it.",
    )
    parser.add_argument("--extracted-root", required=True, type=Path, help="folder of <dataset_id>/ folders")
    parser.add_argument("--dataset-id", help="one dataset (default: every sub-folder)")
    parser.add_argument("--out", type=Path, help=f"write <out>/<dataset_id>/{HEADER_FILENAME}; default: print YAML")
    parser.add_argument("--dry-run", action="store_true", help="validate and summarise only; write nothing")
    parser.add_argument("--workers", type=int, default=None, help="processes reading files (default: CPU count)")
    args = parser.parse_args(argv)
    try:
        ids = [args.dataset_id] if args.dataset_id else discover_datasets(args.extracted_root)
        for dataset_id in ids:
            dataset_dir = args.extracted_root / dataset_id
            if not dataset_dir.is_dir():
                raise DatasetError(f"{dataset_dir}: no such dataset folder")
            scan = scan_dataset(dataset_dir, dataset_id, args.workers)
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
    except (DatasetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
