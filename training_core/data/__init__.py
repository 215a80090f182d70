"""Training data: one ``build_loader`` for every source in ``DataConfig``.

Sources: ``synthetic`` (seeded tiles, the default), ``shards`` (processed shards of
``dataset_ids`` under ``processed_root``, split ``split``), ``geo`` (random patches of the GeoTIFFs in
``geo_paths``, unlabeled). Every batch is a dict: ``image`` uint8 [B, 3, P, P] (the pixels as read),
``valid`` bool [B, P, P], ``item_id`` list[str], and ``target`` int64 [B, P, P] (0 = ignore) where the
source has labels. Images stay uint8 until they reach the device, where ``unit_float`` turns them into
float32 in [0, 1]: a quarter of the bytes to build, collate, pin and transfer.

A loader is one epoch: iterate it again for the next one, calling ``set_loader_epoch(loader, epoch)``
first so the shuffle (and random windows / crops) differ per epoch yet stay reproducible. Ranks get
disjoint data when ``rank`` / ``world_size`` are passed. ``prefetch_factor`` and
``persistent_workers`` only apply with ``num_workers > 0`` (with 0 workers the dataset already
persists in the main process) and are ignored otherwise.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, DistributedSampler

from training_core.config import DataConfig
from training_core.data.patches import GridPatchSampler, PatchDataset, RandomPatchSampler, unlabeled_rasters
from training_core.data.sharded import ShardDataset
from training_core.data.synthetic import SyntheticTiles

__all__ = ["build_loader", "set_loader_epoch", "unit_float"]


def build_loader(data_cfg: DataConfig, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader over ``data_cfg.source`` honouring every loader knob of ``DataConfig``."""
    sampler = None
    if data_cfg.source == "synthetic":
        n_items = min(data_cfg.synthetic_items, data_cfg.max_samples or data_cfg.synthetic_items)
        dataset = SyntheticTiles(n_items, data_cfg.patch_size, seed)
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    elif data_cfg.source == "geo":
        if not data_cfg.geo_paths:
            raise ValueError("data.geo_paths: empty, but source is 'geo'")
        rasters = unlabeled_rasters(data_cfg.geo_paths)
        dataset = PatchDataset(rasters, data_cfg.patch_size)
        # One epoch draws as many windows as a grid would need to cover every raster, unless capped.
        length = data_cfg.max_samples or len(GridPatchSampler(rasters, data_cfg.patch_size))
        sampler = RandomPatchSampler(rasters, data_cfg.patch_size, math.ceil(length / world_size), seed, rank)
    else:
        if data_cfg.processed_root is None:
            raise ValueError("data.processed_root: required when source is 'shards'")
        dataset = ShardDataset(
            data_cfg.processed_root,
            data_cfg.dataset_ids,
            split=data_cfg.split,
            patch_size=data_cfg.patch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            cache_mode=data_cfg.cache_mode,
            cache_max_items=data_cfg.cache_max_items,
            max_samples=data_cfg.max_samples,
        )
    workers = data_cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=data_cfg.pin_memory,
        prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=data_cfg.persistent_workers and workers > 0,
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Select ``epoch``'s shuffle / windows / crops in whichever of sampler and dataset is epoch-aware."""
    for part in (loader.sampler, loader.dataset):
        set_epoch = getattr(part, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [0, 1]: exactly ``pixel / 255`` (float32 division), on any device.

    The divisor is a 0-dim tensor on the images' device, not a Python number: CUDA turns division by
    a CPU scalar into a multiplication by its reciprocal, which can be one ulp off the true quotient.
    """
    return images.float().div_(torch.full((), 255.0, device=images.device))
