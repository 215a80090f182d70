"""Data-plane assets and their checks on real sample tiles, through a direct call and `materialize`."""

import json
from pathlib import Path

import dagster as dg

import assets.datasets
from assets import checks
from assets.datasets import dataset_header, processed_shards, raw_dataset
from assets.resources import ProjectPaths
from assets.training import trained_model
from training_core.datasets.discovery import dataset_content_hash
from training_core.datasets.scan import extract_header
from training_core.datasets.schema import HEADER_FILENAME, dump_header, header_from_dict, load_header
from training_core.shards.index import INDEX_FILENAME, shard_dirs
from training_core.shards.write import build_shards

DATA_PLANE_CHECKS = [
    checks.header_matches_files,
    checks.every_item_in_one_split,
    checks.split_counts_follow_rule,
    checks.index_paths_inside_shard,
    checks.tiles_intact_and_readable,
]


def test_dataset_header_called_directly_writes_the_header_and_its_yaml_metadata(
    resources: dict, instance: dg.DagsterInstance
) -> None:
    paths: ProjectPaths = resources["paths"]
    context = dg.build_asset_context(partition_key="quebec_buildings", instance=instance)
    materialization, result = dataset_header(context=context, paths=paths)
    header = load_header(paths.header_path("quebec_buildings"))
    assert header.dataset_id == "quebec_buildings"
    assert materialization.partition == "quebec_buildings"
    assert materialization.metadata["data_version"].value == dataset_content_hash(paths.dataset_dir("quebec_buildings"))
    assert "dataset_id: quebec_buildings" in materialization.metadata["header"].value
    assert materialization.metadata["ground_resolution_m"].value == [0.15, 0.3]
    nrcan = "MIT repository (NRCan/geo-deep-learning); imagery licence not stated upstream"
    assert materialization.metadata["licence"].value == header.licence == nrcan
    assert materialization.tags["dagster/code_version"] == "header-v0"
    assert isinstance(result, dg.MaterializeResult)


def test_header_and_shards_materialize_with_counts_metadata_and_passing_checks(
    resources: dict, instance: dg.DagsterInstance
) -> None:
    result = dg.materialize(
        [dataset_header, processed_shards, *DATA_PLANE_CHECKS],
        resources=resources,
        instance=instance,
        partition_key="quebec_buildings",
    )
    assert result.success
    (shards,) = result.asset_materializations_for_node("processed_shards")
    metadata = {key: value.value for key, value in shards.metadata.items()}
    # 2 labeled tiles: half-up(0.25 * 2) = 1 to metrics_train, the other to val, nothing unlabeled.
    assert (metadata["count_train"], metadata["count_metrics_train"], metadata["count_val"]) == (0, 1, 1)
    assert metadata["crs"] and metadata["bytes_written"] > 0 and metadata["label_values"]
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == len(DATA_PLANE_CHECKS)
    assert all(evaluation.passed for evaluation in evaluations)


def test_observation_registers_new_folders_as_partitions_with_content_hash_versions(
    resources: dict, extracted_root: Path
) -> None:
    observe = dg.define_asset_job("observe", selection=[raw_dataset])
    job = dg.Definitions(assets=[raw_dataset], jobs=[observe], resources=resources).resolve_job_def("observe")
    with dg.instance_for_test() as instance:
        assert job.execute_in_process(instance=instance).success
        assert sorted(instance.get_dynamic_partitions("datasets")) == ["quebec_buildings", "unlabeled_scenes"]
        record = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=raw_dataset.key, asset_partitions=["quebec_buildings"]), limit=1
        ).records[0]
        observed = record.asset_observation.tags["dagster/data_version"]
        assert observed == dataset_content_hash(extracted_root / "quebec_buildings")


RANGE = {
    "dagster/asset_partition_range_start": "quebec_buildings",
    "dagster/asset_partition_range_end": "unlabeled_scenes",
}


def test_a_ranged_run_records_each_dataset_once_with_its_own_metadata_and_checks(
    resources: dict, instance: dg.DagsterInstance
) -> None:
    result = dg.materialize(
        [dataset_header, processed_shards, *DATA_PLANE_CHECKS], resources=resources, instance=instance, tags=RANGE
    )
    assert result.success
    paths: ProjectPaths = resources["paths"]
    for node in ("dataset_header", "processed_shards"):
        events = {m.partition: m for m in result.asset_materializations_for_node(node)}
        assert len(events) == len(result.asset_materializations_for_node(node)) == 2  # one event per dataset
        for dataset_id, event in events.items():
            assert not any("/" in key for key in event.metadata)  # no `<dataset>/<key>` entries
            assert event.metadata["data_version"].value == dataset_content_hash(paths.dataset_dir(dataset_id))
        assert (
            events["quebec_buildings"].tags["dagster/data_version"]
            != events["unlabeled_scenes"].tags["dagster/data_version"]
        )
    shards = {m.partition: m.metadata for m in result.asset_materializations_for_node("processed_shards")}
    assert (shards["quebec_buildings"]["count_train"].value, shards["unlabeled_scenes"]["count_train"].value) == (0, 3)

    evaluations = result.get_asset_check_evaluations()
    assert sorted((e.check_name, e.partition) for e in evaluations) == sorted(
        (spec.name, dataset_id)
        for check in DATA_PLANE_CHECKS
        for spec in check.check_specs
        for dataset_id in ("quebec_buildings", "unlabeled_scenes")
    )
    assert all(e.passed for e in evaluations)


def test_a_ranged_run_fails_a_check_only_for_the_dataset_with_the_problem(
    resources: dict, instance: dg.DagsterInstance, monkeypatch
) -> None:
    """quebec's shards lose an item, unlabeled_scenes' are sound: the check's status per dataset says so, in the
    run's results and in the instance's check records the UI lists."""

    def lose_quebec_val(*args, **kwargs):
        report = build_shards(*args, **kwargs)
        if args[2] == "quebec_buildings":
            (shard_dir,) = shard_dirs(args[1], args[2], "val")
            (shard_dir / INDEX_FILENAME).write_text("")
        return report

    monkeypatch.setattr(assets.datasets, "build_shards", lose_quebec_val)
    result = dg.materialize(
        [dataset_header, processed_shards, checks.every_item_in_one_split],
        resources=resources,
        instance=instance,
        tags=RANGE,
        raise_on_error=False,
    )
    assert not result.success  # a blocking check failed
    outcome = {e.partition: e.passed for e in result.get_asset_check_evaluations()}
    assert outcome == {"quebec_buildings": False, "unlabeled_scenes": True}
    check_key = dg.AssetCheckKey(processed_shards.key, "every_item_in_one_split")
    stored = {
        info.partition_key: info.latest_execution_status.value
        for info in instance.event_log_storage.get_asset_check_partition_info([check_key])
    }
    assert stored == {"quebec_buildings": "FAILED", "unlabeled_scenes": "SUCCEEDED"}


def test_a_failed_blocking_check_stops_everything_downstream(
    resources: dict, instance: dg.DagsterInstance, monkeypatch
) -> None:
    """Shards that lose an item fail `every_item_in_one_split`; training must then not run."""

    def build_and_lose_one_item(*args, **kwargs):
        report = build_shards(*args, **kwargs)
        (shard_dir,) = shard_dirs(kwargs.get("processed_root", args[1]), args[2], "val")
        (shard_dir / INDEX_FILENAME).write_text("")
        return report

    monkeypatch.setattr(assets.datasets, "build_shards", build_and_lose_one_item)
    result = dg.materialize(
        [dataset_header, processed_shards, trained_model, *DATA_PLANE_CHECKS],
        resources=resources,
        instance=instance,
        partition_key="quebec_buildings",
        raise_on_error=False,
    )
    assert not result.success
    failed = {e.check_name: e for e in result.get_asset_check_evaluations() if not e.passed}
    assert "every_item_in_one_split" in failed
    assert "in no split" in failed["every_item_in_one_split"].metadata["problems"].value
    assert not result.asset_materializations_for_node("trained_model")
    skipped = [e for e in result.all_events if e.event_type_value == "STEP_SKIPPED" or e.is_step_skipped]
    assert any(event.step_key == "trained_model" for event in skipped) or not any(
        e.step_key == "trained_model" and e.is_step_start for e in result.all_events
    )


def test_processed_shards_manifest_records_the_raw_content_hash(resources: dict, instance: dg.DagsterInstance) -> None:
    dg.materialize(
        [dataset_header, processed_shards], resources=resources, instance=instance, partition_key="unlabeled_scenes"
    )
    paths: ProjectPaths = resources["paths"]
    manifest = json.loads((Path(paths.processed_root) / "unlabeled_scenes" / "manifest.json").read_text())
    assert manifest["data_version"] == dataset_content_hash(paths.dataset_dir("unlabeled_scenes"))


def commit_chip_size(dataset_dir: Path, chip_size: int) -> None:
    """Commit the dataset's extracted header with ``sharding.chip_size`` set."""
    data = extract_header(dataset_dir).model_dump()
    data["sharding"]["chip_size"] = chip_size
    dump_header(header_from_dict(data, dataset_dir), dataset_dir / HEADER_FILENAME)


def test_chipped_shards_materialize_with_tiles_metadata_and_passing_checks(
    resources: dict, instance: dg.DagsterInstance, extracted_root: Path
) -> None:
    """quebec's two 512x512 tiles at chip 256: 4 chips each, counted by source in the split counts."""
    commit_chip_size(extracted_root / "quebec_buildings", 256)
    result = dg.materialize(
        [dataset_header, processed_shards, *DATA_PLANE_CHECKS],
        resources=resources,
        instance=instance,
        partition_key="quebec_buildings",
    )
    assert result.success
    (shards,) = result.asset_materializations_for_node("processed_shards")
    metadata = {key: value.value for key, value in shards.metadata.items()}
    assert (metadata["count_train"], metadata["count_metrics_train"], metadata["count_val"]) == (0, 1, 1)
    assert (metadata["tiles"], metadata["n_items"]) == (8, 2)
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == len(DATA_PLANE_CHECKS) and all(evaluation.passed for evaluation in evaluations)


def test_checks_follow_chips_to_their_source(
    resources: dict, instance: dg.DagsterInstance, extracted_root: Path, monkeypatch
) -> None:
    """The val source loses its right column of chips (its bounding box still tiles exactly: only the source's
    size shows the loss) and one chip moves to metrics_train: the checks name the source."""
    commit_chip_size(extracted_root / "quebec_buildings", 256)
    cut: dict[str, str] = {}

    def build_and_cut_chips(*args, **kwargs):
        report = build_shards(*args, **kwargs)
        processed_root, dataset_id = args[1], args[2]
        (val,) = shard_dirs(processed_root, dataset_id, "val")
        (metrics,) = shard_dirs(processed_root, dataset_id, "metrics_train")
        lines = [json.loads(line) for line in (val / INDEX_FILENAME).read_text().splitlines()]
        kept = [line for line in lines if not line["item_id"].endswith("_c256")]
        moved = kept.pop(0) | {"split": "metrics_train"}
        cut["source"] = moved["source_item"]
        (val / INDEX_FILENAME).write_text("".join(json.dumps(line) + "\n" for line in kept))
        with (metrics / INDEX_FILENAME).open("a") as index:
            index.write(json.dumps(moved) + "\n")
        return report

    monkeypatch.setattr(assets.datasets, "build_shards", build_and_cut_chips)
    result = dg.materialize(
        [dataset_header, processed_shards, *DATA_PLANE_CHECKS],
        resources=resources,
        instance=instance,
        partition_key="quebec_buildings",
        raise_on_error=False,
    )
    failed = {e.check_name: e.metadata["problems"].value for e in result.get_asset_check_evaluations() if not e.passed}
    source = cut["source"]
    assert f"{source}: in ['metrics_train', 'val'], the rule says 'val'" in failed["split_counts_follow_rule"]
    in_one_split = failed["every_item_in_one_split"]
    assert f"{source}: its chips are in splits ['metrics_train', 'val']" in in_one_split
    assert f"{source}: pixel (row 0, col 256) is in no chip of the 512x512 raster" in in_one_split
    assert "tiles_intact_and_readable" in failed  # the moved chip's tiles are not in the metrics_train shard
