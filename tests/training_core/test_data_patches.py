"""GeoTIFF patch sampling on the bundled rasters: padding, target alignment, nodata, samplers, geo loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from runtime_export.numpy_runtime.pixels import PixelRule
from runtime_export.rasters import read_item
from training_core.config import DataConfig
from training_core.data import build_loader, set_loader_epoch
from training_core.data.patches import (
    GeoRaster,
    GridPatchSampler,
    PatchDataset,
    PatchLocation,
    RandomPatchSampler,
    find_geotiffs,
    grid_offsets,
)

EXTRACTED = Path(__file__).resolve().parents[2] / "sample_data" / "extracted"
NEW_BRUNSWICK = EXTRACTED / "new_brunswick_landcover"
QUEBEC = EXTRACTED / "quebec_buildings"
UNLABELED = EXTRACTED / "unlabeled_scenes" / "images"


def _labeled(dataset_dir: Path) -> list[GeoRaster]:
    return [
        GeoRaster.open(path.stem, path, dataset_dir / "masks" / path.name)
        for path in sorted((dataset_dir / "images").glob("*.tif"))
    ]


def _read(path: Path, bands: int | tuple[int, ...]) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(bands)


@pytest.mark.parametrize(
    ("size", "patch", "stride", "expected"),
    [(256, 512, 512, [0]), (512, 512, 512, [0]), (791, 512, 512, [0, 279]), (1024, 512, 256, [0, 256, 512])],
)
def test_grid_offsets(size: int, patch: int, stride: int, expected: list[int]) -> None:
    assert grid_offsets(size, patch, stride) == expected


def test_rasters_smaller_than_the_patch_are_padded_not_skipped() -> None:
    rasters = _labeled(NEW_BRUNSWICK)
    assert [(r.height, r.width) for r in rasters] == [(341, 280), (482, 326)]
    dataset = PatchDataset(rasters, patch_size=512)
    samples = [dataset[loc] for loc in GridPatchSampler(rasters, patch_size=512)]
    assert [s["item_id"] for s in samples] == [f"{r.item_id}@0,0" for r in rasters]
    for raster, sample in zip(rasters, samples, strict=True):
        h, w = raster.height, raster.width
        image = _read(raster.input_path, (1, 2, 3))
        assert sample["image"].shape == (3, 512, 512)
        assert sample["image"].dtype == torch.uint8
        assert torch.equal(sample["image"][:, :h, :w], torch.from_numpy(image))
        # Reflected padding: row h + k mirrors row h - 2 - k, column w + k mirrors column w - 2 - k.
        padded = sample["image"].numpy()
        np.testing.assert_array_equal(padded[:, h : h + 10, :w], padded[:, h - 2 : h - 12 : -1, :w])
        np.testing.assert_array_equal(padded[:, :h, w : w + 10], padded[:, :h, w - 2 : w - 12 : -1])
        assert bool(sample["valid"][:h, :w].all()) and not bool(sample["valid"][h:].any())
        assert not bool(sample["valid"][:, w:].any())
        assert torch.equal(sample["target"][:h, :w], torch.from_numpy(_read(raster.target_path, 1)).long())
        assert not bool(sample["target"][h:].any()) and not bool(sample["target"][:, w:].any())


def test_window_targets_stay_aligned() -> None:
    rasters = _labeled(QUEBEC)
    sample = PatchDataset(rasters, patch_size=128)[PatchLocation(1, 256, 384)]
    image = _read(rasters[1].input_path, (1, 2, 3))[:, 256:384, 384:512]
    target = _read(rasters[1].target_path, 1)[256:384, 384:512]
    assert torch.equal(sample["image"], torch.from_numpy(image))
    assert torch.equal(sample["target"], torch.from_numpy(target).long())
    assert sample["item_id"] == "tile_2@256,384" and bool(sample["valid"].all())


def test_nodata_pixels_are_invalid() -> None:
    path = UNLABELED / "RGB.byte.tif"
    tile = read_item(path, None, PixelRule())
    assert tile.valid is not None and 0 < tile.valid.mean() < 1
    # The nodata collar (value 0 in every band) is exactly what is marked invalid.
    np.testing.assert_array_equal(tile.valid, (tile.image != 0).any(axis=0))


def test_grid_covers_every_pixel_and_ranks_split_it() -> None:
    rasters = [GeoRaster.open(p.stem, p) for p in find_geotiffs([UNLABELED])]
    full = list(GridPatchSampler(rasters, patch_size=256, stride=200))
    for index, raster in enumerate(rasters):
        covered = np.zeros((raster.height, raster.width), dtype=bool)
        for loc in full:
            if loc.raster == index:
                covered[loc.row : loc.row + 256, loc.col : loc.col + 256] = True
        assert covered.all()
    halves = [list(GridPatchSampler(rasters, 256, stride=200, rank=r, world_size=2)) for r in range(2)]
    assert sorted(halves[0] + halves[1], key=full.index) == full and not set(halves[0]) & set(halves[1])


def test_random_windows_are_seeded_and_inside_the_raster() -> None:
    rasters = _labeled(NEW_BRUNSWICK) + [GeoRaster.open(p.stem, p) for p in find_geotiffs([UNLABELED])]
    sampler = RandomPatchSampler(rasters, patch_size=300, length=40, seed=3)
    epoch0 = list(sampler)
    assert epoch0 == list(RandomPatchSampler(rasters, 300, 40, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    assert list(RandomPatchSampler(rasters, 300, 40, seed=3, rank=1)) != epoch0
    assert {loc.raster for loc in epoch0} == set(range(len(rasters)))
    for loc in epoch0:
        raster = rasters[loc.raster]
        assert 0 <= loc.row <= max(0, raster.height - 300) and 0 <= loc.col <= max(0, raster.width - 300)


def test_geo_loader_reads_folders_and_files() -> None:
    cfg = DataConfig(
        source="geo",
        geo_paths=[str(UNLABELED), str(NEW_BRUNSWICK / "images" / "23322E759967N_clipped_1m_1of2.tif")],
        patch_size=384,
        max_samples=6,
    )
    loader = build_loader(cfg, batch_size=3, seed=0)
    set_loader_epoch(loader, 2)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(3, 3, 384, 384)] * 2
    assert "target" not in batches[0]
    ranks = [build_loader(cfg, 3, seed=0, rank=r, world_size=2) for r in range(2)]
    assert [len(r.sampler) for r in ranks] == [3, 3]
    assert [loc for loc in ranks[0].sampler] != [loc for loc in ranks[1].sampler]


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        find_geotiffs([tmp_path / "missing.tif"])
    with pytest.raises(ValueError, match="no GeoTIFF"):
        find_geotiffs([tmp_path])
    image, other_mask = QUEBEC / "images" / "tile_1.tif", NEW_BRUNSWICK / "masks" / "23322E759967N_clipped_1m_1of2.tif"
    with pytest.raises(ValueError, match=f"{other_mask}: size 341x280 differs"):
        GeoRaster.open("x", image, other_mask)
    with pytest.raises(ValueError, match=f"{other_mask}: bands: has 1 bands"):
        read_item(other_mask, None, PixelRule())
