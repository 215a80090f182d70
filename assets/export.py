"""Export assets: the numpy runtime artifact (``model.npz`` + ``meta.json``) and its promotion to ``best``.

``runtime_artifact`` writes a candidate; the blocking parity check (numpy runtime vs torch on real
tiles) runs on it; only then does ``best_model`` promote it, and only when its val mIoU is not worse
than the current best. A failed parity check therefore never reaches the QGIS plugin's model.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np

from assets.datasets import dataset_header, processed_shards
from assets.evaluation import iou_evaluation
from assets.lineage import (
    EvaluationRecord,
    TrainingRecord,
    content_version,
    file_sha256,
    latest_artifact,
    latest_evaluation,
    latest_training,
    partition_records,
)
from assets.resources import ProjectPaths
from assets.training import trained_model
from runtime_export.artifact import promote_if_better
from runtime_export.numpy_runtime.runtime import META_FILENAME, MODEL_FILENAME, RUNTIME_VERSION
from training_core.export import PARITY_KS, export_artifact
from training_core.export_datasets import input_rules_of, parity_tiles, training_data_of
from training_core.parity import runtime_parity

EXPORT_GROUP = "export"


@dg.asset(
    deps=[trained_model, iou_evaluation],
    group_name=EXPORT_GROUP,
    kinds={"numpy"},
    code_version=RUNTIME_VERSION,
    description="The numpy runtime artifact of the latest trained model, with its metrics and lineage. "
    "Data version: model.npz's arrays and meta.json without run ids and checkout.",
)
def runtime_artifact(context: dg.AssetExecutionContext, paths: ProjectPaths) -> dg.MaterializeResult:
    run_id = context.run.run_id
    training = latest_training(context.instance, run_id)
    evaluation = latest_evaluation(context.instance, run_id)
    # By content, read now: the file exported is the one evaluation scored, whatever either calls it.
    if file_sha256(training.checkpoint_path) != evaluation.checkpoint_sha256:
        raise dg.Failure(
            f"iou_evaluation scored {evaluation.checkpoint_path} (sha256 {evaluation.checkpoint_sha256[:12]}), but "
            f"the latest trained_model is {training.checkpoint_path} with other weights: "
            "materialize iou_evaluation again first"
        )
    summary = json.loads(Path(evaluation.summary_path).read_text())
    lineage = artifact_lineage(context.instance, training, evaluation, summary, run_id)
    out_dir = export_artifact(
        training.checkpoint_path,
        paths.candidate_dir(run_id),
        lineage,
        summary["metrics"],
        input_rules_of(paths.processed_root, lineage["datasets"]),
        training_data_of(paths.processed_root, lineage["datasets"]),
    )
    meta = json.loads((out_dir / META_FILENAME).read_text())
    context.log.info(f"exported {out_dir} (val mIoU {summary['metrics'].get('val_miou')})")
    return dg.MaterializeResult(
        metadata={
            "artifact_dir": dg.MetadataValue.path(str(out_dir)),
            "checkpoint_path": dg.MetadataValue.path(training.checkpoint_path),
            "checkpoint_sha256": training.checkpoint_sha256,
            "runtime_version": RUNTIME_VERSION,
            "model_bytes": (out_dir / MODEL_FILENAME).stat().st_size,
            "val_miou": summary["metrics"].get("val_miou"),
            "baseline_val_miou": summary["metrics"].get("baseline_val_miou"),
            "datasets": lineage["datasets"],
            "data_versions": lineage["data_versions"],
            "config_hash": meta["lineage"]["config_hash"],
            "code_version": meta["lineage"]["code_version"],
            "training_run": dg.MetadataValue.dagster_run(training.run_id),
            "evaluation_run": dg.MetadataValue.dagster_run(evaluation.run_id),
            "evaluation_summary": dg.MetadataValue.path(evaluation.summary_path),
            "lineage": lineage,
            "meta_json": dg.MetadataValue.path(str(out_dir / META_FILENAME)),
        },
        data_version=artifact_version(out_dir),
    )


@dg.asset(
    deps=[runtime_artifact],
    group_name=EXPORT_GROUP,
    kinds={"numpy"},
    code_version=RUNTIME_VERSION,
    description="`model/best`: the artifact the plugin ships, replaced only by one whose val mIoU is not worse. "
    "Data version: that of the artifact it holds.",
)
def best_model(context: dg.AssetExecutionContext, paths: ProjectPaths) -> dg.MaterializeResult:
    candidate_dir = Path(latest_artifact(context.instance, context.run.run_id).artifact_dir)
    promoted = promote_if_better(candidate_dir, paths.best_dir())
    best_meta = json.loads((paths.best_dir() / META_FILENAME).read_text())
    context.log.info(f"{candidate_dir} {'promoted to' if promoted else 'not better than'} {paths.best_dir()}")
    return dg.MaterializeResult(
        metadata={
            "promoted": promoted,
            "best_dir": dg.MetadataValue.path(str(paths.best_dir())),
            "best_val_miou": best_meta["metrics"].get("val_miou"),
            "best_export_run": dg.MetadataValue.dagster_run(best_meta["lineage"]["runs"]["export"]),
            "candidate_dir": dg.MetadataValue.path(str(candidate_dir)),
        },
        data_version=artifact_version(paths.best_dir()),
    )


@dg.asset_check(asset=runtime_artifact, blocking=True)
def runtime_matches_torch(context: dg.AssetCheckExecutionContext, paths: ProjectPaths) -> dg.AssetCheckResult:
    """The numpy runtime reproduces the torch model on real sample tiles (the bounds of ``training_core.parity``):
    the tiles and Ks the export CLI checks too (``training_core.export_datasets.parity_tiles``,
    ``training_core.export.PARITY_KS``)."""
    artifact = latest_artifact(context.instance, context.op_execution_context.run_id)
    tiles = parity_tiles(paths.processed_root, artifact.datasets)
    report = runtime_parity(artifact.artifact_dir, artifact.checkpoint_path, tiles, PARITY_KS)
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


def artifact_version(artifact_dir: Path) -> dg.DataVersion:
    """The arrays of ``model.npz`` (its zip entries carry write times) and ``meta.json`` without the run ids
    and the checkout's commit: exporting the same model from the same data gives the same version."""
    with np.load(artifact_dir / MODEL_FILENAME) as arrays:
        weights = {
            name: hashlib.sha256(np.ascontiguousarray(arrays[name]).tobytes()).hexdigest() for name in arrays.files
        }
    meta = json.loads((artifact_dir / META_FILENAME).read_text())
    meta["lineage"] = {key: value for key, value in meta["lineage"].items() if key not in ("runs", "code_version")}
    return content_version({"weights": weights, "meta": meta})


def artifact_lineage(
    instance: dg.DagsterInstance,
    training: TrainingRecord,
    evaluation: EvaluationRecord,
    summary: dict[str, Any],
    export_run_id: str,
) -> dict[str, Any]:
    """What produced the artifact: datasets and their data versions, and the run of every upstream stage."""
    trained_on = list(training.datasets)
    evaluated_on = list(summary["datasets"])
    datasets = sorted({*trained_on, *evaluated_on})
    records = {
        "shards": partition_records(instance, processed_shards.key, datasets),
        "header": partition_records(instance, dataset_header.key, datasets),
    }
    run_ids = {
        stage: {dataset_id: None if record is None else record.run_id for dataset_id, record in found.items()}
        for stage, found in records.items()
    }
    versions = {
        stage: {dataset_id: None if record is None else record.data_version for dataset_id, record in found.items()}
        for stage, found in records.items()
    }
    return {
        "datasets": datasets,
        "trained_on": trained_on,
        "evaluated_on": evaluated_on,
        # Content hashes of the raw datasets (= raw_dataset's data version) the shards were built from.
        "data_versions": {**summary["data_versions"], **training.data_versions},
        "training_key": training.training_key,
        "checkpoint_sha256": training.checkpoint_sha256,
        "runs": {
            "export": export_run_id,
            "evaluation": evaluation.run_id,
            "training": training.run_id,
            **run_ids,
        },
        "asset_data_versions": {
            "dataset_header": versions["header"],
            "processed_shards": versions["shards"],
            "trained_model": training.data_version,
            "iou_evaluation": evaluation.data_version,
        },
    }
