"""The shard plan, known before any pixel is read: a dataset's header, items, chips (``sharding.chip_size``),
split assignment and the shards of at most ``shard_size`` chips they fall in; ``build_key`` names a build's inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime_export.errors import DatasetError
from runtime_export.rasters import open_raster
from training_core.datasets.discovery import DatasetItem, dataset_folder, discover_items, require_utf8
from training_core.datasets.scan import layout_header, load_committed_header
from training_core.datasets.schema import DatasetHeader, header_from_dict, header_hash, load_header
from training_core.shards.index import LAYOUT_VERSION, ChipWindow
from training_core.splits import SPLITS, assign_splits, read_pinned_splits, split_counts


def chip_id(source_item: str, row: int, col: int) -> str:
    return f"{source_item}@r{row}_c{col}"


def chip_windows(height: int, width: int, chip_size: int) -> list[ChipWindow]:
    """The chip grid of a raster, row by row from (0, 0); the last row and column clipped to the raster."""
    return [
        (col, row, min(chip_size, width - col), min(chip_size, height - row))
        for row in range(0, height, chip_size)
        for col in range(0, width, chip_size)
    ]


@dataclass(frozen=True)
class Chip:
    """One item of the shards: a whole source raster (``window`` None) or one window of it."""

    source: DatasetItem
    window: ChipWindow | None = None

    @property
    def item_id(self) -> str:
        if self.window is None:
            return self.source.item_id
        col, row, _, _ = self.window
        return chip_id(self.source.item_id, row, col)


def plan_chips(items: Sequence[DatasetItem], chip_size: int) -> list[Chip]:
    """The items' chips, in item order and grid order within an item; opens each input for its size only."""
    chips: list[Chip] = []
    for item in items:
        with open_raster(item.input_path) as src:
            height, width = src.height, src.width
        if height <= chip_size and width <= chip_size:
            chips.append(Chip(item))
        else:
            chips += [Chip(item, window) for window in chip_windows(height, width, chip_size)]
    return chips


@dataclass(frozen=True)
class ShardPlan:
    """What a build will write, known before any pixel is read."""

    dataset_dir: Path
    header: DatasetHeader
    header_committed: bool
    items: list[DatasetItem]
    assignment: dict[str, str]  # source item id -> split
    pinned: dict[str, str]
    chips: list[Chip]

    @property
    def counts(self) -> dict[str, int]:
        """Source rasters per split (the split rule's counts)."""
        return split_counts(self.assignment)

    @property
    def tile_counts(self) -> dict[str, int]:
        """Items (chips and whole rasters) per split."""
        return split_counts({chip.item_id: self.assignment[chip.source.item_id] for chip in self.chips})

    def shards(self) -> dict[str, list[list[Chip]]]:
        """split -> shards (chip lists of at most shard_size; sources sorted by id, chips in grid order)."""
        size = self.header.sharding.shard_size
        out: dict[str, list[list[Chip]]] = {}
        for split in SPLITS:
            members = [chip for chip in self.chips if self.assignment[chip.source.item_id] == split]
            out[split] = [members[i : i + size] for i in range(0, len(members), size)]
        return out


def plan_shards(
    extracted_root: str | Path,
    dataset_id: str,
    *,
    seed: int | None = None,
    shard_size: int | None = None,
    header_path: str | Path | None = None,
) -> ShardPlan:
    """Header (``header_path``, else the committed one, else the layout part of the inferred one), items and
    split assignment. ``header_path`` is an extracted header (the ``dataset_header`` asset's file): it is
    authoritative like a committed one."""
    dataset_dir = dataset_folder(extracted_root, dataset_id)
    require_utf8(dataset_dir, "dataset folder")
    committed = load_committed_header(dataset_dir, dataset_id)
    if header_path is not None:
        committed = load_header(header_path)
        if committed.dataset_id != dataset_id:
            raise DatasetError(f"{header_path}: dataset_id: is {committed.dataset_id!r}, expected {dataset_id!r}")
    header = committed or layout_header(dataset_dir, dataset_id)
    if seed is not None or shard_size is not None:
        data = header.model_dump()
        data["splits"]["seed"] = header.splits.seed if seed is None else seed
        data["sharding"]["shard_size"] = header.sharding.shard_size if shard_size is None else shard_size
        header = header_from_dict(data, f"{dataset_dir} (seed/shard_size overrides)")
    items = discover_items(dataset_dir, header)
    pinned = read_pinned_splits(dataset_dir, header, items)
    assignment = assign_splits(items, header, pinned)
    chips = plan_chips(items, header.sharding.chip_size)
    return ShardPlan(dataset_dir, header, committed is not None, items, assignment, pinned, chips)


def build_key(plan: ShardPlan, data_version: str) -> str:
    """Identifies a build's inputs: an inferred header is a function of the data, so data version plus the
    planned header (settings, overrides) decide the output."""
    return hashlib.sha256(f"{LAYOUT_VERSION}:{data_version}:{header_hash(plan.header)}".encode()).hexdigest()
