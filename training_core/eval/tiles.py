"""Evaluation tiles: model pixels, validity and labels of one tile or one processed split, read through the
raster layer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime_export.numpy_runtime.pixels import PixelRule
from runtime_export.rasters import open_raster, read_item
from training_core.datasets.built import built_header
from training_core.shards.index import iter_split_items


@dataclass
class LabeledTile:
    item_id: str
    rgb: np.ndarray  # [3, H, W] uint8 model pixels
    label: np.ndarray | None  # [H, W]; invalid input pixels carry an ignored value
    valid: np.ndarray | None = None  # [H, W] bool; None = every pixel valid


def read_tile(
    item_id: str, input_path: Path, target_path: Path | None, rule: PixelRule, ignore_value: int = 0
) -> LabeledTile:
    """Model pixels, validity and labels through the raster layer; labels under invalid input pixels become
    ``ignore_value``."""
    tile = read_item(input_path, target_path, rule)
    label = tile.target
    if label is not None and tile.valid is not None and ignore_value != 0:
        label = np.where(tile.valid, label, ignore_value).astype(label.dtype)
    return LabeledTile(item_id, tile.image, label, tile.valid)


@dataclass(frozen=True)
class SplitTiles:
    """The tiles of one processed split, re-readable: each pass iterates it again (nothing kept)."""

    processed_root: Path
    dataset_id: str
    split: str
    ignore_value: int = 0

    def __iter__(self) -> Iterator[LabeledTile]:
        rule = built_header(self.processed_root, self.dataset_id).pixel_rule
        for shard_dir, entry in iter_split_items(self.processed_root, self.dataset_id, self.split):
            target = shard_dir / entry.target if entry.target else None
            yield read_tile(entry.item_id, shard_dir / entry.input, target, rule, self.ignore_value)

    def pixel_count(self) -> int:
        """Pixels over all tiles, from the files' metadata (no pixel read)."""
        total = 0
        for shard_dir, entry in iter_split_items(self.processed_root, self.dataset_id, self.split):
            with open_raster(shard_dir / entry.input) as src:
                total += src.width * src.height
        return total
