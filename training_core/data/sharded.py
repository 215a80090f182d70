"""``ShardDataset``: an IterableDataset over processed shards (layout: ``training_core/shards/__init__.py``).

Partitioning. Every DataLoader worker of every DDP rank has a global worker id
``rank * num_workers + worker_id`` out of ``world_size * num_workers``. With at least as many shards
as global workers, whole shards are dealt out (largest first, each to the least-loaded worker, so item
counts stay balanced); with fewer shards, single items are dealt round-robin instead. Either way each
item is yielded exactly once per epoch across all workers and ranks, provided every rank uses the same
``num_workers``. Ranks may get different item counts: the trainer counts steps, not epochs.

The assignment of items to workers never changes between epochs, so a worker's LRU cache of decoded
tiles stays useful; only the order within a worker is reshuffled, deterministically from
(seed, epoch, global worker id). Call ``set_epoch(epoch)`` before iterating an epoch: the epoch lives
in shared memory, so persistent workers see it too. The cache lives in the dataset object of each
worker process: it survives across epochs with ``num_workers == 0`` or ``persistent_workers=True``.

Each tile is padded (see ``training_core.data.patches``) and cropped to ``patch_size``; the crop of a
tile larger than the patch is drawn from (seed, epoch, item), independent of the worker layout.
``max_samples`` restricts every epoch to one fixed subset of that many items, chosen from the seed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rasterio.windows import Window
from torch.utils.data import IterableDataset, get_worker_info

from runtime_export.errors import DatasetError
from runtime_export.numpy_runtime.pixels import PixelRule
from runtime_export.rasters import Tile, read_item
from training_core.data.patches import crop_sample, pad_tile, patch_window
from training_core.datasets.built import built_header
from training_core.shards.index import MANIFEST_FILENAME, iter_split_items, read_manifest


@dataclass(frozen=True)
class ShardItem:
    """One tile of one shard, with absolute paths resolved by the shard reader's index."""

    index: int  # position in the dataset's item list: the cache key and crop seed
    item_id: str  # "<dataset_id>/<item_id>", unique across datasets
    input_path: Path
    target_path: Path | None
    rule: PixelRule  # the dataset header's: band selection, value scaling, validity


def processed_dataset_ids(processed_root: str | Path) -> list[str]:
    """Datasets with a finished build under a processed root (sub-folders holding a manifest), sorted."""
    root = Path(processed_root)
    if not root.is_dir():
        raise DatasetError(f"{root}: processed_root is not a directory")
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST_FILENAME).is_file())


def list_shards(processed_root: str | Path, dataset_ids: Sequence[str], split: str) -> list[list[ShardItem]]:
    """Items of ``split`` grouped per shard, in reader order (datasets in the given order).

    A dataset without a finished build is an error (from the shard reader), not an empty list.
    """
    shards: dict[Path, list[ShardItem]] = {}
    count = 0
    for dataset_id in dataset_ids:
        read_manifest(processed_root, dataset_id)
        rule = built_header(processed_root, dataset_id).pixel_rule
        for shard_dir, entry in iter_split_items(processed_root, dataset_id, split):
            shards.setdefault(shard_dir, []).append(
                ShardItem(
                    index=count,
                    item_id=f"{dataset_id}/{entry.item_id}",
                    input_path=shard_dir / entry.input,
                    target_path=shard_dir / entry.target if entry.target is not None else None,
                    rule=rule,
                )
            )
            count += 1
    return list(shards.values())


def keep_subset(shards: list[list[ShardItem]], max_samples: int, seed: int) -> list[list[ShardItem]]:
    """The same ``max_samples`` items every epoch (a seeded choice), shard grouping kept, empty shards dropped."""
    total = sum(len(items) for items in shards)
    chosen = set(np.random.default_rng(seed).permutation(total)[:max_samples].tolist())
    kept = [[item for item in items if item.index in chosen] for items in shards]
    return [items for items in kept if items]


def assign_items(shards: list[list[ShardItem]], worker: int, n_workers: int) -> list[ShardItem]:
    """Items of global worker ``worker``: whole shards when there are enough, single items otherwise."""
    if len(shards) < n_workers:
        return [item for items in shards for item in items][worker::n_workers]
    loads = [0] * n_workers
    mine: list[ShardItem] = []
    for position in sorted(range(len(shards)), key=lambda i: (-len(shards[i]), i)):
        target = loads.index(min(loads))
        loads[target] += len(shards[position])
        if target == worker:
            mine.extend(shards[position])
    return mine


class ShardDataset(IterableDataset):
    """Sample dicts (``image``, ``valid``, ``item_id``, ``target`` for labeled splits) from processed shards.

    ``cache_mode="lru"`` keeps up to ``cache_max_items`` decoded, padded tiles per worker (0 = no limit).
    Index paths that are absolute or leave their shard are rejected by the shard reader when the
    dataset is built.
    """

    def __init__(
        self,
        processed_root: str | Path,
        dataset_ids: Sequence[str] = (),
        split: str = "train",
        patch_size: int = 512,
        seed: int = 42,
        rank: int = 0,
        world_size: int = 1,
        cache_mode: str = "none",
        cache_max_items: int = 0,
        max_samples: int | None = None,
    ) -> None:
        if cache_mode not in ("none", "lru"):
            raise ValueError(f"cache_mode {cache_mode!r}: expected 'none' or 'lru'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        ids = list(dataset_ids) or processed_dataset_ids(processed_root)
        shards = list_shards(processed_root, ids, split)
        if not any(shards):
            raise DatasetError(f"{processed_root}: split {split!r}: no items in datasets {ids}")
        if max_samples is not None:
            shards = keep_subset(shards, max_samples, seed)
        self.shards = shards
        self.n_items = sum(len(items) for items in shards)  # per epoch, over all workers and ranks
        self.patch_size = patch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.cache_max_items = cache_max_items if cache_mode == "lru" else None
        self._cache: OrderedDict[int, Tile] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        # Shared memory so that persistent workers (separate processes) see set_epoch from the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order and crops of ``epoch``; call before iterating it."""
        self._epoch.fill_(epoch)

    def _global_worker(self) -> tuple[int, int]:
        info = get_worker_info()
        n_workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * n_workers + worker_id, self.world_size * n_workers

    def _crop_origin(self, item: ShardItem, epoch: int, height: int, width: int) -> tuple[int, int]:
        """Top-left of this epoch's crop; drawn only for tiles larger than the patch."""
        if height <= self.patch_size and width <= self.patch_size:
            return 0, 0
        rng = np.random.default_rng([self.seed, epoch, item.index])
        row = int(rng.integers(0, max(0, height - self.patch_size) + 1))
        col = int(rng.integers(0, max(0, width - self.patch_size) + 1))
        return row, col

    def _cached_tile(self, item: ShardItem) -> Tile:
        """The whole decoded tile, padded to the patch size, from the LRU cache or from disk."""
        tile = self._cache.get(item.index)
        if tile is not None:
            self.cache_hits += 1
            self._cache.move_to_end(item.index)
            return tile
        self.cache_misses += 1
        tile = pad_tile(read_item(item.input_path, item.target_path, item.rule), self.patch_size)
        self._cache[item.index] = tile
        if self.cache_max_items and len(self._cache) > self.cache_max_items:
            self._cache.popitem(last=False)
        return tile

    def _sample(self, item: ShardItem, epoch: int) -> dict:
        if self.cache_max_items is not None:
            tile = self._cached_tile(item)
            row, col = self._crop_origin(item, epoch, tile.height, tile.width)
            sample = crop_sample(tile, row, col, self.patch_size, item.item_id)
            sample["image"] = sample["image"].clone()  # the cache keeps the tile: the sample gets its own pixels
            return sample

        def crop_window(height: int, width: int) -> Window:
            row, col = self._crop_origin(item, epoch, height, width)
            return patch_window(row, col, height, width, self.patch_size)

        # Without a cache only the crop's own pixels are read.
        tile = pad_tile(read_item(item.input_path, item.target_path, item.rule, crop_window), self.patch_size)
        return crop_sample(tile, 0, 0, self.patch_size, item.item_id)

    def __iter__(self) -> Iterator[dict]:
        epoch = int(self._epoch)
        worker, n_workers = self._global_worker()
        items = assign_items(self.shards, worker, n_workers)
        for position in np.random.default_rng([self.seed, epoch, worker]).permutation(len(items)).tolist():
            yield self._sample(items[position], epoch)
