"""Shard loader throughput against a bare rasterio floor, and what the LRU cache buys.

Builds the processed shards of the bundled sample data into a temporary folder, then, on the same
files and in the same run:
- floor: a bare loop that opens every shard tile (and target) with rasterio and reads it;
- ShardDataset with 0 workers and no cache, over all splits (same item count);
- ShardDataset with the LRU cache: first epoch (decodes) against second epoch (cache hits).
Page cache is warmed first; each timing is the best of ``--rounds``. Prints one JSON line.

Usage: python bench/loader.py [--patch-size 512] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import rasterio

from training_core.data.sharded import ShardDataset
from training_core.datasets.discovery import discover_datasets
from training_core.shards.write import build_shards
from training_core.splits import SPLITS

EXTRACTED = Path(__file__).resolve().parents[1] / "sample_data" / "extracted"


def split_datasets(processed_root: Path, patch_size: int, cache_mode: str) -> list[ShardDataset]:
    """One ShardDataset per split (all sample datasets together), so every shard tile is read."""
    return [ShardDataset(processed_root, split=split, patch_size=patch_size, cache_mode=cache_mode) for split in SPLITS]


def read_floor(datasets: list[ShardDataset]) -> int:
    """Bare rasterio reads of every tile behind ``datasets``; returns the item count."""
    count = 0
    for dataset in datasets:
        for items in dataset.shards:
            for item in items:
                with rasterio.open(item.input_path) as src:
                    src.read()
                if item.target_path is not None:
                    with rasterio.open(item.target_path) as tgt:
                        tgt.read(1)
                count += 1
    return count


def iterate(datasets: list[ShardDataset], epoch: int = 0) -> int:
    count = 0
    for dataset in datasets:
        dataset.set_epoch(epoch)
        for _ in dataset:
            count += 1
    return count


class Best:
    """Fastest wall and process-CPU time seen over the rounds for one measured pass."""

    def __init__(self) -> None:
        self.wall_s = self.cpu_s = float("inf")

    def time(self, run: Callable[[], int]) -> int:
        wall, cpu = time.perf_counter(), time.process_time()
        count = run()
        self.wall_s = min(self.wall_s, time.perf_counter() - wall)
        self.cpu_s = min(self.cpu_s, time.process_time() - cpu)
        return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    floor, loader, first, second = Best(), Best(), Best(), Best()
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        processed_root = Path(tmp)
        for dataset_id in discover_datasets(EXTRACTED):
            build_shards(EXTRACTED, processed_root, dataset_id)
        plain = split_datasets(processed_root, args.patch_size, "none")
        read_floor(plain)  # warm the page cache so both sides read from memory

        for _ in range(args.rounds):  # interleaved, so drift in machine load hits both sides alike
            n_items = floor.time(lambda: read_floor(plain))
            n_loaded = loader.time(lambda: iterate(plain))
            if n_loaded != n_items:
                raise RuntimeError(f"ShardDataset yielded {n_loaded} items, the shards hold {n_items}")
            cached = split_datasets(processed_root, args.patch_size, "lru")  # a cold cache each round
            first.time(lambda: iterate(cached, epoch=0))  # noqa: B023 (called right here)
            second.time(lambda: iterate(cached, epoch=1))  # noqa: B023

    print(
        json.dumps(
            {
                "bench": "loader",
                "items": n_items,
                "patch_size": args.patch_size,
                "workers": 0,
                "samples_per_s": round(n_items / loader.wall_s, 1),
                "floor_samples_per_s": round(n_items / floor.wall_s, 1),
                "ratio": round(floor.wall_s / loader.wall_s, 3),
                # CPU time is less sensitive than wall time to other processes on a busy machine.
                "ratio_cpu": round(floor.cpu_s / loader.cpu_s, 3),
                "target_ratio": 0.7,
                "lru_first_epoch_s": round(first.wall_s, 4),
                "lru_second_epoch_s": round(second.wall_s, 4),
                "lru_speedup": round(first.wall_s / second.wall_s, 2),
                "target_speedup": 5.0,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
