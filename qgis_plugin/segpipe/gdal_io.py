"""GDAL I/O for the plugin: the input read under the model's pixel rule, the labels written atomically.

Inside QGIS there is no rasterio, so this mirrors ``runtime_export.rasters.InputReader`` and
``runtime_export.segment``'s writer with ``osgeo.gdal``: the same bands, the same nodata value (band 1's),
the same per-dataset mask, the same paletted, tiled, deflate GeoTIFF with overviews and tags.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from osgeo import gdal, gdal_array

from .numpy_runtime.label_style import label_colours, label_style, label_tags, overview_factors, style_path
from .numpy_runtime.pixels import PixelRule
from .numpy_runtime.whole_raster import Window

# As in runtime_export.segment: GDAL's block cache (QGIS leaves GDAL's default, 5% of RAM) would grow with the
# raster during the two passes; this cap holds a row of tiles of a wide striped input.
BLOCK_CACHE_BYTES = 256 * 2**20
CREATE_OPTIONS = ["TILED=YES", "BLOCKXSIZE=256", "BLOCKYSIZE=256", "COMPRESS=DEFLATE", "BIGTIFF=IF_SAFER"]


@contextmanager
def bounded_block_cache(limit: int = BLOCK_CACHE_BYTES) -> Iterator[None]:
    """GDAL's block cache at most ``limit`` bytes for the block, then as it was (a process-wide setting)."""
    previous = gdal.GetCacheMax()
    gdal.SetCacheMax(min(previous, limit))
    try:
        yield
    finally:
        gdal.SetCacheMax(previous)


def open_input(path: str | Path) -> gdal.Dataset:
    dataset = gdal.OpenEx(str(path), gdal.OF_RASTER | gdal.OF_READONLY)
    if dataset is None:
        raise ValueError(f"{path}: cannot open as a raster ({gdal.GetLastErrorMsg() or 'unknown format'})")
    return dataset


def raster_dtype(dataset: gdal.Dataset) -> str:
    """The numpy dtype name of band 1 (``uint8``, ``uint16``...), as rasterio names it."""
    return np.dtype(gdal_array.GDALTypeCodeToNumericTypeCode(dataset.GetRasterBand(1).DataType)).name


def colour_interpretation(dataset: gdal.Dataset) -> list[str]:
    bands = (dataset.GetRasterBand(number) for number in range(1, dataset.RasterCount + 1))
    return [gdal.GetColorInterpretationName(band.GetColorInterpretation()) for band in bands]


class GdalSource:
    """``whole_raster.PixelSource`` over a GDAL dataset: the rule's bands, its scaling and its validity."""

    def __init__(self, path: str | Path, dataset: gdal.Dataset, rule: PixelRule) -> None:
        self.path, self.dataset, self.rule = Path(path), dataset, rule
        self.width, self.height = dataset.RasterXSize, dataset.RasterYSize
        if dataset.RasterCount < rule.band_count_needed:
            needed = list(rule.indexes)
            raise ValueError(f"{path}: bands: has {dataset.RasterCount} bands, the rule reads bands {needed}")
        try:
            rule.check_dtype(raster_dtype(dataset))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        first = dataset.GetRasterBand(1)
        self.nodata = first.GetNoDataValue()
        # Only a per-dataset mask (internal or .msk) is a mask of its own; alpha and nodata masks are the rule's.
        self.mask = first.GetMaskBand() if first.GetMaskFlags() == gdal.GMF_PER_DATASET else None

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
        area = (window.col_off, window.row_off, window.width, window.height)
        raw = self.dataset.ReadAsArray(*area, band_list=list(self.rule.indexes))
        mask = None if self.mask is None else self.mask.ReadAsArray(*area)
        if raw is None or (self.mask is not None and mask is None):
            raise ValueError(f"{self.path}: cannot read pixels ({gdal.GetLastErrorMsg() or 'truncated or corrupt?'})")
        return self.rule.apply(raw, nodata=self.nodata, mask=None if mask is None else mask > 0)


class LabelWriter:
    """The label GeoTIFF, written to a hidden temporary sibling of ``path`` and renamed onto it by ``commit``:
    until then (a failure, a cancel) ``path`` is untouched, and ``discard`` removes every trace."""

    def __init__(
        self,
        path: str | Path,
        like: gdal.Dataset,
        meta: dict[str, Any],
        k: int,
        nodata_label: int,
        rule: PixelRule,
    ) -> None:
        self.path, self.style = Path(path), label_style(k, nodata_label)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tif", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(name)
        width, height = like.RasterXSize, like.RasterYSize
        self.dataset = gdal.GetDriverByName("GTiff").Create(name, width, height, 1, gdal.GDT_Byte, CREATE_OPTIONS)
        if self.dataset is None:
            self.discard()
            raise OSError(f"{self.path}: cannot create the output ({gdal.GetLastErrorMsg()})")
        self.dataset.SetGeoTransform(like.GetGeoTransform())
        self.dataset.SetProjection(like.GetProjection())
        self.dataset.SetMetadata(label_tags(meta, k, nodata_label, rule))
        self.band = self.dataset.GetRasterBand(1)
        self.band.SetNoDataValue(nodata_label)
        table = gdal.ColorTable()
        for label, colour in label_colours(k, nodata_label).items():
            table.SetColorEntry(label, colour)
        self.band.SetRasterColorTable(table)
        self.band.SetRasterColorInterpretation(gdal.GCI_PaletteIndex)

    def write(self, labels: np.ndarray, window: Window) -> None:
        if self.band.WriteArray(labels, window.col_off, window.row_off) != gdal.CE_None:
            raise OSError(f"{self.path}: cannot write the labels ({gdal.GetLastErrorMsg()})")

    def commit(self) -> None:
        """Overviews, flush, read back, ordinary permissions, rename into place; then the ``.qml`` style beside it."""
        factors = overview_factors(self.dataset.RasterXSize, self.dataset.RasterYSize)
        if factors and self.dataset.BuildOverviews("NEAREST", factors) != gdal.CE_None:
            raise OSError(f"{self.path}: cannot build overviews ({gdal.GetLastErrorMsg()})")
        self.dataset.FlushCache()
        self.band = self.dataset = None  # closes the file
        gdal.ErrorReset()
        written = gdal.Open(str(self.tmp))
        # A full disk under a compressed GeoTIFF may only show when the blocks are read back.
        if written is None or written.GetRasterBand(1).Checksum() < 0 or gdal.GetLastErrorType() >= gdal.CE_Failure:
            raise OSError(f"{self.path}: the written labels do not read back ({gdal.GetLastErrorMsg()})")
        written = None
        _replace(self.tmp, self.path)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".qml", dir=self.path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as style:
            style.write(self.style)
        _replace(Path(name), style_path(self.path))

    def discard(self) -> None:
        self.band = self.dataset = None
        for leftover in (self.tmp, Path(f"{self.tmp}.aux.xml"), Path(f"{self.tmp}.ovr")):
            leftover.unlink(missing_ok=True)


def _replace(tmp: Path, path: Path) -> None:
    """Ordinary permissions (``mkstemp`` gives 0600), then rename onto ``path``."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)
