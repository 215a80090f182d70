"""The one place this project reaches into Dagster's private modules, and why.

Dagster 1.13 gives every partition of a ranged step the output's one data version and metadata
(dagster-io/dagster#34013), so the partitioned assets log one ``AssetMaterialization`` per dataset
themselves. For the UI's staleness to work on those events they must carry the provenance tags Dagster writes
for an output, and the step must not log a second event per partition; a check's per-partition result must
point at that partition's materialization. Dagster has no public API for any of these, so this module wraps
the private names behind four small functions; ``tests/assets/test_dagster_internals.py`` fails when an
installed Dagster changes what they rely on (tag names, the marker's effect, the check target).
"""

from __future__ import annotations

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    DEFAULT_DATA_VERSION,
    NULL_EVENT_POINTER,
    extract_data_version_from_entry,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)
from dagster._core.definitions.source_asset import SYSTEM_METADATA_KEY_SOURCE_ASSET_OBSERVATION

# Metadata that keeps a step from logging its own materialization per partition for the output: how Dagster's
# partitioned observable source assets, which log per-partition events the same way, do it
# (``execute_step._log_materialization_or_observation_events_for_asset``).
EVENTS_ALREADY_LOGGED = {SYSTEM_METADATA_KEY_SOURCE_ASSET_OBSERVATION: True}


def data_version_tags(data_version: str) -> dict[str, str]:
    """The tag an observation or materialization carries its data version in."""
    return {DATA_VERSION_TAG: data_version}


def provenance_tags(
    instance: dg.DagsterInstance,
    code_version: str,
    data_version: dg.DataVersion,
    dependencies: list[dg.AssetKey],
    partition: str,
) -> dict[str, str]:
    """The tags Dagster writes on an output's materialization: the asset's code version, its (user-provided)
    data version, and each dependency's data version and event pointer for ``partition`` (what staleness
    compares)."""
    tags = {
        CODE_VERSION_TAG: code_version,
        **data_version_tags(data_version.value),
        DATA_VERSION_IS_USER_PROVIDED_TAG: "true",
    }
    for dependency in sorted(dependencies):
        record = instance.get_latest_data_version_record(dependency, partition_key=partition)
        version = extract_data_version_from_entry(record.event_log_entry) if record else None
        tags[get_input_data_version_tag(dependency)] = (version or DEFAULT_DATA_VERSION).value
        tags[get_input_event_pointer_tag(dependency)] = str(record.storage_id) if record else NULL_EVENT_POINTER
    return tags


def recorded_data_version(record: dg.EventLogRecord) -> str | None:
    """The data version an event record carries (None: it carries none)."""
    version = extract_data_version_from_entry(record.event_log_entry)
    return None if version is None else version.value


def check_target(record: dg.EventLogRecord | None) -> AssetCheckEvaluationTargetMaterializationData | None:
    """What ties a check result to the materialization ``record`` (None: to none)."""
    if record is None:
        return None
    return AssetCheckEvaluationTargetMaterializationData(
        run_id=record.run_id, storage_id=record.storage_id, timestamp=record.timestamp
    )

