"""Lineage: the data versions each stage records, and what a materialization came from, read back typed.

Data versions are derived from what a stage wrote (``content_version``, ``file_version``), so an unchanged
rebuild keeps its version and Dagster's staleness follows real changes, not run ids.

Partitioned assets and checks log one event per partition (``partition_materialization``,
``partition_check_evaluation``). Dagster 1.13 gives every partition of a ranged step the output's one data
version and metadata (dagster-io/dagster#34013) and files a check result without a partition; logging each
dataset's own event, with the provenance tags Dagster writes for an output, gives each partition its own
version, metadata and check status.

Readers (``latest_training`` -> ``TrainingRecord`` ...) name what they read. Given a run id they prefer
what that run materialized, so two runs at once each read their own upstream, not whichever finished last.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from assets.dagster_internals import (
    EVENTS_ALREADY_LOGGED,
    check_target,
    provenance_tags,
    recorded_data_version,
)

TRAINED_MODEL = dg.AssetKey("trained_model")
IOU_EVALUATION = dg.AssetKey("iou_evaluation")
RUNTIME_ARTIFACT = dg.AssetKey("runtime_artifact")


# -- data versions -------------------------------------------------------------------------------


def content_version(content: Any) -> dg.DataVersion:
    """sha256 of the canonical JSON of ``content``: the same content, the same version."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return dg.DataVersion(hashlib.sha256(canonical.encode()).hexdigest())


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_version(path: str | Path) -> dg.DataVersion:
    """The sha256 of a file's bytes (e.g. ``sha256sum manifest.json``)."""
    return dg.DataVersion(file_sha256(path))


# -- per-partition events ------------------------------------------------------------------------


def partition_materialization(
    context: dg.AssetExecutionContext, partition: str, data_version: dg.DataVersion, metadata: Mapping[str, Any]
) -> dg.AssetMaterialization:
    """One partition's materialization with the provenance tags Dagster writes for an output: the asset's
    code version, and each dependency's data version and event pointer (what staleness compares)."""
    key = context.asset_key
    code_version = context.assets_def.code_versions_by_key[key] or context.run.run_id
    dependencies = list(context.assets_def.asset_deps[key])
    tags = provenance_tags(context.instance, code_version, data_version, dependencies, partition)
    return dg.AssetMaterialization(asset_key=key, partition=partition, metadata=metadata, tags=tags)


def partitions_logged() -> dg.MaterializeResult:
    """A partitioned asset's result once ``partition_materialization`` logged every partition.

    Its metadata keeps the step from logging one more materialization per partition for the output
    (``dagster_internals.EVENTS_ALREADY_LOGGED``).
    """
    return dg.MaterializeResult(metadata=EVENTS_ALREADY_LOGGED)


def partition_check_evaluation(
    context: dg.AssetCheckExecutionContext,
    partition: str,
    passed: bool,
    description: str | None,
    metadata: Mapping[str, Any],
) -> dg.AssetCheckEvaluation:
    """One partition's result of the (single) check being executed, tied to that partition's materialization."""
    (spec,) = context.check_specs
    record = _newest(context.instance, spec.asset_key, partition=partition)
    return dg.AssetCheckEvaluation(
        asset_key=spec.asset_key,
        check_name=spec.name,
        passed=passed,
        partition=partition,
        blocking=spec.blocking,
        description=description,
        metadata=metadata,
        target_materialization_data=check_target(record),
    )


# -- typed readers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionRecord:
    """The newest materialization of one partition: which run made it, at which data version."""

    run_id: str
    data_version: str | None


@dataclass(frozen=True)
class TrainingRecord:
    """A ``trained_model`` materialization. ``data_versions``: raw content hash of each dataset trained on."""

    run_id: str
    data_version: str | None
    checkpoint_path: str
    checkpoint_sha256: str
    training_key: str
    datasets: list[str]
    data_versions: dict[str, str]


@dataclass(frozen=True)
class EvaluationRecord:
    """An ``iou_evaluation`` materialization: the summary JSON and the checkpoint it scored."""

    run_id: str
    data_version: str | None
    summary_path: str
    checkpoint_path: str
    checkpoint_sha256: str
    val_miou: float | None
    baseline_val_miou: float | None
    model_beats_baseline: bool | None
    model_minus_baseline: float | None  # None also in materializations from before the decision margin
    decision_margin: float | None


@dataclass(frozen=True)
class ArtifactRecord:
    """A ``runtime_artifact`` materialization: the candidate artifact and the checkpoint it was exported from."""

    run_id: str
    data_version: str | None
    artifact_dir: str
    checkpoint_path: str
    datasets: list[str]


def latest_training(instance: dg.DagsterInstance, run_id: str | None = None) -> TrainingRecord:
    record, metadata = _required(instance, TRAINED_MODEL, run_id)
    return TrainingRecord(
        run_id=record.run_id,
        data_version=recorded_data_version(record),
        checkpoint_path=metadata["checkpoint_path"],
        checkpoint_sha256=metadata["checkpoint_sha256"],
        training_key=metadata["training_key"],
        datasets=list(metadata["datasets"]),
        data_versions=dict(metadata["data_versions"]),
    )


def latest_evaluation(instance: dg.DagsterInstance, run_id: str | None = None) -> EvaluationRecord:
    record, metadata = _required(instance, IOU_EVALUATION, run_id)
    return EvaluationRecord(
        run_id=record.run_id,
        data_version=recorded_data_version(record),
        summary_path=metadata["summary_path"],
        checkpoint_path=metadata["checkpoint_path"],
        checkpoint_sha256=metadata["checkpoint_sha256"],
        val_miou=metadata["val_miou"],
        baseline_val_miou=metadata["baseline_val_miou"],
        model_beats_baseline=metadata["model_beats_baseline"],
        model_minus_baseline=metadata.get("model_minus_baseline"),
        decision_margin=metadata.get("decision_margin"),
    )


def latest_artifact(instance: dg.DagsterInstance, run_id: str | None = None) -> ArtifactRecord:
    record, metadata = _required(instance, RUNTIME_ARTIFACT, run_id)
    return ArtifactRecord(
        run_id=record.run_id,
        data_version=recorded_data_version(record),
        artifact_dir=metadata["artifact_dir"],
        checkpoint_path=metadata["checkpoint_path"],
        datasets=list(metadata["datasets"]),
    )


def partition_records(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partitions: Sequence[str]
) -> dict[str, PartitionRecord | None]:
    """The newest materialization of each partition (None: never materialized), keyed by partition."""
    found: dict[str, PartitionRecord | None] = {}
    for partition in partitions:
        record = _newest(instance, asset_key, partition=partition)
        found[partition] = None if record is None else PartitionRecord(record.run_id, recorded_data_version(record))
    return found


def _newest(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, run_id: str | None = None, partition: str | None = None
) -> dg.EventLogRecord | None:
    """The newest materialization of ``asset_key`` (or of one partition); that of ``run_id`` if it made one."""
    if run_id is not None:
        in_run = instance.get_records_for_run(
            run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, ascending=False
        ).records
        for record in in_run:
            if record.asset_key == asset_key and (partition is None or record.partition_key == partition):
                return record
    records_filter = dg.AssetRecordsFilter(
        asset_key=asset_key, asset_partitions=[partition] if partition is not None else None
    )
    records = instance.fetch_materializations(records_filter, limit=1).records
    return records[0] if records else None


def _required(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, run_id: str | None
) -> tuple[dg.EventLogRecord, dict[str, Any]]:
    record = _newest(instance, asset_key, run_id)
    materialization = record.asset_materialization if record is not None else None
    if record is None or materialization is None:
        raise dg.Failure(f"{asset_key.to_user_string()} has never been materialized; materialize it first")
    return record, {key: value.value for key, value in materialization.metadata.items()}
