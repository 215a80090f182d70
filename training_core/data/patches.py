"""GeoTIFF patch sampling: fixed-size windows from rasters of any size, with aligned targets.

torchgeo-style split of jobs: a *sampler* decides where the windows are (``RandomPatchSampler`` draws
random windows, ``GridPatchSampler`` covers every raster), the *dataset* (``PatchDataset``) turns one
``PatchLocation`` into a sample. ``DataLoader(PatchDataset(...), sampler=...)`` wires them together.

Pixels are read through the raster layer (``runtime_export.rasters.read_item``) under the
dataset's pixel rule (band selection, value scaling, validity).

Every sample is a dict: ``image`` uint8 [3, P, P] (model pixels), ``valid`` bool [P, P],
``item_id`` str, and ``target`` int64 [P, P] (0 = ignore) when the raster has a paired target.

Rasters smaller than the patch are padded, never skipped. Padding choice: the image is *reflected*
at the bottom / right edge, the target is padded with 0 (ignore) and ``valid`` is False there.
Reflection keeps real ground texture in the padded area; a flat zero border would be a free,
perfectly separable "segment" that the clustering losses would learn to isolate. ``valid`` still
marks it so losses and metrics can leave it out. Pixels the pixel rule calls invalid (nodata value,
mask band, alpha band) are ``valid = False`` too.

The helpers ``pad_tile`` / ``crop_sample`` are shared with the shard dataset.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rasterio.windows import Window
from torch.utils.data import Dataset, Sampler

from runtime_export.errors import DatasetError
from runtime_export.numpy_runtime.pixels import PixelRule, infer_bands
from runtime_export.rasters import Tile, open_raster, raster_facts, read_item

GEOTIFF_SUFFIXES = (".tif", ".tiff")


def patch_window(row: int, col: int, height: int, width: int, patch_size: int) -> Window:
    """The part of the ``patch_size`` square at (row, col) that lies inside a height x width raster."""
    return Window(col, row, min(patch_size, width - col), min(patch_size, height - row))


def pad_tile(tile: Tile, patch_size: int) -> Tile:
    """Grow a tile to at least ``patch_size`` on both sides: image reflected, target 0, valid False.

    Padding goes at the bottom / right so pixel (row, col) of the raster stays at (row, col).
    """
    pad_rows = max(0, patch_size - tile.height)
    pad_cols = max(0, patch_size - tile.width)
    if not pad_rows and not pad_cols:
        return tile
    image = np.pad(tile.image, ((0, 0), (0, pad_rows), (0, pad_cols)), mode="reflect")
    # Constant padding as zeros + one copy: several times faster than np.pad on the loader's hot path.
    rows, cols = slice(0, tile.height), slice(0, tile.width)
    valid = np.zeros((tile.height + pad_rows, tile.width + pad_cols), dtype=bool)
    valid[rows, cols] = True if tile.valid is None else tile.valid
    target = None
    if tile.target is not None:
        target = np.zeros(valid.shape, dtype=tile.target.dtype)
        target[rows, cols] = tile.target
    return Tile(image=image, target=target, valid=valid)


def crop_sample(tile: Tile, row: int, col: int, patch_size: int, item_id: str) -> dict:
    """The sample dict of the ``patch_size`` square at (row, col) of a tile at least that large.

    ``image`` is a view of the tile's pixels (``valid`` and ``target`` are copies): a caller that keeps
    the tile, like the LRU cache, copies the image so that no sample aliases it.
    """
    rows, cols = slice(row, row + patch_size), slice(col, col + patch_size)
    image = tile.image[:, rows, cols]
    if image.shape[1:] != (patch_size, patch_size):
        raise ValueError(f"{item_id}: patch at ({row}, {col}) leaves the {tile.height}x{tile.width} tile")
    valid = np.ones((patch_size, patch_size), dtype=bool) if tile.valid is None else tile.valid[rows, cols].copy()
    sample = {
        "image": torch.from_numpy(image),
        "valid": torch.from_numpy(valid),
        "item_id": item_id,
    }
    if tile.target is not None:
        sample["target"] = torch.from_numpy(tile.target[rows, cols].astype(np.int64))
    return sample


@dataclass(frozen=True)
class GeoRaster:
    """One input raster (and optional aligned target) with its pixel size and the rule its pixels are read by."""

    item_id: str
    input_path: Path
    target_path: Path | None
    height: int
    width: int
    rule: PixelRule = PixelRule()

    @classmethod
    def open(cls, item_id: str, input_path: str | Path, target_path: str | Path | None = None) -> GeoRaster:
        """Size and band selection (GDAL's colour interpretation) from the file; a raw raster is read unscaled,
        so it must be uint8 (a non-uint8 dataset goes through a header: shards). A target of another size is
        an error naming both files."""
        with open_raster(input_path) as src:
            facts = raster_facts(src, Path(input_path))
        bands, alpha = infer_bands(facts.colorinterp)
        rule = PixelRule(bands=tuple(bands), alpha_band=alpha)
        if facts.count < rule.band_count_needed or facts.dtype != "uint8":
            raise DatasetError(
                f"{input_path}: {facts.count} band(s) of {facts.dtype}: geo_paths takes uint8 rasters with R, G, B; "
                "build shards from a dataset header for other data (it records band selection and value scaling)"
            )
        if target_path is not None:
            with open_raster(target_path) as tgt:
                if (tgt.height, tgt.width) != (facts.height, facts.width):
                    raise DatasetError(
                        f"{target_path}: size {tgt.height}x{tgt.width} differs from its input {input_path} "
                        f"({facts.height}x{facts.width})"
                    )
        return cls(
            item_id=item_id,
            input_path=Path(input_path),
            target_path=None if target_path is None else Path(target_path),
            height=facts.height,
            width=facts.width,
            rule=rule,
        )


def find_geotiffs(paths: Sequence[str | Path]) -> list[Path]:
    """GeoTIFF files named directly, or found at the top level of named folders (sorted per folder).

    A missing path, or a folder without GeoTIFFs, is an error: nothing is silently dropped.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in GEOTIFF_SUFFIXES)
            if not files:
                raise DatasetError(f"{path}: geo_paths folder holds no GeoTIFF (*.tif, *.tiff) at its top level")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise DatasetError(f"{path}: geo_paths entry does not exist")
    return found


def unlabeled_rasters(paths: Sequence[str | Path]) -> list[GeoRaster]:
    """``GeoRaster``s without targets for every GeoTIFF in ``paths`` (item id = file stem)."""
    return [GeoRaster.open(path.stem, path) for path in find_geotiffs(paths)]


@dataclass(frozen=True)
class PatchLocation:
    """Top-left pixel of a patch window in raster ``raster`` (an index into the dataset's rasters)."""

    raster: int
    row: int
    col: int


class PatchDataset(Dataset):
    """Map-style dataset indexed by ``PatchLocation``: reads only that window of the raster.

    Windows reaching past a raster smaller than the patch are padded (see the module docstring).
    """

    def __init__(self, rasters: Sequence[GeoRaster], patch_size: int = 512) -> None:
        if not rasters:
            raise ValueError("PatchDataset needs at least one raster")
        self.rasters = list(rasters)
        self.patch_size = patch_size

    def __getitem__(self, location: PatchLocation) -> dict:
        raster = self.rasters[location.raster]
        window = patch_window(location.row, location.col, raster.height, raster.width, self.patch_size)
        tile = read_item(raster.input_path, raster.target_path, raster.rule, lambda _h, _w: window)
        tile = pad_tile(tile, self.patch_size)
        item_id = f"{raster.item_id}@{location.row},{location.col}"
        return crop_sample(tile, 0, 0, self.patch_size, item_id)


def grid_offsets(size: int, patch_size: int, stride: int) -> list[int]:
    """Window starts along one axis that cover [0, size): a stride grid plus one flush with the far edge."""
    if size <= patch_size:
        return [0]
    last = size - patch_size
    offsets = list(range(0, last + 1, stride))
    if offsets[-1] != last:
        offsets.append(last)
    return offsets


class GridPatchSampler(Sampler[PatchLocation]):
    """Every window of a regular grid over every raster (evaluation, whole-raster passes).

    With ``world_size`` > 1 each rank takes every ``world_size``-th window, so ranks never overlap.
    """

    def __init__(
        self,
        rasters: Sequence[GeoRaster],
        patch_size: int = 512,
        stride: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        stride = stride or patch_size
        locations = [
            PatchLocation(index, row, col)
            for index, raster in enumerate(rasters)
            for row in grid_offsets(raster.height, patch_size, stride)
            for col in grid_offsets(raster.width, patch_size, stride)
        ]
        self.locations = locations[rank::world_size]

    def __iter__(self) -> Iterator[PatchLocation]:
        return iter(self.locations)

    def __len__(self) -> int:
        return len(self.locations)


class RandomPatchSampler(Sampler[PatchLocation]):
    """``length`` random windows per epoch, deterministic in (seed, epoch, rank).

    A raster is picked with probability proportional to how many patches it holds (at least one,
    so small rasters are still drawn), then a window uniformly inside it. Call ``set_epoch(epoch)``
    before each epoch for fresh windows; each rank draws its own stream.
    """

    def __init__(
        self,
        rasters: Sequence[GeoRaster],
        patch_size: int,
        length: int,
        seed: int,
        rank: int = 0,
    ) -> None:
        if not rasters:
            raise ValueError("RandomPatchSampler needs at least one raster")
        self.rasters = list(rasters)
        self.patch_size = patch_size
        self.length = length
        self.seed = seed
        self.rank = rank
        weights = np.array([max(1.0, r.height * r.width / patch_size**2) for r in self.rasters])
        self.weights = weights / weights.sum()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[PatchLocation]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        picks = rng.choice(len(self.rasters), size=self.length, p=self.weights)
        for index in picks.tolist():
            raster = self.rasters[index]
            row = int(rng.integers(0, max(0, raster.height - self.patch_size) + 1))
            col = int(rng.integers(0, max(0, raster.width - self.patch_size) + 1))
            yield PatchLocation(index, row, col)

    def __len__(self) -> int:
        return self.length
