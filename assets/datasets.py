"""Data-plane assets: the raw dataset (observed), its header, and its processed shards.

All three are partitioned by dataset id (dynamic partitions, added by the sensor or by the
``observe_raw_datasets`` job). A run may cover one dataset or a range of them (the sample pipeline
builds every sample dataset in one run), so each asset loops over ``context.partition_keys`` and logs
each dataset's materialization, with its own data version and metadata, as soon as it is written
(``assets.lineage.partition_materialization``).
"""

import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from assets.lineage import content_version, file_version, partition_materialization, partitions_logged
from assets.resources import ProjectPaths, exclusive_lock
from training_core.datasets.discovery import dataset_content_hash, discover_datasets
from training_core.datasets.scan import extract_header
from training_core.datasets.schema import HEADER_VERSION, dump_header, header_hash, header_to_yaml
from training_core.shards.index import LAYOUT_VERSION
from training_core.shards.write import build_shards

DATASETS = dg.DynamicPartitionsDefinition(name="datasets")
DATA_PLANE_GROUP = "data_plane"
PartitionEvent = dg.AssetMaterialization | dg.MaterializeResult


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
    code_version=f"header-v{HEADER_VERSION}",
    description="The dataset header (YAML): modalities, pairing, split policy. A committed header is authoritative. "
    "Data version: the header's content with the content hash of the files it was validated against.",
)
def dataset_header(context: dg.AssetExecutionContext, paths: ProjectPaths) -> Iterator[PartitionEvent]:
    for dataset_id in context.partition_keys:
        started = time.perf_counter()
        header = extract_header(paths.dataset_dir(dataset_id), dataset_id)
        header_path = paths.header_path(dataset_id)
        header_path.parent.mkdir(parents=True, exist_ok=True)
        dump_header(header, header_path)
        raw_version = dataset_content_hash(paths.dataset_dir(dataset_id))
        context.log.info(f"{dataset_id}: header written to {header_path}")
        # The raw version is in the header's version because processed_shards depends on the header alone:
        # edited pixels under an unchanged header must still make the shards stale.
        version = content_version({"header": header_hash(header), "raw_data_version": raw_version})
        resolution = header.input.ground_resolution_m
        metadata = {
            "header_path": dg.MetadataValue.path(str(header_path)),
            "header_hash": header_hash(header),
            "data_version": raw_version,
            "modalities": [modality.name for modality in header.modalities],
            "pixel_rule": dg.MetadataValue.json({"dtype": header.input.dtype, **header.pixel_rule.to_dict()}),
            "label_values": sorted({v for modality in header.modalities for v in modality.label_values or []}),
            "crs": sorted({crs for modality in header.modalities for crs in modality.crs or []}),
            "ground_resolution_m": None if resolution is None else list(resolution),
            "licence": header.licence,
            "header": dg.MetadataValue.md(f"```yaml\n{header_to_yaml(header)}```"),
            "elapsed_s": round(time.perf_counter() - started, 3),
        }
        yield partition_materialization(context, dataset_id, version, metadata)
    yield partitions_logged()


@dg.asset(
    partitions_def=DATASETS,
    deps=[dataset_header],
    group_name=DATA_PLANE_GROUP,
    kinds={"geotiff"},
    code_version=f"layout-v{LAYOUT_VERSION}",
    description="Deterministic train | metrics_train | val split written as uncompressed GeoTIFF shards. "
    "Data version: sha256 of the build's manifest.json (no timestamps: a rebuild of the same data keeps it).",
)
def processed_shards(context: dg.AssetExecutionContext, paths: ProjectPaths) -> Iterator[PartitionEvent]:
    for dataset_id in context.partition_keys:
        # Builds of one dataset must not overlap (training_core.shards); two runs at once take turns.
        with exclusive_lock(Path(paths.processed_root) / dataset_id):
            report = build_shards(
                paths.extracted_root,
                paths.processed_root,
                dataset_id,
                overwrite=True,
                header_path=paths.header_path(dataset_id),
            )
            version = shards_data_version(report.manifest_path)
        context.log.info(
            f"{dataset_id}: {report.n_items} items, splits {dict(report.counts)}, tiles {dict(report.tile_counts)}"
        )
        metadata = {
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
        yield partition_materialization(context, dataset_id, version, metadata)
    yield partitions_logged()


def shards_data_version(manifest_path: str | Path) -> dg.DataVersion:
    """``processed_shards``' data version of a build: the sha256 of its ``manifest.json``."""
    return file_version(manifest_path)
