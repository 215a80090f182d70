"""trained_model through `materialize` with a tiny training config on real sample shards."""

from pathlib import Path

import dagster as dg
import pytest

from assets.datasets import dataset_header, processed_shards
from assets.lineage import file_sha256
from assets.resources import ProjectPaths, TrainingDevice
from assets.training import assignments_not_uniform, trained_model, training_config, training_key
from training_core.config import TrainConfig
from training_core.train import NOT_WEIGHT_SHAPING, config_differences

TINY = {
    "steps": 4,
    "log_every": 2,
    "checkpoint_every": 2,
    "model": {"embed_dim": 8, "max_k": 4},
    "data": {"patch_size": 32},
}


@pytest.fixture
def built(resources: dict, instance: dg.DagsterInstance) -> dict:
    """Shards of quebec_buildings (labeled only) and unlabeled_scenes (3 unlabeled tiles)."""
    for dataset_id in ("quebec_buildings", "unlabeled_scenes"):
        result = dg.materialize(
            [dataset_header, processed_shards], resources=resources, instance=instance, partition_key=dataset_id
        )
        assert result.success
    return resources


def test_trained_model_trains_on_unlabeled_shards_and_reports_progress_and_metadata(
    built: dict, instance: dg.DagsterInstance
) -> None:
    result = dg.materialize(
        [trained_model, processed_shards],
        selection=[trained_model],
        resources=built,
        instance=instance,
        run_config={"ops": {"trained_model": {"config": {**TINY, "device": "auto"}}}},
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("trained_model")
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    assert metadata["device"] == "cpu"  # `auto` resolved by the TrainingDevice resource
    assert metadata["steps"] == 4 and metadata["resumed_from_step"] == 0
    assert metadata["datasets"] == ["unlabeled_scenes"]  # quebec has no unlabeled `train` items
    assert Path(metadata["checkpoint_path"]).name == "step-000004.pt" and Path(metadata["checkpoint_path"]).is_file()
    assert metadata["checkpoint_sha256"] == file_sha256(metadata["checkpoint_path"])
    assert metadata["loss_curve"].startswith("![loss curve](data:image/png;base64,")
    assert set(metadata["final_losses"]) >= {"total", "consistency"}
    assert metadata["upstream"]["unlabeled_scenes"]["run_id"]
    progress = [e.message for e in instance.all_logs(result.run_id) if e.message and e.message.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/4", "4/4"]
    assert all("img/s" in line and "ETA" in line for line in progress)
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "assignments_not_uniform"
    assert check.metadata["pixel_entropy"].value == pytest.approx(metadata["final_losses"]["pixel_entropy"], abs=1e-6)
    assert check.passed == (metadata["final_losses"]["pixel_entropy"] < 0.99)


def test_uniform_assignments_warn_and_committed_ones_pass() -> None:
    uniform = assignments_not_uniform({"pixel_entropy": 0.9991, "total": -0.9})
    assert not uniform.passed and uniform.severity == dg.AssetCheckSeverity.WARN
    assert "0.999" in uniform.description
    assert assignments_not_uniform({"pixel_entropy": 0.52}).passed


def test_rematerializing_the_same_config_resumes_from_its_checkpoint(built: dict, instance: dg.DagsterInstance) -> None:
    run_config = {"ops": {"trained_model": {"config": {**TINY, "device": "cpu"}}}}
    first = dg.materialize(
        [trained_model, processed_shards],
        selection=[trained_model],
        resources=built,
        instance=instance,
        run_config=run_config,
    )
    second = dg.materialize(
        [trained_model, processed_shards],
        selection=[trained_model],
        resources=built,
        instance=instance,
        run_config=run_config,
    )
    (a,) = first.asset_materializations_for_node("trained_model")
    (b,) = second.asset_materializations_for_node("trained_model")
    assert b.metadata["resumed_from_step"].value == 4
    # The second run found the training done (resuming from last.pt): it names the same file, same weights.
    for key in ("checkpoint_path", "checkpoint_sha256"):
        assert a.metadata[key].value == b.metadata[key].value
    assert a.tags["dagster/data_version"] == b.tags["dagster/data_version"]
    assert a.tags["dagster/code_version"] == "train-v1"


def test_training_key_ignores_the_device_but_not_the_data(built: dict, instance: dg.DagsterInstance) -> None:
    paths: ProjectPaths = built["paths"]
    cpu = training_config(TrainConfig.model_validate({**TINY, "device": "cpu"}), instance, paths, TrainingDevice())
    gpu = cpu.model_copy(update={"device": "cuda", "compile": True})  # the compiled step trains the same run
    versions = {"unlabeled_scenes": "v1"}
    assert training_key(cpu, versions) == training_key(gpu, versions)
    assert training_key(cpu, versions) != training_key(cpu, {"unlabeled_scenes": "v2"})
    assert cpu.data.source == "shards" and cpu.data.processed_root == paths.processed_root


# A value other than the default for every field that does not shape the weights (a new one needs one here).
OTHER_VALUES = {
    "device": "cpu",
    "amp": True,
    "compile": True,
    "log_every": 3,
    "checkpoint_every": 7,
    "eval_every": 5,
    "data.num_workers": 2,
    "data.prefetch_factor": 4,
    "data.persistent_workers": True,
    "data.pin_memory": True,
    "data.cache_mode": "lru",
    "data.cache_max_items": 10,
}


def _changed(path: str, value: object) -> TrainConfig:
    raw = TrainConfig.model_validate(TINY).model_dump(mode="json")
    *parents, name = path.split(".")
    section = raw
    for parent in parents:
        section = section[parent]
    section[name] = value
    return TrainConfig.model_validate(raw)


@pytest.mark.parametrize("path", sorted(NOT_WEIGHT_SHAPING))
def test_a_field_that_does_not_shape_the_weights_keeps_the_training_key_and_resumes(path: str) -> None:
    """One list for both: the asset's checkpoint folder and the CLI's resume check ignore the same fields
    (``data.num_workers`` used to resume on the CLI but start a fresh training under Dagster)."""
    assert OTHER_VALUES.keys() == NOT_WEIGHT_SHAPING
    base, changed = TrainConfig.model_validate(TINY), _changed(path, OTHER_VALUES[path])
    assert changed != base
    versions = {"unlabeled_scenes": "v1"}
    assert training_key(changed, versions) == training_key(base, versions)
    assert config_differences(base.model_dump(mode="json"), changed) == {}


@pytest.mark.parametrize(
    ("path", "value"), [("seed", 7), ("model.embed_dim", 16), ("lr", 1e-3), ("data.patch_size", 64)]
)
def test_a_field_that_shapes_the_weights_gives_another_training_key_and_is_refused_on_resume(
    path: str, value: object
) -> None:
    base, changed = TrainConfig.model_validate(TINY), _changed(path, value)
    versions = {"unlabeled_scenes": "v1"}
    assert training_key(changed, versions) != training_key(base, versions)
    assert path in config_differences(base.model_dump(mode="json"), changed)


def test_more_steps_resume_on_the_cli_but_are_another_training_key() -> None:
    """A longer run continues a shorter one (seeded per step), but its last weights are other weights."""
    base, longer = TrainConfig.model_validate(TINY), _changed("steps", 8)
    assert config_differences(base.model_dump(mode="json"), longer) == {}
    assert training_key(longer, {}) != training_key(base, {})


def test_no_dataset_to_train_on_is_a_clear_error(resources: dict, instance: dg.DagsterInstance) -> None:
    with pytest.raises(ValueError, match="no dataset under .* has `train` items"):
        training_config(TrainConfig(), instance, resources["paths"], TrainingDevice())


def test_a_damaged_last_checkpoint_resumes_from_the_newest_intact_step_as_the_cli_does(
    built: dict, instance: dg.DagsterInstance
) -> None:
    """last.pt and step 4 cut short (a crash mid-copy, a full disk): the run resumes from step 2, as
    `python -m training_core.train --resume` would, instead of failing every retry with DamagedCheckpointError."""
    run_config = {"ops": {"trained_model": {"config": {**TINY, "device": "cpu"}}}}
    first = dg.materialize(
        [trained_model, processed_shards],
        selection=[trained_model],
        resources=built,
        instance=instance,
        run_config=run_config,
    )
    (done,) = first.asset_materializations_for_node("trained_model")
    checkpoint_dir = Path(done.metadata["checkpoint_path"].value).parent
    for name in ("last.pt", "step-000004.pt"):
        (checkpoint_dir / name).write_bytes((checkpoint_dir / name).read_bytes()[:2000])
    second = dg.materialize(
        [trained_model, processed_shards],
        selection=[trained_model],
        resources=built,
        instance=instance,
        run_config=run_config,
    )
    assert second.success
    (again,) = second.asset_materializations_for_node("trained_model")
    assert again.metadata["resumed_from_step"].value == 2 and again.metadata["steps"].value == 4
    warned = [e.message for e in instance.all_logs(second.run_id) if e.message and "is unreadable" in e.message]
    assert len(warned) == 2 and all("resuming from" in line and "step-000002.pt" in line for line in warned)
    assert again.metadata["checkpoint_sha256"].value == file_sha256(checkpoint_dir / "step-000004.pt")
