"""``python -m pipeline.check_sample``: what CI asserts after ``sample_pipeline`` ran.

The exported artifact exists, loads in the numpy runtime and segments a real sample tile, and its
``meta.json`` lineage names the datasets with the data versions (content hashes) they have right now,
each dataset's shards at the data version of the shards on disk, plus the runs of every upstream stage.
Prints one JSON line; exits non-zero with the reason otherwise.
"""

import json
import sys
from pathlib import Path
from typing import Any

import dagster as dg

from assets.datasets import shards_data_version
from assets.lineage import latest_artifact
from assets.resources import ProjectPaths
from pipeline.definitions import defs
from runtime_export.numpy_runtime.pixels import PixelRule
from runtime_export.numpy_runtime.runtime import META_FILENAME, load_runtime_model
from runtime_export.rasters import read_item
from training_core.datasets.discovery import dataset_content_hash
from training_core.shards.index import MANIFEST_FILENAME

UPSTREAM_RUNS = ("evaluation", "training", "shards", "header")


def check_sample_artifact(instance: dg.DagsterInstance, paths: ProjectPaths) -> dict[str, Any]:
    """Raise AssertionError naming the first problem; return a summary when the artifact is sound."""
    artifact_dir = Path(latest_artifact(instance).artifact_dir)
    meta = json.loads((artifact_dir / META_FILENAME).read_text())
    lineage = meta["lineage"]
    assert lineage["datasets"], f"{artifact_dir}: lineage names no dataset"
    for dataset_id in lineage["datasets"]:
        current = dataset_content_hash(paths.dataset_dir(dataset_id))
        recorded = lineage["data_versions"].get(dataset_id)
        assert recorded == current, f"{artifact_dir}: data version of {dataset_id} is {recorded}, data is {current}"
        built = shards_data_version(Path(paths.processed_root) / dataset_id / MANIFEST_FILENAME).value
        shards = lineage["asset_data_versions"]["processed_shards"].get(dataset_id)
        assert shards == built, f"{artifact_dir}: shards of {dataset_id} recorded at {shards}, built at {built}"
    for stage in UPSTREAM_RUNS:
        assert lineage["runs"].get(stage), f"{artifact_dir}: lineage has no {stage} run id"
    model = load_runtime_model(artifact_dir)
    dataset_id = lineage["trained_on"][0]
    tile_path = sorted(paths.dataset_dir(dataset_id).rglob("*.tif"))[0]
    assert dataset_id in meta["input_rules"], f"{artifact_dir}: meta.json has no input rule for {dataset_id}"
    rgb = read_item(tile_path, None, PixelRule.from_dict(meta["input_rules"][dataset_id])).image
    labels = model.predict_labels(rgb, 2)
    assert labels.shape == rgb.shape[1:], f"labels {labels.shape} for a tile of {rgb.shape[1:]}"
    return {
        "artifact_dir": str(artifact_dir),
        "datasets": lineage["datasets"],
        "data_versions": lineage["data_versions"],
        "runs": lineage["runs"],
        "val_miou": meta["metrics"].get("val_miou"),
        "segmented": str(tile_path),
    }


def main() -> int:
    try:
        with dg.DagsterInstance.get() as instance:
            summary = check_sample_artifact(instance, defs.resources["paths"])
    except (AssertionError, dg.Failure, OSError, KeyError) as exc:
        print(f"sample artifact check failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
