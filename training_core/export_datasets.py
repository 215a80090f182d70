"""What an export reads of the built datasets a model was trained on: the pixel rules and descriptions that
``meta.json`` records (``input_rules_of``, ``training_data_of``) and the tiles the parity check runs on
(``parity_tiles``), each from ``<processed_root>/<dataset id>/``. ``training_core.export`` (the CLI) and the
Dagster assets (``assets/export.py``) both read them here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from runtime_export.errors import DatasetError
from runtime_export.rasters import open_raster, read_item
from training_core.datasets.built import built_header
from training_core.shards.index import iter_split_items
from training_core.splits import SPLITS

PARITY_TILES = 2
PARITY_TILE_SIZE = 256  # a crop keeps the check to seconds on big tiles


def input_rules_of(processed_root: str | Path, dataset_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``meta.json``'s ``input_rules`` for built datasets: ``{id: {"dtype": ..., **PixelRule.to_dict()}}``.

    Each rule is the one the shards were built and read with (``<processed_root>/<id>/dataset_header.yaml``);
    a header that does not declare its input dtype takes it from the first built input tile.
    """
    rules: dict[str, dict[str, Any]] = {}
    for dataset_id in sorted(set(dataset_ids)):
        header = built_header(processed_root, dataset_id)
        dtype = header.input.dtype or _built_input_dtype(processed_root, dataset_id)
        rules[dataset_id] = {"dtype": dtype, **header.pixel_rule.to_dict()}
    return rules


def training_data_of(processed_root: str | Path, dataset_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``meta.json``'s ``training_data`` for built datasets: ``{id: {"licence", "ground_resolution_m", "crs"}}``
    from each dataset's header (``<processed_root>/<id>/dataset_header.yaml``); null where the header has none.

    What a user needs to judge whether their imagery is like the training data and how they may use the model;
    the same dataset's bands and scaling are its ``input_rules`` entry.
    """
    data: dict[str, dict[str, Any]] = {}
    for dataset_id in sorted(set(dataset_ids)):
        header = built_header(processed_root, dataset_id)
        resolution = header.input.ground_resolution_m
        data[dataset_id] = {
            "licence": header.licence,
            "ground_resolution_m": None if resolution is None else list(resolution),
            "crs": header.input.crs,
        }
    return data


def _built_input_dtype(processed_root: str | Path, dataset_id: str) -> str:
    for split in SPLITS:
        for shard_dir, entry in iter_split_items(processed_root, dataset_id, split):
            with open_raster(shard_dir / entry.input) as src:
                return src.dtypes[0]
    raise DatasetError(f"{Path(processed_root) / dataset_id}: no built input tile to read the input dtype from")


def parity_tiles(processed_root: str | Path, dataset_ids: Iterable[str]) -> list[np.ndarray]:
    """Up to ``PARITY_TILES`` model-pixel tiles (cropped to ``PARITY_TILE_SIZE``) from the datasets' shards,
    read under each dataset's pixel rule as training and segmentation read them."""

    def crop(height: int, width: int) -> Window:
        return Window(0, 0, min(width, PARITY_TILE_SIZE), min(height, PARITY_TILE_SIZE))

    tiles: list[np.ndarray] = []
    for dataset_id in sorted(dataset_ids):
        rule = built_header(processed_root, dataset_id).pixel_rule
        for split in ("val", "metrics_train", "train"):
            for shard_dir, entry in iter_split_items(processed_root, dataset_id, split):
                tiles.append(read_item(shard_dir / entry.input, None, rule, crop).image)
                if len(tiles) == PARITY_TILES:
                    return tiles
    if not tiles:
        raise DatasetError(f"no tile in the shards of {sorted(dataset_ids)} under {processed_root} to test parity on")
    return tiles
