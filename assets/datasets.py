"""Data-plane assets: the raw dataset (observed), its header, and its processed shards.

All three are partitioned by dataset id (dynamic partitions, added by the sensor or by the
``observe_raw_datasets`` job). A run may cover one dataset or a range of them (the sample pipeline
builds every sample dataset in one run), so each asset loops over ``context.partition_keys``.
In a ranged run Dagster records the same metadata on every partition of the range, so metadata keys
are prefixed by dataset id whenever a run covers more than one dataset.
"""

import time
from collections.abc import Mapping
from typing import Any

import dagster as dg

from assets.resources import ProjectPaths
from training_core.datasets.discovery import dataset_content_hash, discover_datasets
from training_core.datasets.scan import extract_header
from training_core.datasets.schema import dump_header, header_hash, header_to_yaml
from training_core.shards import build_shards

DATASETS = dg.DynamicPartitionsDefinition(name="datasets")
DATA_PLANE_GROUP = "data_plane"


@dg.observable_source_asset(
    partitions_def=DATASETS,
    group_name=DATA_PLANE_GROUP,
    description="A dataset folder of GeoTIFF tiles under the extracted root. Data version = content hash.",
)
def raw_dataset(context: dg.OpExecutionContext, paths: ProjectPaths) -> dg.DataVersionsByPartition:
    """Registers every dataset folder as a partition and records its content hash as the data version."""
    dataset_ids = discover_datasets(paths.extracted_root)
    known = set(context.instance.get_dynamic_partitions(DATASETS.name))
    new_ids = [dataset_id for dataset_id in dataset_ids if dataset_id not in known]
    if new_ids:
        context.instance.add_dynamic_partitions(DATASETS.name, new_ids)
        context.log.info(f"registered new dataset partitions: {new_ids}")
    versions = {dataset_id: dataset_content_hash(paths.dataset_dir(dataset_id)) for dataset_id in dataset_ids}
    return dg.DataVersionsByPartition({key: dg.DataVersion(value) for key, value in versions.items()})


@dg.asset(
    partitions_def=DATASETS,
    deps=[raw_dataset],
    group_name=DATA_PLANE_GROUP,
    kinds={"yaml"},
    description="The dataset header (YAML): modalities, pairing, split policy. A committed header is authoritative.",
)
def dataset_header(context: dg.AssetExecutionContext, paths: ProjectPaths) -> dg.MaterializeResult:
    per_dataset: dict[str, dict[str, Any]] = {}
    for dataset_id in context.partition_keys:
        started = time.perf_counter()
        header = extract_header(paths.dataset_dir(dataset_id), dataset_id)
        header_path = paths.header_path(dataset_id)
        header_path.parent.mkdir(parents=True, exist_ok=True)
        dump_header(header, header_path)
        per_dataset[dataset_id] = {
            "header_path": dg.MetadataValue.path(str(header_path)),
            "header_hash": header_hash(header),
            "data_version": dataset_content_hash(paths.dataset_dir(dataset_id)),
            "modalities": [modality.name for modality in header.modalities],
            "pixel_rule": dg.MetadataValue.json({"dtype": header.input.dtype, **header.pixel_rule.to_dict()}),
            "label_values": sorted({v for modality in header.modalities for v in modality.label_values or []}),
            "crs": sorted({crs for modality in header.modalities for crs in modality.crs or []}),
            "header": dg.MetadataValue.md(f"```yaml\n{header_to_yaml(header)}```"),
            "elapsed_s": round(time.perf_counter() - started, 3),
        }
        context.log.info(f"{dataset_id}: header written to {header_path}")
    return dg.MaterializeResult(metadata=partition_metadata(per_dataset))


@dg.asset(
    partitions_def=DATASETS,
    deps=[dataset_header],
    group_name=DATA_PLANE_GROUP,
    kinds={"geotiff"},
    description="Deterministic train | metrics_train | val split written as uncompressed GeoTIFF shards.",
)
def processed_shards(context: dg.AssetExecutionContext, paths: ProjectPaths) -> dg.MaterializeResult:
    per_dataset: dict[str, dict[str, Any]] = {}
    for dataset_id in context.partition_keys:
        report = build_shards(
            paths.extracted_root,
            paths.processed_root,
            dataset_id,
            overwrite=True,
            header_path=paths.header_path(dataset_id),
        )
        context.log.info(
            f"{dataset_id}: {report.n_items} items, splits {dict(report.counts)}, tiles {dict(report.tile_counts)}"
        )
        per_dataset[dataset_id] = {
            **{f"count_{split}": count for split, count in report.counts.items()},
            "tiles": sum(report.tile_counts.values()),  # items written: chips of large rasters, small ones whole
            "n_items": report.n_items,
            "label_values": list(report.label_values),
            "crs": list(report.crs),
            "bytes_written": report.bytes_written,
            "elapsed_s": round(report.elapsed_s, 3),
            "data_version": report.data_version,
            "header_hash": report.header_hash,
            "manifest": dg.MetadataValue.path(str(report.manifest_path)),
        }
    return dg.MaterializeResult(metadata=partition_metadata(per_dataset))


def partition_metadata(per_dataset: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Flat metadata for a one-dataset run; ``<dataset_id>/<key>`` entries when a run covers several."""
    if len(per_dataset) == 1:
        return dict(next(iter(per_dataset.values())))
    return {f"{dataset_id}/{key}": value for dataset_id, values in per_dataset.items() for key, value in values.items()}
