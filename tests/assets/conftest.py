"""Fixtures for asset tests: a private copy of sample datasets, resources on temporary folders, and a
real (temporary, SQLite) Dagster instance with the dataset partitions registered."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from assets.datasets import DATASETS
from assets.resources import ProjectPaths, TrainingDevice

SAMPLE_ROOT = Path(__file__).resolve().parents[2] / "sample_data" / "extracted"


def copy_datasets(dst_root: Path, dataset_ids: list[str]) -> Path:
    """Copy sample datasets (read-only in the checkout) to a folder the test may modify."""
    for dataset_id in dataset_ids:
        shutil.copytree(SAMPLE_ROOT / dataset_id, dst_root / dataset_id)
    return dst_root


def make_paths(tmp_path: Path, extracted_root: Path) -> ProjectPaths:
    return ProjectPaths(
        extracted_root=str(extracted_root),
        headers_root=str(tmp_path / "headers"),
        processed_root=str(tmp_path / "processed"),
        artifacts_root=str(tmp_path / "artifacts"),
        checkpoints_root=str(tmp_path / "checkpoints"),
    )


@pytest.fixture
def extracted_root(tmp_path: Path) -> Path:
    return copy_datasets(tmp_path / "extracted", ["quebec_buildings", "unlabeled_scenes"])


@pytest.fixture
def resources(tmp_path: Path, extracted_root: Path) -> dict[str, dg.ConfigurableResource]:
    return {"paths": make_paths(tmp_path, extracted_root), "training_device": TrainingDevice(device="cpu")}


@pytest.fixture
def instance(extracted_root: Path) -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASETS.name, sorted(p.name for p in extracted_root.iterdir()))
        yield instance
