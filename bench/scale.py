"""Cost and memory of every stage as the data grows: one JSON line per stage and size, then the ratios.

Two kinds of growth, built in a temp folder from the bundled kampala tiles (images and masks):
- ``tiles``: the 48 tiles replicated 1x, 4x and 16x under new stems (many small rasters);
- ``mosaic``: rasters of 2048², 8192² and 16384² pixels tiled from the same tiles, written window by
  window: two labeled ones (one lands in metrics_train, one in val) and one unlabeled (train), which the
  shard build cuts into chips.

For each dataset, each stage runs in a fresh process, so its peak RSS (VmHWM) is its own (the shard build's
worker processes are reported apart, the largest of them):
``shards`` (build_shards), ``train`` (20 CPU steps on the shards' train split), ``eval``
(``evaluate_checkpoint``: model, untrained twin, k-means, constant) and ``segment`` (the numpy runtime on
the mosaic raster at K = 8; the tile datasets have no single raster). Each line gives seconds per
megapixel of the stage's input and peak RSS; a last line per kind gives the largest-to-smallest ratios.

Targets (issue 17): peak RSS at 16x <= 1.25x of 1x and <= 2 GB everywhere; seconds per megapixel at 16x
<= 1.2x of 1x; segment >= 1.2 MP/s on a 8192² raster at K = 8 with peak RSS <= 1 GB.

    python bench/scale.py                                   # everything (long: tens of minutes on 2 cores)
    python bench/scale.py --kind mosaic --sizes 2048 8192   # a part
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

REPO = Path(__file__).resolve().parents[1]
KAMPALA = REPO / "sample_data" / "extracted" / "kampala_buildings"
TILE = 256
TRAIN_STEPS = 20
SEGMENT_K = 8
TILE_FACTORS = (1, 4, 16)
MOSAIC_SIZES = (2048, 8192, 16384)

# Each stage runs in its own interpreter and prints {"wall_s", "peak_rss_mb"} as its last line.
STAGE = """
import json, resource, sys, time
from pathlib import Path
work, dataset_id, stage, steps, k = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
extracted, processed = work / "extracted", work / "processed"
started = time.perf_counter()
if stage == "shards":
    from training_core.shards.write import build_shards
    build_shards(extracted, processed, dataset_id, overwrite=True)
elif stage == "train":
    from training_core.config import TrainConfig
    from training_core.train import train
    config = TrainConfig.model_validate({
        "device": "cpu", "steps": steps, "log_every": 1000, "checkpoint_every": 1000,
        "data": {"source": "shards", "processed_root": str(processed), "dataset_ids": [dataset_id], "split": "train"},
    })
    train(config, work / f"ckpt-{dataset_id}", resume=False)
elif stage == "eval":
    from training_core.eval.scoring import evaluate_checkpoint
    evaluate_checkpoint(work / f"ckpt-{dataset_id}" / "last.pt", processed, dataset_id)
elif stage == "segment":
    from training_core.export import export_artifact
    from runtime_export.numpy_runtime.runtime import load_runtime_model
    from runtime_export.segment import segment_raster
    artifact = export_artifact(work / f"ckpt-{dataset_id}" / "last.pt", work / f"artifact-{dataset_id}", {}, {})
    model = load_runtime_model(artifact)  # loading is not the segmentation: restart the clock
    started = time.perf_counter()
    raster = extracted / dataset_id / "images" / "mosaic_a.tif"
    segment_raster(model, raster, work / f"labels-{dataset_id}.tif", k)
wall = time.perf_counter() - started
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
# The shard build's worker processes: the largest of them (ru_maxrss of waited-for children, in kB).
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"wall_s": wall, "peak_rss_mb": int(hwm.split()[1]) / 1024, "worker_peak_rss_mb": children / 1024}))
"""


def replicate_tiles(dest: Path, factor: int) -> float:
    """kampala's tiles ``factor`` times under new stems; returns the megapixels of the images."""
    for folder in ("images", "masks"):
        (dest / folder).mkdir(parents=True)
        for path in sorted((KAMPALA / folder).glob("*.tif")):
            for copy in range(factor):
                shutil.copyfile(path, dest / folder / f"{path.stem}-r{copy}.tif")
    return factor * len(list((KAMPALA / "images").glob("*.tif"))) * TILE * TILE / 1e6


MOSAICS = {"mosaic_a": True, "mosaic_b": True, "mosaic_c": False}  # name -> labeled


def write_mosaic(dest: Path, size: int) -> float:
    """Size x size rasters (``MOSAICS``) tiled from kampala's labeled tiles, written one row of tiles at a time,
    each starting at another tile; returns their megapixels."""
    names = sorted(p.stem for p in (KAMPALA / "masks").glob("*.tif"))
    images = [rasterio.open(KAMPALA / "images" / f"{n}.tif").read() for n in names]
    masks = [rasterio.open(KAMPALA / "masks" / f"{n}.tif").read() for n in names]
    with rasterio.open(KAMPALA / "images" / f"{names[0]}.tif") as src:
        crs, transform = src.crs, src.transform
    common = {"driver": "GTiff", "width": size, "height": size, "crs": crs, "transform": transform}
    common |= {"tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
    per_row = math.ceil(size / TILE)
    for start, (name, labeled) in enumerate(MOSAICS.items()):
        for folder, tiles, count in (("images", images, 3), ("masks", masks, 1))[: 2 if labeled else 1]:
            (dest / folder).mkdir(parents=True, exist_ok=True)
            with rasterio.open(dest / folder / f"{name}.tif", "w", count=count, dtype="uint8", **common) as dst:
                for row in range(per_row):
                    height = min(TILE, size - row * TILE)
                    picks = [tiles[(start + row * per_row + col) % len(tiles)] for col in range(per_row)]
                    dst.write(
                        np.concatenate(picks, axis=2)[:, :height, :size], window=Window(0, row * TILE, size, height)
                    )
    return len(MOSAICS) * size * size / 1e6


def stage_megapixels(kind: str, size: int, stage: str, dataset_megapixels: float) -> float:
    """The megapixels a stage reads: the shard build all of the dataset; evaluation its labeled rasters (the
    fit sample from metrics_train, the scores on val); ``segment`` one mosaic raster."""
    if stage == "segment":
        return size * size / 1e6
    if stage == "eval":
        if kind == "mosaic":
            return sum(MOSAICS.values()) * size * size / 1e6
        return size * len(list((KAMPALA / "masks").glob("*.tif"))) * TILE * TILE / 1e6
    return dataset_megapixels


def run_stage(work: Path, dataset_id: str, stage: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", STAGE, str(work), dataset_id, stage, str(TRAIN_STEPS), str(SEGMENT_K)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if result.returncode != 0:
        raise SystemExit(f"stage {stage} on {dataset_id} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_kind(kind: str, sizes: list[int], stages: list[str], root: Path) -> None:
    by_stage: dict[str, list[dict]] = {}
    for size in sizes:
        work = root / f"{kind}-{size}"
        dataset_id = f"{kind}_{size}"
        dataset = work / "extracted" / dataset_id
        megapixels = replicate_tiles(dataset, size) if kind == "tiles" else write_mosaic(dataset, size)
        for stage in stages:
            if stage == "segment" and kind == "tiles":
                continue
            figures = run_stage(work, dataset_id, stage)
            stage_mp = stage_megapixels(kind, size, stage, megapixels)
            line = {
                "bench": "scale",
                "kind": kind,
                "size": size,
                "stage": stage,
                "megapixels": round(stage_mp, 2),
                "wall_s": round(figures["wall_s"], 2),
                # Training runs a fixed number of steps: its cost per step, not per megapixel of data.
                "s_per_mp": None if stage == "train" else round(figures["wall_s"] / stage_mp, 4),
                "mp_per_s": None if stage == "train" else round(stage_mp / figures["wall_s"], 3),
                "peak_rss_mb": round(figures["peak_rss_mb"], 1),
                # The shard build's workers; other stages' children are helpers such as `git` (code version).
                "worker_peak_rss_mb": round(figures["worker_peak_rss_mb"], 1) if stage == "shards" else None,
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
            by_stage.setdefault(stage, []).append(line)
            print(json.dumps(line), flush=True)
        shutil.rmtree(work)
    ratios = {}
    for stage, lines in by_stage.items():
        small, large = lines[0], lines[-1]
        ratios[stage] = {
            "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "s_per_mp_ratio": (
                round(large["s_per_mp"] / small["s_per_mp"], 3)
                if small["s_per_mp"]
                else round(large["wall_s"] / small["wall_s"], 3)
            ),
            "max_peak_rss_mb": max(line["peak_rss_mb"] for line in lines),
        }
    summary = {"bench": "scale_ratios", "kind": kind, "largest_over_smallest": f"{sizes[-1]}/{sizes[0]}"}
    print(json.dumps({**summary, "stages": ratios, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["tiles", "mosaic"], action="append", help="default: both")
    parser.add_argument("--sizes", type=int, nargs="+", help="tile factors or mosaic sides (default: all)")
    parser.add_argument("--stages", nargs="+", default=["shards", "train", "eval", "segment"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for kind in args.kind or ["tiles", "mosaic"]:
            sizes = args.sizes or list(TILE_FACTORS if kind == "tiles" else MOSAIC_SIZES)
            bench_kind(kind, sizes, args.stages, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
