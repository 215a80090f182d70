"""The uint16 B, G, R, NIR COG dataset through the Dagster graph in process: observed, header, shards, a tiny
training, evaluation and export; the artifact records the dataset's input rule and every blocking check passes."""

import json
from pathlib import Path

import dagster as dg
import pytest

from assets import checks, datasets, evaluation, export, training
from assets.datasets import DATASETS, dataset_header, processed_shards, raw_dataset
from assets.evaluation import iou_evaluation
from assets.export import runtime_artifact
from assets.resources import TrainingDevice
from assets.training import trained_model
from tests.assets.conftest import make_paths
from tests.imagery import make_rgbn_uint16_cog
from training_core.datasets.discovery import dataset_content_hash
from training_core.datasets.schema import load_header

DATASET_ID = "rgbn_uint16_cog"
LICENCE = "Imagery CC-BY 4.0 (OpenAerialMap)"
STAGES = [dataset_header, processed_shards, trained_model, iou_evaluation, runtime_artifact]
TINY = {
    "device": "cpu",
    "steps": 2,
    "checkpoint_every": 2,
    "model": {"embed_dim": 8, "max_k": 4},
    "data": {"patch_size": 32},
}


@pytest.mark.timeout(600)
def test_uint16_rgbn_cogs_materialize_to_an_artifact_recording_their_input_rule(tmp_path: Path) -> None:
    paths = make_paths(tmp_path, tmp_path / "extracted")
    make_rgbn_uint16_cog(Path(paths.extracted_root), DATASET_ID)
    (paths.dataset_dir(DATASET_ID) / "LICENSE").write_text(f"{LICENCE}\n")
    asset_checks = dg.load_asset_checks_from_modules([checks, evaluation, export])
    defs = dg.Definitions(
        assets=dg.load_assets_from_modules([datasets, training, evaluation, export]),
        asset_checks=asset_checks,
        jobs=[
            dg.define_asset_job("observe", selection=[raw_dataset]),
            dg.define_asset_job("rgbn_stages", selection=STAGES),
        ],
        resources={"paths": paths, "training_device": TrainingDevice(device="cpu")},
    )
    stage_keys = {stage.key for stage in STAGES}
    blocking = {
        spec.key.name
        for checks_def in asset_checks
        for spec in checks_def.check_specs
        if spec.blocking and spec.asset_key in stage_keys
    }
    assert blocking >= {  # every blocking check on these stages must run and pass, these among them
        "header_matches_files",
        "every_item_in_one_split",
        "split_counts_follow_rule",
        "index_paths_inside_shard",
        "tiles_intact_and_readable",
        "runtime_matches_torch",
    }

    with dg.instance_for_test() as instance:
        # The observation registers the folder as a partition, as the sensor does.
        assert defs.resolve_job_def("observe").execute_in_process(instance=instance).success
        assert instance.get_dynamic_partitions(DATASETS.name) == [DATASET_ID]
        result = defs.resolve_job_def("rgbn_stages").execute_in_process(
            instance=instance, partition_key=DATASET_ID, run_config={"ops": {"trained_model": {"config": TINY}}}
        )
        assert result.success

    materialized = {
        (event.asset_key.to_user_string(), event.partition) for event in result.get_asset_materialization_events()
    }
    assert materialized == {
        ("dataset_header", DATASET_ID),
        ("processed_shards", DATASET_ID),
        ("trained_model", None),
        ("iou_evaluation", None),
        ("runtime_artifact", None),
    }
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert blocking <= evaluations.keys()
    failed = {name: e.description for name, e in evaluations.items() if name in blocking and not e.passed}
    assert not failed, failed

    header = load_header(paths.header_path(DATASET_ID))
    lo, hi = header.input.value_range
    assert (header.input.dtype, header.input.bands, header.input.nodata) == ("uint16", [3, 2, 1], 0)
    assert 0 < lo < hi
    expected_rule = {"dtype": "uint16", "bands": [3, 2, 1], "alpha_band": None, "nodata": 0.0, "value_range": [lo, hi]}
    (header_event,) = result.asset_materializations_for_node("dataset_header")
    assert header_event.metadata["pixel_rule"].value == expected_rule

    (shards_event,) = result.asset_materializations_for_node("processed_shards")
    counts = {split: shards_event.metadata[f"count_{split}"].value for split in ("train", "metrics_train", "val")}
    assert counts == {"train": 4, "metrics_train": 4, "val": 12}
    (training_event,) = result.asset_materializations_for_node("trained_model")
    assert training_event.metadata["datasets"].value == [DATASET_ID]
    assert training_event.metadata["steps"].value == 2
    (evaluation_event,) = result.asset_materializations_for_node("iou_evaluation")
    assert isinstance(evaluation_event.metadata["val_miou"].value, float)
    assert evaluation_event.metadata["datasets"].value == [DATASET_ID]

    (artifact_event,) = result.asset_materializations_for_node("runtime_artifact")
    artifact = Path(artifact_event.metadata["artifact_dir"].value)
    meta = json.loads((artifact / "meta.json").read_text())
    assert meta["input_rules"] == {DATASET_ID: expected_rule}
    kampala_pixels = [0.07464, 0.07464]  # the source tiles' EPSG:3857 pixels in ground metres
    assert meta["training_data"] == {
        DATASET_ID: {"licence": LICENCE, "ground_resolution_m": kampala_pixels, "crs": ["EPSG:3857"]}
    }
    assert meta["ground_resolution_m"] == kampala_pixels and meta["k_range"] == [2, 4]
    assert meta["lineage"]["datasets"] == [DATASET_ID]
    data_version = dataset_content_hash(paths.dataset_dir(DATASET_ID))
    assert meta["lineage"]["data_versions"] == {DATASET_ID: data_version}
    assert meta["metrics"]["val_miou"] == evaluation_event.metadata["val_miou"].value
