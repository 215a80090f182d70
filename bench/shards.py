"""Shard build throughput against a serial floor; prints one JSON line.

The sample tiles (kampala_buildings, images and masks) are replicated under new stems to at least
--items items in a temp folder. The floor is a bare single-process loop that reads every input with
rasterio and writes it uncompressed; the build is `build_shards` with its default parallelism. Both run
--repeats times in this process, interleaved; the fastest run of each counts, and the median ratio of
each build to the floor run just before it is printed too. On a shared machine the parallel build needs
the other core free, so the line also carries the 1-minute load average and the speedup `workers` busy
processes actually get (measured before and after).
Targets: build/floor <= 0.8 on 2 cores, peak RSS < 500 MB (this process plus every worker process, each
at its own peak).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import rasterio

from training_core.datasets.scan import INPUT_FOLDER, TARGET_FOLDER, default_workers
from training_core.shards.write import build_shards

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "extracted" / "kampala_buildings"


def replicate(sample: Path, dest: Path, min_items: int) -> int:
    """Copy the dataset under new stems until it has at least min_items items; returns the item count."""
    inputs = sorted((sample / INPUT_FOLDER).glob("*.tif"))
    copies = math.ceil(min_items / len(inputs))
    for folder in (INPUT_FOLDER, TARGET_FOLDER):
        (dest / folder).mkdir(parents=True)
        for path in sorted((sample / folder).glob("*.tif")):
            for copy in range(copies):
                shutil.copyfile(path, dest / folder / f"{path.stem}-r{copy}.tif")
    return copies * len(inputs)


def floor_copy(dataset: Path, out: Path) -> float:
    """The serial floor: read every input, write it uncompressed with its georeferencing."""
    out.mkdir()
    started = time.perf_counter()
    for path in sorted((dataset / INPUT_FOLDER).glob("*.tif")):
        with rasterio.open(path) as src:
            pixels = src.read()
            profile = {
                "driver": "GTiff",
                "width": src.width,
                "height": src.height,
                "count": src.count,
                "dtype": src.dtypes[0],
                "crs": src.crs,
                "transform": src.transform,
                "nodata": src.nodata,
            }
        with rasterio.open(out / path.name, "w", **profile) as dst:
            dst.write(pixels)
    return time.perf_counter() - started


def cpu_s() -> float:
    """CPU seconds of this process and its finished children (the build's pool is shut down when it returns)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def available_speedup(workers: int, n: int = 3_000_000) -> float:
    """How much faster `workers` processes finish `workers` equal CPU jobs than one process does: about
    `workers` on an idle machine, about 1 when other jobs hold the other cores. Puts the ratio in context."""
    started = time.perf_counter()
    for _ in range(workers):
        _spin(n)
    serial = time.perf_counter() - started
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_spin, [n] * workers))  # warm the pool up first
        started = time.perf_counter()
        list(pool.map(_spin, [n] * workers))
        parallel = time.perf_counter() - started
    return serial / parallel


def max_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        extracted = Path(tmp) / "extracted"
        n_items = replicate(SAMPLE, extracted / "bench", args.items)
        load_before = os.getloadavg()[0]
        workers = args.workers or default_workers()
        speedup_before = available_speedup(workers)
        floors, builds, floor_cpu, build_cpu = [], [], [], []
        for repeat in range(args.repeats):
            cpu = cpu_s()
            floors.append(floor_copy(extracted / "bench", Path(tmp) / f"floor-{repeat}"))
            floor_cpu.append(cpu_s() - cpu)
            cpu, started = cpu_s(), time.perf_counter()
            report = build_shards(extracted, Path(tmp) / f"processed-{repeat}", "bench", workers=args.workers)
            builds.append(time.perf_counter() - started)
            build_cpu.append(cpu_s() - cpu)
        build_s, floor_s = min(builds), min(floors)
        speedup_after = available_speedup(workers)
        self_mb, worker_mb = max_rss_mb(resource.RUSAGE_SELF), max_rss_mb(resource.RUSAGE_CHILDREN)
        print(
            json.dumps(
                {
                    "bench": "shards",
                    "items": n_items,
                    "labeled": report.n_labeled,
                    "workers": workers,
                    "items_per_s": round(n_items / build_s, 1),
                    "mb_per_s": round(report.bytes_written / build_s / 1e6, 1),
                    "bytes_written": report.bytes_written,
                    "build_wall_s": round(build_s, 3),
                    "floor_wall_s": round(floor_s, 3),
                    "ratio_build_to_floor": round(build_s / floor_s, 3),
                    "ratio_median_of_pairs": round(
                        statistics.median(b / f for b, f in zip(builds, floors, strict=True)), 3
                    ),
                    "peak_rss_mb": round(self_mb + workers * worker_mb, 1),
                    "peak_rss_main_mb": round(self_mb, 1),
                    "peak_rss_worker_mb": round(worker_mb, 1),
                    "build_cpu_s": round(min(build_cpu), 3),
                    "floor_cpu_s": round(min(floor_cpu), 3),
                    "build_walls_s": [round(t, 3) for t in builds],
                    "floor_walls_s": [round(t, 3) for t in floors],
                    "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                    "available_speedup": [round(speedup_before, 2), round(speedup_after, 2)],
                }
            )
        )


if __name__ == "__main__":
    main()
