"""Synthetic tiles and the synthetic loader: sample contract, determinism, rank partitioning."""

from __future__ import annotations

import numpy as np
import torch

from training_core.config import DataConfig
from training_core.data import build_loader, set_loader_epoch, unit_float
from training_core.data.synthetic import MAX_REGIONS, MIN_REGIONS, SyntheticTiles


def test_sample_contract() -> None:
    sample = SyntheticTiles(n_items=2, patch_size=64, seed=7)[1]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 64, 64)
    assert sample["target"].dtype == torch.int64 and sample["target"].shape == (64, 64)
    labels = sample["target"].unique()
    assert labels.min() >= 1 and MIN_REGIONS <= labels.numel() <= MAX_REGIONS
    assert sample["valid"].dtype == torch.bool and bool(sample["valid"].all())
    assert sample["item_id"] == "synthetic-7-000001"


def test_unit_float_is_exactly_pixel_over_255() -> None:
    # Every uint8 value, as the trainer converts it, equals the float32 quotient pixel / 255.
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    converted = unit_float(torch.from_numpy(pixels))
    assert converted.dtype == torch.float32
    assert torch.equal(converted, torch.from_numpy(np.divide(pixels, np.float32(255.0), dtype=np.float32)))
    assert converted.min() == 0.0 and converted.max() == 1.0


def test_regions_differ_in_colour() -> None:
    sample = SyntheticTiles(n_items=1, patch_size=128, seed=3)[0]
    image = unit_float(sample["image"])
    means = [image[:, sample["target"] == label].mean(dim=1) for label in sample["target"].unique()]
    gaps = [torch.dist(a, b) for i, a in enumerate(means) for b in means[i + 1 :]]
    assert min(gaps) > 0.01


def test_deterministic_in_seed_and_index() -> None:
    a, b = SyntheticTiles(3, 64, seed=5), SyntheticTiles(3, 64, seed=5)
    assert torch.equal(a[2]["image"], b[2]["image"]) and torch.equal(a[2]["target"], b[2]["target"])
    assert not torch.equal(a[1]["image"], a[2]["image"])
    assert not torch.equal(a[2]["image"], SyntheticTiles(3, 64, seed=6)[2]["image"])


def _epoch_ids(loader: torch.utils.data.DataLoader, epoch: int) -> list[str]:
    set_loader_epoch(loader, epoch)
    return [item_id for batch in loader for item_id in batch["item_id"]]


def test_loader_batches_and_max_samples() -> None:
    cfg = DataConfig(source="synthetic", patch_size=32, synthetic_items=10, max_samples=6)
    batches = list(build_loader(cfg, batch_size=4, seed=1))
    assert [b["image"].shape for b in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert batches[0]["target"].shape == (4, 32, 32) and batches[0]["valid"].shape == (4, 32, 32)


def test_loader_epochs_reshuffle_reproducibly_and_workers_agree() -> None:
    cfg = DataConfig(source="synthetic", patch_size=16, synthetic_items=8)
    loader = build_loader(cfg, batch_size=2, seed=1)
    first, second = _epoch_ids(loader, 0), _epoch_ids(loader, 1)
    assert sorted(first) == sorted(second) and first != second
    assert _epoch_ids(loader, 0) == first
    with_workers = build_loader(cfg.model_copy(update={"num_workers": 2, "prefetch_factor": 1}), 2, seed=1)
    assert _epoch_ids(with_workers, 1) == second


def test_ranks_split_the_items() -> None:
    cfg = DataConfig(source="synthetic", patch_size=16, synthetic_items=8)
    per_rank = [_epoch_ids(build_loader(cfg, 2, seed=1, rank=r, world_size=2), 0) for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == [f"synthetic-1-{i:06d}" for i in range(8)]
