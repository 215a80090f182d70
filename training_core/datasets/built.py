"""A built dataset's header: the copy ``training_core.shards.write`` writes beside the shards it builds.

Readers of a processed dataset (training, evaluation, export, the data-plane checks) take the pixel rule and
targets from this copy, the header the shards were built under, not from the committed header under the
headers root, which may have changed since the build.
"""

from __future__ import annotations

from pathlib import Path

from training_core.datasets.schema import HEADER_FILENAME, DatasetHeader, load_header


def built_header(processed_root: str | Path, dataset_id: str) -> DatasetHeader:
    """The header of ``dataset_id``'s shards under ``processed_root`` (``<processed_root>/<dataset_id>/
    dataset_header.yaml``); a ``DatasetError`` when it is missing or unreadable."""
    return load_header(Path(processed_root) / dataset_id / HEADER_FILENAME)
