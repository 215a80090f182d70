"""Sensor and schedule driven through their test contexts against a real (temporary SQLite) instance."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import rasterio

from assets import checks, datasets, evaluation, export, training
from assets.datasets import DATASETS
from assets.resources import ProjectPaths, TrainingDevice
from pipeline.automation import nightly_shard_rebuild, raw_dataset_sensor
from pipeline.jobs import refresh_dataset
from tests.assets.conftest import copy_datasets, make_paths
from training_core.shards.write import build_shards

DATASET_IDS = ["new_brunswick_landcover", "quebec_buildings"]


@pytest.fixture
def paths(tmp_path: Path) -> ProjectPaths:
    return make_paths(tmp_path, copy_datasets(tmp_path / "extracted", DATASET_IDS))


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


def change_one_pixel(dataset_dir: Path) -> Path:
    """Rewrite one input tile with one pixel changed (same size, CRS and transform)."""
    tile = sorted((dataset_dir / "images").glob("*.tif"))[0]
    with rasterio.open(tile) as src:
        profile, pixels = src.profile, src.read()
    pixels[:, 0, 0] = np.uint8(255) - pixels[:, 0, 0]
    with rasterio.open(tile, "w", **profile) as dst:
        dst.write(pixels)
    return tile


def sensor_tick(instance: dg.DagsterInstance, paths: ProjectPaths, cursor: str | None) -> dg.SensorResult:
    """One evaluation; partitions it asks for are added, as the daemon would."""
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"paths": paths}) as context:
        result = raw_dataset_sensor(context)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def requested(result: dg.SensorResult) -> list[str]:
    return sorted(request.partition_key for request in result.run_requests or [])


def test_sensor_runs_only_for_new_or_changed_datasets(instance: dg.DagsterInstance, paths: ProjectPaths) -> None:
    first = sensor_tick(instance, paths, cursor=None)
    assert requested(first) == DATASET_IDS
    assert sorted(instance.get_dynamic_partitions(DATASETS.name)) == DATASET_IDS
    assert {event.partition for event in first.asset_events} == set(DATASET_IDS)  # data versions observed

    unchanged = sensor_tick(instance, paths, cursor=first.cursor)
    assert requested(unchanged) == [] and not unchanged.dynamic_partitions_requests

    change_one_pixel(paths.dataset_dir("quebec_buildings"))
    changed = sensor_tick(instance, paths, cursor=unchanged.cursor)
    assert requested(changed) == ["quebec_buildings"]

    shutil.copytree(paths.dataset_dir("quebec_buildings"), paths.dataset_dir("quebec_copy"))
    added = sensor_tick(instance, paths, cursor=changed.cursor)
    assert requested(added) == ["quebec_copy"]
    assert "quebec_copy" in instance.get_dynamic_partitions(DATASETS.name)
    assert added.run_requests[0].run_key != changed.run_requests[0].run_key


def schedule_tick(instance: dg.DagsterInstance, paths: ProjectPaths) -> list[str]:
    with dg.build_schedule_context(instance=instance, resources={"paths": paths}) as context:
        result = nightly_shard_rebuild(context)
    if isinstance(result, dg.SkipReason):
        return []
    return sorted(request.partition_key for request in result)


def test_schedule_rebuilds_only_datasets_whose_data_version_changed(
    instance: dg.DagsterInstance, paths: ProjectPaths
) -> None:
    instance.add_dynamic_partitions(DATASETS.name, DATASET_IDS)
    assert schedule_tick(instance, paths) == DATASET_IDS  # nothing built yet
    for dataset_id in DATASET_IDS:
        build_shards(paths.extracted_root, paths.processed_root, dataset_id)
    assert schedule_tick(instance, paths) == []

    change_one_pixel(paths.dataset_dir("new_brunswick_landcover"))
    assert schedule_tick(instance, paths) == ["new_brunswick_landcover"]

    shutil.copytree(paths.dataset_dir("quebec_buildings"), paths.dataset_dir("quebec_copy"))
    instance.add_dynamic_partitions(DATASETS.name, ["quebec_copy"])  # what the sensor does for a new folder
    assert schedule_tick(instance, paths) == ["new_brunswick_landcover", "quebec_copy"]


def test_a_sensor_request_rebuilds_only_that_dataset_and_everything_downstream(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """Execute what the sensor asks for after a one-pixel change: that dataset's header and shards, then
    training, evaluation and export; the other datasets' shards are left alone."""
    dataset_ids = [*DATASET_IDS, "unlabeled_scenes"]
    paths = make_paths(tmp_path, copy_datasets(tmp_path / "extracted", dataset_ids))
    first = sensor_tick(instance, paths, cursor=None)
    for dataset_id in dataset_ids:
        build_shards(paths.extracted_root, paths.processed_root, dataset_id)
    change_one_pixel(paths.dataset_dir("quebec_buildings"))
    (request,) = sensor_tick(instance, paths, cursor=first.cursor).run_requests

    job = dg.Definitions(
        assets=dg.load_assets_from_modules([datasets, training, evaluation, export]),
        asset_checks=dg.load_asset_checks_from_modules([checks, evaluation, export]),
        jobs=[refresh_dataset],
        resources={"paths": paths, "training_device": TrainingDevice(device="cpu")},
    ).resolve_job_def(request.job_name or refresh_dataset.name)
    tiny = {"steps": 2, "model": {"embed_dim": 8, "max_k": 4}, "data": {"patch_size": 32}}
    result = job.execute_in_process(
        instance=instance, partition_key=request.partition_key, run_config={"ops": {"trained_model": {"config": tiny}}}
    )
    assert result.success
    materializations = [
        event.step_materialization_data.materialization for event in result.get_asset_materialization_events()
    ]
    rebuilt = {(m.asset_key.to_user_string(), m.partition) for m in materializations}
    assert rebuilt == {
        ("dataset_header", "quebec_buildings"),
        ("processed_shards", "quebec_buildings"),
        ("trained_model", None),
        ("iou_evaluation", None),
        ("runtime_artifact", None),
        ("best_model", None),
    }
