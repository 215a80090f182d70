"""What ``assets/dagster_internals.py`` relies on in Dagster's private modules, checked against the installed
Dagster: these fail first when an upgrade changes a tag name, the marker's effect or the check target."""

import dagster as dg

from assets.dagster_internals import (
    EVENTS_ALREADY_LOGGED,
    check_target,
    data_version_tags,
    provenance_tags,
    recorded_data_version,
)

PARTS = dg.StaticPartitionsDefinition(["a", "b"])


@dg.asset(code_version="up-1")
def upstream() -> dg.Output[None]:
    return dg.Output(None, data_version=dg.DataVersion("v-up"))


@dg.asset(deps=[upstream], code_version="down-1")
def downstream() -> dg.Output[None]:
    return dg.Output(None, data_version=dg.DataVersion("v-down"))


def newest(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None) -> dg.EventLogRecord:
    records_filter = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None)
    (record,) = instance.fetch_materializations(records_filter, limit=1).records
    return record


def test_provenance_tags_are_the_ones_dagster_writes_for_an_output() -> None:
    with dg.instance_for_test() as instance:
        assert dg.materialize([upstream, downstream], instance=instance).success
        written = newest(instance, downstream.key).asset_materialization.tags
        ours = provenance_tags(instance, "down-1", dg.DataVersion("v-down"), [upstream.key], partition=None)
        assert ours == {key: value for key, value in written.items() if key in ours}
        prefixes = ("dagster/code_version", "dagster/data_version", "dagster/input")
        provenance = {key for key in written if key.startswith(prefixes)}
        assert provenance == set(ours), written
        assert recorded_data_version(newest(instance, upstream.key)) == "v-up"
        assert data_version_tags("v-up").items() <= newest(instance, upstream.key).asset_materialization.tags.items()


def _logs_its_own(marker: bool) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=PARTS, name="logged_by_hand")
    def logged(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        context.log_event(
            dg.AssetMaterialization(
                asset_key=context.asset_key, partition=context.partition_key, tags=data_version_tags("mine")
            )
        )
        return dg.MaterializeResult(metadata=EVENTS_ALREADY_LOGGED if marker else {})

    return logged


def test_the_marker_keeps_the_step_from_logging_a_second_materialization() -> None:
    for marker, count in ((True, 1), (False, 2)):
        asset = _logs_its_own(marker)
        with dg.instance_for_test() as instance:
            assert dg.materialize([asset], instance=instance, partition_key="a").success
            records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset.key), limit=10).records
            assert [record.partition_key for record in records] == ["a"] * count, f"marker={marker}"
            assert "mine" in [recorded_data_version(record) for record in records]


def test_a_check_result_points_at_the_materialization_given() -> None:
    with dg.instance_for_test() as instance:
        assert dg.materialize([upstream], instance=instance).success
        record = newest(instance, upstream.key)
        evaluation = dg.AssetCheckEvaluation(
            asset_key=upstream.key, check_name="c", passed=True, target_materialization_data=check_target(record)
        )
        target = evaluation.target_materialization_data
        assert (target.run_id, target.storage_id) == (record.run_id, record.storage_id)
        assert check_target(None) is None
