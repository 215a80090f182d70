"""Data versions come from content, per dataset, and Dagster's staleness follows them (a real SQLite instance):
an unchanged rebuild keeps every version, a changed file changes its own dataset's versions and stales only
what depends on that dataset."""

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from assets import checks, datasets, evaluation, export, training
from assets.datasets import dataset_header, processed_shards
from assets.lineage import file_sha256
from assets.resources import ProjectPaths, TrainingDevice
from pipeline.jobs import build_shards_job, observe_raw_datasets, train_cpu
from tests.assets.conftest import copy_datasets, make_paths
from tests.pipeline.test_automation import change_one_pixel
from training_core.shards.index import MANIFEST_FILENAME

DATASET_IDS = ["quebec_buildings", "unlabeled_scenes"]
RANGE = {"dagster/asset_partition_range_start": DATASET_IDS[0], "dagster/asset_partition_range_end": DATASET_IDS[-1]}
TINY = {"steps": 2, "checkpoint_every": 2, "model": {"embed_dim": 8, "max_k": 4}, "data": {"patch_size": 32}}
ASSETS = dg.load_assets_from_modules([datasets, training, evaluation, export])


@pytest.fixture
def paths(tmp_path: Path) -> ProjectPaths:
    return make_paths(tmp_path, copy_datasets(tmp_path / "extracted", DATASET_IDS))


@pytest.fixture
def defs(paths: ProjectPaths) -> dg.Definitions:
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=dg.load_asset_checks_from_modules([checks]),
        jobs=[observe_raw_datasets, build_shards_job, train_cpu],
        resources={"paths": paths, "training_device": TrainingDevice(device="cpu")},
    )


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


def run(defs: dg.Definitions, instance: dg.DagsterInstance, job: str, **kwargs: object) -> dg.ExecuteInProcessResult:
    result = defs.resolve_job_def(job).execute_in_process(instance=instance, **kwargs)
    assert result.success
    return result


def versions(result: dg.ExecuteInProcessResult, node: str) -> dict[str, str]:
    """partition -> data version of what the run materialized."""
    return {m.partition: m.tags["dagster/data_version"] for m in result.asset_materializations_for_node(node)}


def stale(instance: dg.DagsterInstance) -> set[tuple[str, str | None]]:
    """(asset, partition) of everything Dagster calls stale now."""
    resolver = get_stale_status_resolver(instance, ASSETS)
    keys = [(dataset_header.key, p) for p in DATASET_IDS] + [(processed_shards.key, p) for p in DATASET_IDS]
    keys.append((training.trained_model.key, None))
    return {
        (key.to_user_string(), partition)
        for key, partition in keys
        if resolver.get_status(key, partition) == StaleStatus.STALE
    }


def test_an_unchanged_rebuild_keeps_every_data_version(
    defs: dg.Definitions, instance: dg.DagsterInstance, paths: ProjectPaths
) -> None:
    run(defs, instance, "observe_raw_datasets")
    first = run(defs, instance, "build_shards", tags=RANGE)
    second = run(defs, instance, "build_shards", tags=RANGE)

    for node in ("dataset_header", "processed_shards"):
        assert versions(first, node) == versions(second, node)
        assert len(set(versions(first, node).values())) == len(DATASET_IDS)  # one version per dataset
    for dataset_id, version in versions(second, "processed_shards").items():
        assert version == file_sha256(Path(paths.processed_root) / dataset_id / MANIFEST_FILENAME)
    assert first.run_id != second.run_id and not stale(instance)


def test_a_changed_file_changes_only_its_dataset_and_stales_only_what_depends_on_it(
    defs: dg.Definitions, instance: dg.DagsterInstance, paths: ProjectPaths
) -> None:
    run(defs, instance, "observe_raw_datasets")
    before = run(defs, instance, "build_shards", tags=RANGE)
    trained = run(defs, instance, "train_cpu", run_config={"ops": {"trained_model": {"config": TINY}}})
    run(defs, instance, "build_shards", tags=RANGE)  # unchanged: the training stays fresh
    assert not stale(instance)
    (model,) = trained.asset_materializations_for_node("trained_model")
    assert model.tags["dagster/code_version"] == "train-v1" and model.tags["dagster/data_version"]

    change_one_pixel(paths.dataset_dir("quebec_buildings"))
    run(defs, instance, "observe_raw_datasets")
    assert stale(instance) == {("dataset_header", "quebec_buildings")}

    after = run(defs, instance, "build_shards", tags=RANGE)
    for node in ("dataset_header", "processed_shards"):
        old, new = versions(before, node), versions(after, node)
        assert new["quebec_buildings"] != old["quebec_buildings"]
        assert new["unlabeled_scenes"] == old["unlabeled_scenes"]
    assert stale(instance) == {("trained_model", None)}
    causes = get_stale_status_resolver(instance, ASSETS).get_stale_causes(training.trained_model.key)
    assert {(cause.dependency.asset_key, cause.dependency.partition_key) for cause in causes} == {
        (processed_shards.key, "quebec_buildings")
    }
