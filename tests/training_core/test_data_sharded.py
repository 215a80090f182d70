"""ShardDataset over shards of the bundled sample data: partitioning, epochs, cache, reader errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import rasterio
import torch
from torch.utils.data import DataLoader

from runtime_export.errors import DatasetError
from runtime_export.numpy_runtime.pixels import PixelRule
from training_core.config import DataConfig
from training_core.data import build_loader, set_loader_epoch, unit_float
from training_core.data.sharded import ShardDataset, ShardItem, assign_items
from training_core.datasets.discovery import discover_datasets
from training_core.shards.index import iter_split_items
from training_core.shards.write import build_shards

EXTRACTED = Path(__file__).resolve().parents[2] / "sample_data" / "extracted"


@pytest.fixture(scope="module")
def processed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("processed")
    for dataset_id in discover_datasets(EXTRACTED):
        build_shards(EXTRACTED, root, dataset_id)
    return root


def _split_ids(root: Path, split: str) -> list[str]:
    return sorted(
        f"{entry.dataset_id}/{entry.item_id}"
        for dataset_id in discover_datasets(EXTRACTED)
        for _, entry in iter_split_items(root, dataset_id, split)
    )


def _epoch_ids(dataset: ShardDataset, epoch: int, num_workers: int = 0, **loader_kwargs) -> list[str]:
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=4, num_workers=num_workers, **loader_kwargs)
    return [item_id for batch in loader for item_id in batch["item_id"]]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("split", ["train", "metrics_train"])
@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_every_item_exactly_once_per_epoch(processed_root: Path, split: str, num_workers: int) -> None:
    # train: 2 shards (32 + 3 items), metrics_train: 3 shards (4 + 1 + 1): both shard and item partitioning.
    dataset = ShardDataset(processed_root, split=split, patch_size=32)
    ids = _epoch_ids(dataset, 0, num_workers)
    assert sorted(ids) == _split_ids(processed_root, split)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_and_workers_partition_the_items(processed_root: Path, num_workers: int) -> None:
    per_rank = [
        _epoch_ids(ShardDataset(processed_root, split="train", patch_size=32, rank=r, world_size=2), 3, num_workers)
        for r in range(2)
    ]
    assert all(per_rank) and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == _split_ids(processed_root, "train")


def test_epochs_reshuffle_reproducibly_also_in_persistent_workers(processed_root: Path) -> None:
    dataset = ShardDataset(processed_root, split="train", patch_size=32, seed=5)
    first, second = _epoch_ids(dataset, 0), _epoch_ids(dataset, 1)
    assert sorted(first) == sorted(second) and first != second
    assert _epoch_ids(dataset, 0) == first

    fresh = [_epoch_ids(dataset, epoch, num_workers=2) for epoch in (0, 1)]
    persistent = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        assert [i for batch in persistent for i in batch["item_id"]] == fresh[epoch]


def test_samples_match_the_shard_files(processed_root: Path) -> None:
    dataset = ShardDataset(processed_root, dataset_ids=["quebec_buildings"], split="val", patch_size=512)
    (sample,) = list(dataset)
    (shard_dir, entry), *_ = iter_split_items(processed_root, "quebec_buildings", "val")
    with rasterio.open(shard_dir / entry.input) as src, rasterio.open(shard_dir / entry.target) as tgt:
        image, target = src.read(), tgt.read(1)
    assert sample["item_id"] == f"quebec_buildings/{entry.item_id}"
    assert sample["image"].dtype == torch.uint8 and torch.equal(sample["image"], torch.from_numpy(image))
    # The trainer's conversion gives the floats the loader produced before it yielded uint8.
    assert torch.equal(unit_float(sample["image"]), torch.from_numpy(image).float() / 255)
    assert sample["target"].dtype == torch.int64 and torch.equal(sample["target"], torch.from_numpy(target).long())
    assert sample["valid"].dtype == torch.bool and bool(sample["valid"].all())


def test_small_tiles_padded_large_tiles_cropped(processed_root: Path) -> None:
    samples = {s["item_id"]: s for s in ShardDataset(processed_root, split="train", patch_size=300)}
    kampala = next(s for item_id, s in samples.items() if item_id.startswith("kampala_buildings/"))
    assert kampala["image"].shape == (3, 300, 300)
    # The 256 x 256 tile reflected into a 300 patch; valid where the tile's own mask band says so (kampala's
    # tiles carry one, which the shards keep).
    item_id = kampala["item_id"].split("/", 1)[1]
    (shard_dir, entry), *_ = [
        pair for pair in iter_split_items(processed_root, "kampala_buildings", "train") if pair[1].item_id == item_id
    ]
    with rasterio.open(shard_dir / entry.input) as src:
        mask_valid = int((src.dataset_mask() > 0).sum())
    assert 256 * 256 - 100 < mask_valid < 256 * 256
    assert int(kampala["valid"].sum()) == mask_valid
    assert not bool(kampala["valid"][256:].any()) and not bool(kampala["valid"][:, 256:].any())
    scene = samples["unlabeled_scenes/RGB.byte"]  # 791 x 718 with a nodata collar
    assert scene["image"].shape == (3, 300, 300) and "target" not in scene


def test_lru_cache_serves_the_second_epoch_with_identical_samples(processed_root: Path) -> None:
    # patch 300 mixes padded tiles (kampala) with randomly cropped ones (unlabeled_scenes).
    plain = ShardDataset(processed_root, split="train", patch_size=300, seed=9)
    cached = ShardDataset(processed_root, split="train", patch_size=300, seed=9, cache_mode="lru")
    n = cached.n_items
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for a, b in zip(plain, cached, strict=True):
            assert a["item_id"] == b["item_id"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["valid"], b["valid"])
            b["image"].zero_()  # a sample is a copy: scribbling on it leaves the cached tile intact
    assert (cached.cache_misses, cached.cache_hits) == (n, n)

    bounded = ShardDataset(processed_root, split="train", patch_size=32, cache_mode="lru", cache_max_items=2)
    for epoch in (0, 1):
        bounded.set_epoch(epoch)
        assert sum(1 for _ in bounded) == n
    assert len(bounded._cache) == 2 and bounded.cache_hits + bounded.cache_misses == 2 * n
    assert bounded.cache_misses > n


def test_loader_from_config(processed_root: Path) -> None:
    cfg = DataConfig(
        source="shards", processed_root=str(processed_root), dataset_ids=["kampala_buildings"], patch_size=64
    )
    batch = next(iter(build_loader(cfg, batch_size=4, seed=0)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["valid"].shape == (4, 64, 64)
    assert batch["image"].dtype == torch.uint8

    capped = build_loader(cfg.model_copy(update={"max_samples": 5, "num_workers": 2}), batch_size=2, seed=0)
    epochs = []
    for epoch in (0, 1):
        set_loader_epoch(capped, epoch)
        epochs.append([i for batch in capped for i in batch["item_id"]])
    assert len(epochs[0]) == 5 and sorted(epochs[0]) == sorted(epochs[1])


def test_unknown_dataset_and_empty_split_are_errors(processed_root: Path) -> None:
    with pytest.raises(DatasetError, match="no manifest"):
        ShardDataset(processed_root, dataset_ids=["no_such_dataset"])
    with pytest.raises(DatasetError, match="split 'train': no items"):
        ShardDataset(processed_root, dataset_ids=["quebec_buildings"], split="train")


@pytest.mark.parametrize(
    ("bad_path", "message"), [("../../escape.tif", "leaves the shard"), ("/etc/x.tif", "absolute")]
)
def test_index_paths_outside_the_shard_are_rejected(
    processed_root: Path, tmp_path: Path, bad_path: str, message: str
) -> None:
    root = tmp_path / "processed"
    shutil.copytree(processed_root / "unlabeled_scenes", root / "unlabeled_scenes")
    index = root / "unlabeled_scenes" / "train" / "shard-00000" / "index.jsonl"
    lines = [json.loads(line) for line in index.read_text().splitlines()]
    lines[1]["input"] = bad_path
    index.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DatasetError, match=message) as caught:
        ShardDataset(root, split="train")
    assert f"{index}:2" in str(caught.value)


def test_assignment_balances_whole_shards_or_deals_items() -> None:
    sizes = [1, 4, 1, 2]
    shards, start = [], 0
    for size in sizes:
        shards.append([ShardItem(start + i, f"item{start + i}", Path("x.tif"), None, PixelRule()) for i in range(size)])
        start += size
    # Largest shard first, each to the least-loaded worker: 4 -> w0, 2 -> w1, then both 1s -> w1 (4 items each).
    mine = [[item.index for item in assign_items(shards, w, 2)] for w in range(2)]
    assert mine == [[1, 2, 3, 4], [6, 7, 0, 5]]
    # More workers than shards: single items round-robin.
    dealt = [[item.index for item in assign_items(shards, w, 5)] for w in range(5)]
    assert dealt == [[0, 5], [1, 6], [2, 7], [3], [4]]
