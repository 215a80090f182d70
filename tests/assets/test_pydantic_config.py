"""The trained_model run config is TrainConfig itself: schema derived from it, values validated by it."""

import dagster as dg
import pytest
from pydantic import ValidationError

from assets.pydantic_config import config_schema_from_model
from assets.training import TRAIN_CONFIG_SCHEMA
from training_core.config import TrainConfig


def run_op_with(config: dict) -> TrainConfig:
    seen: list[TrainConfig] = []

    @dg.op(config_schema=TRAIN_CONFIG_SCHEMA)
    def probe(context: dg.OpExecutionContext) -> None:
        seen.append(TrainConfig.model_validate(context.op_config))

    @dg.job
    def probe_job() -> None:
        probe()

    probe_job.execute_in_process(run_config={"ops": {"probe": {"config": config}}})
    return seen[0]


def test_empty_run_config_gives_the_pydantic_defaults() -> None:
    assert run_op_with({}) == TrainConfig()


def test_nested_literal_optional_and_list_fields_round_trip() -> None:
    config = {
        "device": "cpu",
        "steps": 7,
        "cluster_iters": [1, 3],
        "data": {"source": "shards", "prefetch_factor": 2, "dataset_ids": ["a", "b"], "cache_mode": "lru"},
        "model": {"embed_dim": 8, "smoothing": "learned"},
    }
    assert run_op_with(config) == TrainConfig.model_validate(config)


def test_dagster_rejects_unknown_keys_and_literal_values_before_the_op_runs() -> None:
    with pytest.raises(dg.DagsterInvalidConfigError, match="not_a_field"):
        run_op_with({"not_a_field": 1})
    with pytest.raises(dg.DagsterInvalidConfigError, match="tpu"):
        run_op_with({"device": "tpu"})


def test_bounds_dagster_cannot_express_are_enforced_by_the_same_pydantic_model() -> None:
    with pytest.raises(ValidationError, match="steps"):
        run_op_with({"steps": 0})


def test_schema_carries_descriptions_and_defaults() -> None:
    schema = config_schema_from_model(TrainConfig)
    assert set(schema) == set(TrainConfig.model_fields)
    assert schema["lr"].default_value == pytest.approx(3e-4)
    assert "uniformly" in schema["k_min"].description
