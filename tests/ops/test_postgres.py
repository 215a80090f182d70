"""Postgres instance storage: the shard build runs against a real PostgreSQL server and is read back from it.

The instance is deploy/postgres/dagster.yaml itself, pointed at a throw-away server through its
DAGSTER_PG_* variables, so the file users deploy is the file under test.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg2
import pytest
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from tests.ops.conftest import REPO_ROOT, PostgresServer
from training_core.datasets.discovery import dataset_content_hash

DATASET_ID = "kampala_buildings"
SAMPLE_EXTRACTED_ROOT = REPO_ROOT / "sample_data" / "extracted"
# kampala_buildings: 48 tiles, 16 with masks -> 32 unlabeled (train), 16 labeled split 4 / 12.
EXPECTED_COUNTS = {"count_train": 32, "count_metrics_train": 4, "count_val": 12}

pytestmark = [pytest.mark.system, pytest.mark.slow]


@pytest.fixture
def postgres_instance(
    postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dg.DagsterInstance]:
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO_ROOT / "deploy" / "postgres" / "dagster.yaml", dagster_home / "dagster.yaml")
    for name, value in postgres_server.env().items():
        monkeypatch.setenv(name, value)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        yield instance


def shard_build_definitions(work_root: Path) -> dg.Definitions:
    """The code location's assets and `build_shards` job, with paths under a temporary work root."""
    from pipeline.definitions import defs, paths_under
    from pipeline.jobs import build_shards_job

    return dg.Definitions(
        assets=defs.assets,
        asset_checks=defs.asset_checks,
        jobs=[build_shards_job],
        resources={**defs.resources, "paths": paths_under(str(SAMPLE_EXTRACTED_ROOT), str(work_root))},
    )


def test_instance_from_deploy_yaml_stores_everything_in_postgres(postgres_instance: dg.DagsterInstance) -> None:
    assert isinstance(postgres_instance.run_storage, PostgresRunStorage)
    assert isinstance(postgres_instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(postgres_instance.schedule_storage, PostgresScheduleStorage)


def test_shard_build_job_runs_on_postgres_and_materializations_read_back(
    postgres_instance: dg.DagsterInstance, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    from assets.datasets import DATASETS, processed_shards

    job = shard_build_definitions(tmp_path / "work").resolve_job_def("build_shards")
    postgres_instance.add_dynamic_partitions(DATASETS.name, [DATASET_ID])

    result = job.execute_in_process(instance=postgres_instance, partition_key=DATASET_ID)

    assert result.success
    # A second instance object opens new connections: what it reads came from the server, not memory.
    with dg.DagsterInstance.from_config(str(postgres_instance.root_directory)) as reader:
        run = reader.get_run_by_id(result.run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        records = reader.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=processed_shards.key, asset_partitions=[DATASET_ID]), limit=1
        ).records
        assert len(records) == 1 and records[0].run_id == result.run_id
        metadata = {key: value.value for key, value in records[0].asset_materialization.metadata.items()}
        assert {key: metadata[key] for key in EXPECTED_COUNTS} == EXPECTED_COUNTS
        assert metadata["n_items"] == 48
        assert metadata["data_version"] == dataset_content_hash(SAMPLE_EXTRACTED_ROOT / DATASET_ID)
        latest = reader.get_latest_materialization_event(processed_shards.key)
        assert latest is not None and latest.run_id == result.run_id
    assert _event_rows_in_postgres(postgres_server, result.run_id) > 0


def _event_rows_in_postgres(server: PostgresServer, run_id: str) -> int:
    """Count the run's event-log rows with plain SQL, independent of Dagster's storage classes."""
    connection = psycopg2.connect(
        host=server.host, port=server.port, user=server.username, password=server.password, dbname=server.db_name
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", (run_id,))
            return cursor.fetchone()[0]
    finally:
        connection.close()
