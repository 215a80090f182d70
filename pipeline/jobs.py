"""Jobs: named selections of the one asset graph, each with the tags and config its purpose needs."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from assets.datasets import dataset_header, processed_shards, raw_dataset
from assets.evaluation import iou_evaluation
from assets.export import best_model, runtime_artifact
from assets.training import trained_model
from training_core.config import TrainConfig
from training_core.datasets.discovery import discover_datasets

SAMPLE_EXTRACTED_ROOT = Path(__file__).resolve().parents[1] / "sample_data" / "extracted"
SAMPLE_DATASETS = discover_datasets(SAMPLE_EXTRACTED_ROOT)

# What a GPU training pod asks Kubernetes for (read by dagster-k8s's run launcher from the run tags).
GPU_K8S_CONFIG = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
        }
    },
    "pod_spec_config": {"node_selector": {"nvidia.com/gpu.present": "true"}},
}


# train_gpu's settings beyond the device: the compiled step, a batch that fills a GPU better than the CPU default's
# 4 (how much better is bench/gpu_throughput.py's to measure: docs/GPU.md), and loader workers for the 4 CPUs its
# pod requests, into pinned memory. configs/gpu.yaml carries the same (tests/pipeline/test_definitions.py).
GPU_TRAINING = {
    "device": "cuda",
    "compile": True,
    "batch_size": 32,
    "data": {"num_workers": 4, "pin_memory": True, "persistent_workers": True},
}


def training_run_config(**overrides: object) -> dict:
    """A train job's default run config: every TrainConfig field at its default, ``overrides`` applied.

    All fields, not just the overrides: a job's default run config is the default of the launchpad's whole
    `ops` section, so "Scaffold all default config" writes exactly this and nothing from the schema below it.
    """
    config = TrainConfig.model_validate(overrides).model_dump(mode="json", exclude_none=True)
    return {"ops": {trained_model.op.name: {"config": config}}}


observe_raw_datasets = dg.define_asset_job(
    "observe_raw_datasets",
    selection=[raw_dataset],
    description="Register every dataset folder as a partition and record its content hash (data version).",
)

build_shards_job = dg.define_asset_job(
    "build_shards",
    selection=[dataset_header, processed_shards],
    description="Header extraction and shard build for the selected dataset partitions.",
)

refresh_dataset = dg.define_asset_job(
    "refresh_dataset",
    selection=dg.AssetSelection.assets(dataset_header).downstream(),
    description="One dataset's header and shards rebuilt, then everything downstream of them (training, "
    "evaluation, export). What the sensor and the nightly schedule launch for a new or changed dataset.",
)

train_cpu = dg.define_asset_job(
    "train_cpu",
    selection=[trained_model],
    config=training_run_config(device="cpu"),
    tags={"segpipe/device": "cpu"},
    description="Train on the CPU of the run's host.",
)

train_gpu = dg.define_asset_job(
    "train_gpu",
    selection=[trained_model],
    config=training_run_config(**GPU_TRAINING),
    tags={"segpipe/device": "cuda", "dagster-k8s/config": GPU_K8S_CONFIG},
    description="Train on one CUDA GPU (compiled step, batch 32, 4 pinned loader workers): the `gpu` pool admits "
    "one training at a time; on Kubernetes the run pod requests one nvidia.com/gpu.",
)

evaluate_and_export = dg.define_asset_job(
    "evaluate_and_export",
    selection=[iou_evaluation, runtime_artifact, best_model],
    description="Score the latest trained model, export the numpy artifact, promote it if not worse.",
)

sample_pipeline = dg.define_asset_job(
    "sample_pipeline",
    selection=dg.AssetSelection.assets(
        dataset_header, processed_shards, trained_model, iou_evaluation, runtime_artifact, best_model
    ),
    # No job config: Dagster applies a partitioned job's config only to single-partition runs, and its
    # launchpad shows the schema defaults, i.e. TrainConfig's. pipeline/sample_run.yaml spells out the same.
    # One run over every sample dataset: the partitions must be registered first (observe_raw_datasets),
    # because Dagster resolves a run's partition range when it creates the run.
    tags={
        "dagster/asset_partition_range_start": SAMPLE_DATASETS[0],
        "dagster/asset_partition_range_end": SAMPLE_DATASETS[-1],
    },
    description="The whole graph on the sample data, trained with the shipped defaults (device auto: the CPU in CI).",
)

ALL_JOBS = [
    observe_raw_datasets,
    build_shards_job,
    refresh_dataset,
    train_cpu,
    train_gpu,
    evaluate_and_export,
    sample_pipeline,
]
