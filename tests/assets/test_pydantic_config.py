"""The trained_model run config is a dg.Config generated from TrainConfig; what the launchpad shows of it."""

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml

# The function the webserver answers the launchpad's `rootDefaultYaml` with ("Scaffold all default config").
from dagster._core.snap.snap_to_yaml import default_values_yaml_from_type_snap
from pydantic import BaseModel, ValidationError

from assets.training import TrainRunConfig, trained_model
from pipeline.definitions import defs
from pipeline.jobs import GPU_TRAINING
from training_core.config import TrainConfig

SAMPLE_RUN_YAML = Path(__file__).resolve().parents[2] / "pipeline" / "sample_run.yaml"


def run_op_with(config: dict) -> TrainConfig:
    """The op config as trained_model receives and converts it."""
    seen: list[TrainConfig] = []

    @dg.op
    def probe(config: TrainRunConfig) -> None:
        seen.append(TrainConfig.model_validate(config.model_dump()))

    @dg.job
    def probe_job() -> None:
        probe()

    probe_job.execute_in_process(run_config={"ops": {"probe": {"config": config}}})
    return seen[0]


def schema_fields(fields: dict[str, dg.Field], prefix: str = "") -> Iterator[tuple[str, dg.Field]]:
    """(dotted path, field) of every field of a Dagster config schema, nested sections included."""
    for name, field in fields.items():
        yield prefix + name, field
        if isinstance(field.config_type, dg.Shape):
            yield from schema_fields(field.config_type.fields, f"{prefix}{name}.")


def model_paths(model_cls: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, info in model_cls.model_fields.items():
        yield prefix + name
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from model_paths(info.annotation, f"{prefix}{name}.")


def launchpad_default(job_name: str) -> dict:
    """The run config "Scaffold all default config" merges into a job's launchpad (and a partitioned job opens with)."""
    snapshot = defs.resolve_job_def(job_name).get_job_snapshot()
    schema = snapshot.config_schema_snapshot
    root = schema.get_config_snap(snapshot.mode_def_snaps[0].root_config_key)
    return yaml.safe_load(default_values_yaml_from_type_snap(schema, root))


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
    with pytest.raises(ValidationError, match="patch_size"):
        run_op_with({"data": {"patch_size": 100}})  # not a multiple of 4 x each downsample factor


def test_trained_model_schema_has_every_field_with_its_default_and_a_one_line_description() -> None:
    fields = trained_model.op.config_schema.config_type.fields
    defaults = TrainConfig()
    assert fields["steps"].default_value == defaults.steps
    assert fields["batch_size"].default_value == defaults.batch_size
    assert fields["data"].config_type.fields["patch_size"].default_value == defaults.data.patch_size
    # A section's own default lists its fields: that is what the launchpad scaffolds.
    assert fields["data"].default_value["patch_size"] == defaults.data.patch_size
    described = dict(schema_fields(fields))
    assert set(described) == set(model_paths(TrainConfig))
    assert [path for path, field in described.items() if not field.description or "\n" in field.description] == []


@pytest.mark.parametrize(("job_name", "settings"), [("train_cpu", {"device": "cpu"}), ("train_gpu", GPU_TRAINING)])
def test_train_job_launchpad_opens_with_and_scaffolds_every_field_at_its_default(job_name: str, settings: dict) -> None:
    expected = TrainConfig.model_validate(settings).model_dump(mode="json", exclude_none=True)
    # The job's own config is the launchpad's starting text (its "default" preset) ...
    assert defs.resolve_job_def(job_name).run_config["ops"]["trained_model"]["config"] == expected
    # ... and "Scaffold all default config" writes it again, nested sections included.
    assert launchpad_default(job_name)["ops"]["trained_model"]["config"] == expected


def test_sample_run_yaml_is_the_sample_pipeline_launchpad_default() -> None:
    launchpad = launchpad_default("sample_pipeline")["ops"]
    assert yaml.safe_load(SAMPLE_RUN_YAML.read_text())["ops"] == launchpad, (
        f"{SAMPLE_RUN_YAML} disagrees with the sample_pipeline launchpad; its `ops` are:\n"
        + yaml.safe_dump(launchpad, sort_keys=False)
    )
