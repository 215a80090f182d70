"""Resources the assets share: where data lives, and which device trains.

Instances are configured per environment in one place, ``pipeline/definitions.py``; tests build their
own with temporary directories.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
from pydantic import Field

from training_core.datasets.schema import HEADER_FILENAME


class ProjectPaths(dg.ConfigurableResource):
    """Roots of every stage's files. Assets derive sub-paths from these, never from the cwd."""

    extracted_root: str = Field(description="raw datasets, one folder per dataset id (read-only)")
    headers_root: str = Field(description="extracted dataset headers, <headers_root>/<dataset_id>/dataset_header.yaml")
    processed_root: str = Field(description="processed shards, <processed_root>/<dataset_id>/...")
    artifacts_root: str = Field(description="exported runtime artifacts: candidates/<key>/ and best/")
    checkpoints_root: str = Field(description="training checkpoints, keyed by asset and config hash")

    def dataset_dir(self, dataset_id: str) -> Path:
        return Path(self.extracted_root) / dataset_id

    def header_path(self, dataset_id: str) -> Path:
        return Path(self.headers_root) / dataset_id / HEADER_FILENAME

    def checkpoint_dir(self, asset_name: str, key: str) -> Path:
        """Checkpoint folder of one training: same asset + same config hash = same folder, so retries resume."""
        return Path(self.checkpoints_root) / asset_name / key

    def candidate_dir(self, key: str) -> Path:
        return Path(self.artifacts_root) / "candidates" / key

    def best_dir(self) -> Path:
        return Path(self.artifacts_root) / "best"


class TrainingDevice(dg.ConfigurableResource):
    """The accelerator a host offers. A run config ``device: auto`` resolves to ``device`` here."""

    device: str = Field("auto", description="auto|cpu|cuda|mps: what `auto` in the training config means here")
    torch_threads: int = Field(0, ge=0, description="intra-op threads for CPU training; 0 = torch's default")

    def resolve(self, requested: str) -> str:
        return self.device if requested == "auto" else requested


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``.<name>.lock`` beside ``path`` for the block.

    Runs doing the same work on ``path`` (two runs rebuilding one dataset's shards, or training one config
    into one checkpoint folder) take turns instead of writing the same files at once. The kernel drops the
    lock when its process dies, so a killed step never leaves it held.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(f".{path.name}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
