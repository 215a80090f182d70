"""The code location: every asset, check, job, sensor and schedule, with resources per environment.

This is the one place deployments differ. ``SEGPIPE_ENV`` picks the environment:
- ``local`` (default): the bundled sample data, outputs under ``runs/`` in the checkout (each root can be
  moved with ``SEGPIPE_EXTRACTED_ROOT`` / ``SEGPIPE_WORK_ROOT``), training device chosen automatically;
- ``cluster``: every root from environment variables of the pod, CUDA by default.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from dagster_k8s import k8s_job_executor

import assets.checks
from assets import datasets, evaluation, export, training
from assets.resources import ProjectPaths, TrainingDevice
from pipeline.automation import nightly_shard_rebuild, raw_dataset_sensor
from pipeline.jobs import ALL_JOBS, SAMPLE_EXTRACTED_ROOT

REPO_ROOT = Path(__file__).resolve().parents[1]
# Two step processes at most: the host has few cores (training uses them all) and the SQLite instance
# takes one writer at a time; see docs/OPERATIONS.md. Steps fork from a server that has already imported
# this code location (torch, rasterio, dagster), instead of paying that import in every step process.
LOCAL_EXECUTOR = dg.multiprocess_executor.configured({"max_concurrent": 2, "start_method": {"forkserver": {}}})
# On a cluster every step is its own Kubernetes job; deploy/k8s/ gives the training step its GPU request.
EXECUTORS_BY_ENV = {"local": LOCAL_EXECUTOR, "cluster": k8s_job_executor}


def paths_under(extracted_root: str, work_root: str) -> ProjectPaths:
    work = Path(work_root)
    return ProjectPaths(
        extracted_root=extracted_root,
        headers_root=str(work / "headers"),
        processed_root=str(work / "processed"),
        artifacts_root=str(work / "artifacts"),
        checkpoints_root=str(work / "checkpoints"),
    )


def local_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "paths": paths_under(
            os.environ.get("SEGPIPE_EXTRACTED_ROOT", str(SAMPLE_EXTRACTED_ROOT)),
            os.environ.get("SEGPIPE_WORK_ROOT", str(REPO_ROOT / "runs")),
        ),
        "training_device": TrainingDevice(device="auto"),
    }


def cluster_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "paths": ProjectPaths(
            extracted_root=dg.EnvVar("SEGPIPE_EXTRACTED_ROOT"),
            headers_root=dg.EnvVar("SEGPIPE_HEADERS_ROOT"),
            processed_root=dg.EnvVar("SEGPIPE_PROCESSED_ROOT"),
            artifacts_root=dg.EnvVar("SEGPIPE_ARTIFACTS_ROOT"),
            checkpoints_root=dg.EnvVar("SEGPIPE_CHECKPOINTS_ROOT"),
        ),
        "training_device": TrainingDevice(device="cuda"),
    }


RESOURCES_BY_ENV = {"local": local_resources, "cluster": cluster_resources}


def resources_for(environment: str) -> dict[str, dg.ConfigurableResource]:
    if environment not in RESOURCES_BY_ENV:
        raise ValueError(f"SEGPIPE_ENV={environment!r}: expected one of {sorted(RESOURCES_BY_ENV)}")
    return RESOURCES_BY_ENV[environment]()


ENVIRONMENT = os.environ.get("SEGPIPE_ENV", "local")


defs = dg.Definitions(
    assets=dg.load_assets_from_modules([datasets, training, evaluation, export]),
    asset_checks=dg.load_asset_checks_from_modules([assets.checks, evaluation, export]),
    jobs=ALL_JOBS,
    sensors=[raw_dataset_sensor],
    schedules=[nightly_shard_rebuild],
    resources=resources_for(ENVIRONMENT),
    executor=EXECUTORS_BY_ENV[ENVIRONMENT],
)
