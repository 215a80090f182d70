"""Export assets: the numpy runtime artifact (``model.npz`` + ``meta.json``) and its promotion to ``best``.

``runtime_artifact`` writes a candidate; the blocking parity check (numpy runtime vs torch on real
tiles) runs on it; only then does ``best_model`` promote it, and only when its val mIoU is not worse
than the current best. A failed parity check therefore never reaches the QGIS plugin's model.
"""

import json
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
from rasterio.windows import Window

from assets.datasets import dataset_header, processed_shards
from assets.evaluation import iou_evaluation
from assets.lineage import lineage_of_partitions, require_materialization
from assets.resources import ProjectPaths
from assets.training import trained_model
from runtime_export.export import export_artifact, input_rules_of, promote_if_better
from runtime_export.parity import runtime_parity
from runtime_export.runtime import META_FILENAME, MODEL_FILENAME, RUNTIME_VERSION
from training_core.datasets.rasters import read_item
from training_core.datasets.schema import HEADER_FILENAME, load_header
from training_core.shards import iter_split_items

EXPORT_GROUP = "export"
PARITY_KS = (2, 8, 16)
PARITY_TILES = 2
PARITY_TILE_SIZE = 256  # a crop keeps the check to seconds on big tiles


@dg.asset(
    deps=[trained_model, iou_evaluation],
    group_name=EXPORT_GROUP,
    kinds={"numpy"},
    description="The numpy runtime artifact of the latest trained model, with its metrics and lineage.",
)
def runtime_artifact(context: dg.AssetExecutionContext, paths: ProjectPaths) -> dg.MaterializeResult:
    training = require_materialization(context.instance, trained_model.key)
    evaluation = require_materialization(context.instance, iou_evaluation.key)
    summary = json.loads(Path(evaluation["metadata"]["summary_path"]).read_text())
    if summary["checkpoint"] != training["metadata"]["checkpoint_path"]:
        raise dg.Failure(
            f"iou_evaluation scored {summary['checkpoint']}, but the latest trained_model is "
            f"{training['metadata']['checkpoint_path']}: materialize iou_evaluation again first"
        )
    lineage = artifact_lineage(context.instance, training, evaluation, summary, context.run.run_id)
    out_dir = export_artifact(
        training["metadata"]["checkpoint_path"],
        paths.candidate_dir(context.run.run_id),
        lineage,
        summary["metrics"],
        input_rules_of(paths.processed_root, lineage["datasets"]),
    )
    meta = json.loads((out_dir / META_FILENAME).read_text())
    context.log.info(f"exported {out_dir} (val mIoU {summary['metrics'].get('val_miou')})")
    return dg.MaterializeResult(
        metadata={
            "artifact_dir": dg.MetadataValue.path(str(out_dir)),
            "checkpoint_path": dg.MetadataValue.path(training["metadata"]["checkpoint_path"]),
            "runtime_version": RUNTIME_VERSION,
            "model_bytes": (out_dir / MODEL_FILENAME).stat().st_size,
            "val_miou": summary["metrics"].get("val_miou"),
            "baseline_val_miou": summary["metrics"].get("baseline_val_miou"),
            "datasets": lineage["datasets"],
            "data_versions": lineage["data_versions"],
            "config_hash": meta["lineage"]["config_hash"],
            "code_version": meta["lineage"]["code_version"],
            "training_run_id": lineage["runs"]["training"],
            "evaluation_run_id": lineage["runs"]["evaluation"],
            "lineage": lineage,
            "evaluation_picture": dg.MetadataValue.md(evaluation["metadata"]["comparison"]),
            "meta_json": dg.MetadataValue.md(f"```json\n{json.dumps(meta, indent=2, sort_keys=True)}\n```"),
        }
    )


@dg.asset(
    deps=[runtime_artifact],
    group_name=EXPORT_GROUP,
    kinds={"numpy"},
    description="`model/best`: the artifact the plugin ships, replaced only by one whose val mIoU is not worse.",
)
def best_model(context: dg.AssetExecutionContext, paths: ProjectPaths) -> dg.MaterializeResult:
    candidate = require_materialization(context.instance, runtime_artifact.key)
    candidate_dir = Path(candidate["metadata"]["artifact_dir"])
    promoted = promote_if_better(candidate_dir, paths.best_dir())
    best_meta = json.loads((paths.best_dir() / META_FILENAME).read_text())
    context.log.info(f"{candidate_dir} {'promoted to' if promoted else 'not better than'} {paths.best_dir()}")
    return dg.MaterializeResult(
        metadata={
            "promoted": promoted,
            "best_dir": dg.MetadataValue.path(str(paths.best_dir())),
            "best_val_miou": best_meta["metrics"].get("val_miou"),
            "best_export_run_id": best_meta["lineage"]["runs"]["export"],
            "candidate_dir": dg.MetadataValue.path(str(candidate_dir)),
        }
    )


@dg.asset_check(asset=runtime_artifact, blocking=True)
def runtime_matches_torch(context: dg.AssetCheckExecutionContext, paths: ProjectPaths) -> dg.AssetCheckResult:
    """The numpy runtime reproduces the torch model on real sample tiles (the bounds of ``runtime_export.parity``)."""
    artifact = require_materialization(context.instance, runtime_artifact.key)["metadata"]
    datasets = artifact["datasets"]
    tiles = parity_tiles(paths.processed_root, datasets)
    report = runtime_parity(artifact["artifact_dir"], artifact["checkpoint_path"], tiles, PARITY_KS)
    return dg.AssetCheckResult(
        passed=bool(report["passed"]),
        description=(
            f"label agreement {report['min_label_agreement']:.5f}, max prob diff {report['max_prob_diff']:.2e} "
            f"on {report['n_tiles']} tiles"
        ),
        metadata={
            "min_label_agreement": report["min_label_agreement"],
            "max_prob_diff": report["max_prob_diff"],
            "per_k": report["per_k"],
            "thresholds": report["thresholds"],
        },
    )


def parity_tiles(processed_root: str, dataset_ids: list[str]) -> list[np.ndarray]:
    """Up to ``PARITY_TILES`` model-pixel tiles (cropped to ``PARITY_TILE_SIZE``) from the datasets' shards,
    read under each dataset's pixel rule as training and segmentation read them."""

    def crop(height: int, width: int) -> Window:
        return Window(0, 0, min(width, PARITY_TILE_SIZE), min(height, PARITY_TILE_SIZE))

    tiles: list[np.ndarray] = []
    for dataset_id in sorted(dataset_ids):
        rule = load_header(Path(processed_root) / dataset_id / HEADER_FILENAME).pixel_rule
        for split in ("val", "metrics_train", "train"):
            for shard_dir, entry in iter_split_items(processed_root, dataset_id, split):
                tiles.append(read_item(shard_dir / entry.input, None, rule, crop).image)
                if len(tiles) == PARITY_TILES:
                    return tiles
    if not tiles:
        raise dg.Failure(f"no tile in the shards of {dataset_ids} under {processed_root} to test parity on")
    return tiles


def artifact_lineage(
    instance: dg.DagsterInstance,
    training: dict[str, Any],
    evaluation: dict[str, Any],
    summary: dict[str, Any],
    export_run_id: str,
) -> dict[str, Any]:
    """What produced the artifact: datasets and their data versions, and the run of every upstream stage."""
    trained_on = list(training["metadata"]["datasets"])
    evaluated_on = list(summary["datasets"])
    datasets = sorted({*trained_on, *evaluated_on})
    shards = lineage_of_partitions(instance, processed_shards.key, datasets)
    headers = lineage_of_partitions(instance, dataset_header.key, datasets)
    return {
        "datasets": datasets,
        "trained_on": trained_on,
        "evaluated_on": evaluated_on,
        # Content hashes of the raw datasets (= raw_dataset's data version) the shards were built from.
        "data_versions": {**summary["data_versions"], **training["metadata"]["data_versions"]},
        "training_key": training["metadata"]["training_key"],
        "runs": {
            "export": export_run_id,
            "evaluation": evaluation["run_id"],
            "training": training["run_id"],
            "shards": {dataset_id: (found or {}).get("run_id") for dataset_id, found in shards.items()},
            "header": {dataset_id: (found or {}).get("run_id") for dataset_id, found in headers.items()},
        },
        "asset_data_versions": {
            "dataset_header": {dataset_id: (found or {}).get("data_version") for dataset_id, found in headers.items()},
            "processed_shards": {dataset_id: (found or {}).get("data_version") for dataset_id, found in shards.items()},
            "trained_model": training["data_version"],
            "iou_evaluation": evaluation["data_version"],
        },
    }
