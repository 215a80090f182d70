"""Sensor and schedule: rebuild what a raw-data change makes stale, and nothing else.

Both compare content hashes (``dataset_content_hash``, the raw dataset's data version):
- the sensor against its cursor (the hashes it saw last tick), so it reacts to new and edited folders;
- the schedule against the hash stored in each dataset's shard manifest, i.e. the data the current
  shards were really built from (also right after a manual or CLI build that Dagster did not see).
"""

import json

import dagster as dg

from assets.dagster_internals import data_version_tags
from assets.datasets import DATASETS, raw_dataset
from assets.resources import ProjectPaths
from pipeline.jobs import refresh_dataset
from runtime_export.errors import DatasetError
from training_core.datasets.discovery import dataset_content_hash, discover_datasets
from training_core.shards.index import read_manifest


@dg.sensor(job=refresh_dataset, minimum_interval_seconds=120, default_status=dg.DefaultSensorStatus.STOPPED)
def raw_dataset_sensor(context: dg.SensorEvaluationContext, paths: ProjectPaths) -> dg.SensorResult:
    """New dataset folder -> new partition + run; changed content hash -> run; unchanged -> nothing."""
    hashes = {
        dataset_id: dataset_content_hash(paths.dataset_dir(dataset_id))
        for dataset_id in discover_datasets(paths.extracted_root)
    }
    seen = json.loads(context.cursor) if context.cursor else {}
    registered = set(context.instance.get_dynamic_partitions(DATASETS.name))
    new_partitions = sorted(set(hashes) - registered)
    changed = sorted(dataset_id for dataset_id, digest in hashes.items() if seen.get(dataset_id) != digest)
    if changed:
        context.log.info(f"new or changed datasets: {changed}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(partition_key=dataset_id, run_key=f"{dataset_id}@{hashes[dataset_id]}")
            for dataset_id in changed
        ],
        dynamic_partitions_requests=[DATASETS.build_add_request(new_partitions)] if new_partitions else None,
        asset_events=[
            dg.AssetObservation(raw_dataset.key, partition=dataset_id, tags=data_version_tags(hashes[dataset_id]))
            for dataset_id in changed
        ],
        cursor=json.dumps(hashes, sort_keys=True),
    )


@dg.schedule(
    job=refresh_dataset,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
def nightly_shard_rebuild(
    context: dg.ScheduleEvaluationContext, paths: ProjectPaths
) -> list[dg.RunRequest] | dg.SkipReason:
    """Each night, rebuild the shards (and what depends on them) of datasets whose content hash changed."""
    requests = []
    for dataset_id in sorted(context.instance.get_dynamic_partitions(DATASETS.name)):
        dataset_dir = paths.dataset_dir(dataset_id)
        if not dataset_dir.is_dir():
            context.log.warning(f"{dataset_id}: {dataset_dir} is gone; nothing to rebuild")
            continue
        current = dataset_content_hash(dataset_dir)
        if current != built_data_version(paths.processed_root, dataset_id):
            requests.append(dg.RunRequest(partition_key=dataset_id, run_key=f"{dataset_id}@{current}"))
    return requests or dg.SkipReason("no dataset changed since its shards were built")


def built_data_version(processed_root: str, dataset_id: str) -> str | None:
    """The content hash the dataset's current shards were built from; None when there are no shards."""
    try:
        return read_manifest(processed_root, dataset_id)["data_version"]
    except (DatasetError, OSError):
        return None
