"""Lineage read back from the Dagster instance: which run produced the upstream asset, at which data version.

Downstream assets record this in their metadata and the exported ``meta.json``, so an artifact names
the evaluation, training, shards and header runs behind it even outside the Dagster UI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dagster as dg

DATA_VERSION_TAG = "dagster/data_version"


def latest_materialization(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None = None
) -> dict[str, Any] | None:
    """Run id, data version, time and metadata values of the newest materialization of ``asset_key``."""
    records_filter = dg.AssetRecordsFilter(
        asset_key=asset_key, asset_partitions=[partition] if partition is not None else None
    )
    records = instance.fetch_materializations(records_filter, limit=1).records
    if not records:
        return None
    record = records[0]
    materialization = record.asset_materialization
    tags = materialization.tags if materialization is not None and materialization.tags else {}
    metadata = {key: value.value for key, value in materialization.metadata.items()} if materialization else {}
    return {
        "run_id": record.run_id,
        "data_version": tags.get(DATA_VERSION_TAG),
        "timestamp": record.timestamp,
        "metadata": metadata,
    }


def require_materialization(instance: dg.DagsterInstance, asset_key: dg.AssetKey) -> dict[str, Any]:
    """``latest_materialization`` of an unpartitioned upstream asset, or a clear error naming it."""
    found = latest_materialization(instance, asset_key)
    if found is None:
        raise dg.Failure(f"{asset_key.to_user_string()} has never been materialized; materialize it first")
    return found


def lineage_of_partitions(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partitions: Sequence[str]
) -> dict[str, dict[str, Any] | None]:
    """Run id and data version of each partition's newest materialization, keyed by partition."""
    lineage: dict[str, dict[str, Any] | None] = {}
    for partition in partitions:
        found = latest_materialization(instance, asset_key, partition)
        lineage[partition] = (
            None if found is None else {"run_id": found["run_id"], "data_version": found["data_version"]}
        )
    return lineage
