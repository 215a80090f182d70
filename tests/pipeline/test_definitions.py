"""The code location loads, validates, and its jobs carry the tags and config deployments rely on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.definitions import defs, resources_for
from pipeline.jobs import GPU_K8S_CONFIG, GPU_TRAINING, SAMPLE_DATASETS
from training_core.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = {"dataset_header", "processed_shards", "trained_model", "iou_evaluation", "runtime_artifact", "best_model"}


def test_definitions_load_with_every_stage_job_and_automation() -> None:
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert STAGES | {"raw_dataset"} <= keys
    for name in ("build_shards", "refresh_dataset", "train_cpu", "train_gpu", "evaluate_and_export", "sample_pipeline"):
        assert defs.resolve_job_def(name) is not None
    assert defs.resolve_sensor_def("raw_dataset_sensor") and defs.resolve_schedule_def("nightly_shard_rebuild")


def test_lineage_connects_every_stage() -> None:
    graph = defs.resolve_asset_graph()
    parents = {
        key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
        for key in graph.get_all_asset_keys()
    }
    assert parents["dataset_header"] == {"raw_dataset"}
    assert parents["processed_shards"] == {"dataset_header"}
    assert parents["trained_model"] == {"processed_shards"}
    assert parents["iou_evaluation"] == {"trained_model"}
    assert parents["runtime_artifact"] == {"trained_model", "iou_evaluation"}
    assert parents["best_model"] == {"runtime_artifact"}


def test_train_jobs_share_the_asset_and_differ_in_device_tags_and_gpu_request() -> None:
    cpu, gpu = defs.resolve_job_def("train_cpu"), defs.resolve_job_def("train_gpu")
    assert cpu.asset_layer.executable_asset_keys == gpu.asset_layer.executable_asset_keys
    assert gpu.run_tags["segpipe/device"] == "cuda" and cpu.run_tags["segpipe/device"] == "cpu"
    k8s = json.loads(gpu.run_tags["dagster-k8s/config"])  # non-string tag values are stored as JSON
    assert k8s == GPU_K8S_CONFIG
    assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "dagster-k8s/config" not in cpu.run_tags
    assert gpu.graph.node_named("trained_model").definition.pool == "gpu"
    assert gpu.run_config["ops"]["trained_model"]["config"]["device"] == "cuda"


def test_train_gpu_and_the_gpu_recipe_share_the_throughput_settings() -> None:
    """docs/GPU.md: train_gpu and configs/gpu.yaml train with the compiled step, the larger batch, pinned workers."""
    config = defs.resolve_job_def("train_gpu").run_config["ops"]["trained_model"]["config"]
    recipe = load_config(REPO_ROOT / "configs" / "gpu.yaml")
    for key, value in GPU_TRAINING.items():
        if key == "data":
            for data_key, data_value in value.items():
                assert config["data"][data_key] == getattr(recipe.data, data_key) == data_value, data_key
        else:
            assert config[key] == getattr(recipe, key) == value, key


def test_sample_pipeline_spans_every_sample_dataset_in_one_run() -> None:
    job = defs.resolve_job_def("sample_pipeline")
    assert job.run_tags["dagster/asset_partition_range_start"] == SAMPLE_DATASETS[0]
    assert job.run_tags["dagster/asset_partition_range_end"] == SAMPLE_DATASETS[-1]
    assert {key.to_user_string() for key in job.asset_layer.executable_asset_keys} == STAGES


def test_unknown_environment_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="SEGPIPE_ENV='prod'"):
        resources_for("prod")


def test_dagster_cli_validates_the_workspace() -> None:
    result = subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "All code locations passed validation" in result.stderr + result.stdout


def test_cluster_environment_runs_each_step_as_a_kubernetes_job() -> None:
    """The environment switch picks the executor too: local steps fork on this host, cluster steps are k8s jobs."""
    code = (
        "from pipeline.definitions import defs; "
        "print(defs.resolve_job_def('train_gpu').executor_def.name, defs.resources['training_device'].device)"
    )
    local = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    cluster = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={**os.environ, "SEGPIPE_ENV": "cluster"},
    )
    assert local.stdout.split() == ["multiprocess", "auto"]
    assert cluster.stdout.split() == ["k8s", "cuda"]
