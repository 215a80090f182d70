"""Rasterio I/O under the pixel rule: the one way every stage reads pixels.

- ``open_raster``: open a file or fail with a ``DatasetError`` naming it.
- ``RasterFacts`` / ``raster_facts``: what a file's metadata says (``training_core.datasets.scan.check_against``
  compares them with a header modality); ``check_target_fits`` a target with its input.
- ``read_item``: the model pixels (uint8 RGB), validity and labels of a whole raster or of one window,
  reading only that window. Shard building, the loaders, evaluation and ``runtime_export.segment`` all
  read through it (``InputReader`` keeps one raster open for many windows).
- ``read_blocks``: a raster's raw values in row strips of bounded size (validation, copying).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

from runtime_export.errors import DatasetError
from runtime_export.numpy_runtime.pixels import PixelRule

# Pixels read per block when streaming a raster: bounds memory for rasters of any size.
BLOCK_BYTES = 32 * 1024 * 1024
# Metres per degree east (at the equator; times cos(latitude)) and north: a local flat earth, within about half
# a percent, plenty for telling a user what resolution a model was trained on.
METRES_PER_DEGREE_EAST, METRES_PER_DEGREE_NORTH = 111_320.0, 110_574.0
# Pixel sizes are rounded so floating-point noise (0.30000000000001137) stays out of headers and data versions.
PIXEL_SIZE_DIGITS = 4


@dataclass(frozen=True)
class RasterFacts:
    path: Path
    count: int
    dtype: str
    height: int
    width: int
    crs: str | None
    georeferenced: bool
    nodata: float | None
    colorinterp: tuple[str, ...] = ()
    pixel_size_m: tuple[float, float] | None = None  # ground metres per pixel (x, y); None: not georeferenced


@dataclass(frozen=True)
class Tile:
    """Pixels of a raster (or of a window of it) in the model's domain."""

    image: np.ndarray  # uint8 [3, H, W]
    target: np.ndarray | None  # integer [H, W], 0 = ignore (also under invalid input pixels)
    valid: np.ndarray | None  # bool [H, W]; None = every pixel valid (no allocation)

    @property
    def height(self) -> int:
        return self.image.shape[1]

    @property
    def width(self) -> int:
        return self.image.shape[2]


def open_raster(path: str | Path) -> rasterio.DatasetReader:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError:
        raise DatasetError(f"{path}: cannot open as a GeoTIFF (missing, truncated or not a TIFF)") from None


def raster_facts(src: rasterio.DatasetReader, path: Path) -> RasterFacts:
    dtypes = set(src.dtypes)
    if len(dtypes) != 1:
        raise DatasetError(f"{path}: dtype: bands have different dtypes {sorted(dtypes)}")
    crs = src.crs.to_string() if src.crs else None
    georeferenced = crs is not None and not src.transform.is_identity
    return RasterFacts(
        path,
        src.count,
        src.dtypes[0],
        src.height,
        src.width,
        crs,
        georeferenced,
        src.nodata,
        tuple(interp.name for interp in src.colorinterp),
        ground_pixel_size(src.crs, src.transform, src.width, src.height) if georeferenced else None,
    )


def ground_pixel_size(crs: CRS, transform: Affine, width: int, height: int) -> tuple[float, float] | None:
    """Ground metres per pixel (x, y) at the raster's centre, to ``PIXEL_SIZE_DIGITS`` significant digits.

    Projected CRSs: the pixel's sides in the CRS's linear unit, converted to metres. Mercator (EPSG:3857, the
    web tiles) stretches by 1/cos(latitude), 2x at 60 degrees, so that stretch is taken out at the centre
    latitude; other map projections stay within a fraction of a percent and are taken as they are. Geographic
    CRSs: degrees at the centre latitude. None for a CRS with neither (an engineering or local CRS).
    """
    centre_x, centre_y = transform @ (width / 2, height / 2)
    try:
        if crs.is_geographic:
            degrees = math.degrees(crs.units_factor[1])  # the CRS's angular unit in degrees
            latitude = math.radians(centre_y * degrees)
            east = degrees * METRES_PER_DEGREE_EAST * math.cos(latitude)
            north = degrees * METRES_PER_DEGREE_NORTH
        else:
            east = north = crs.linear_units_factor[1] * _mercator_ground_scale(crs, centre_x, centre_y)
    except CRSError:
        return None
    x = math.hypot(transform.a * east, transform.d * north)
    y = math.hypot(transform.b * east, transform.e * north)
    return float(f"{x:.{PIXEL_SIZE_DIGITS}g}"), float(f"{y:.{PIXEL_SIZE_DIGITS}g}")


def _mercator_ground_scale(crs: CRS, x: float, y: float) -> float:
    """Ground length of one CRS unit at (x, y) over its nominal length: cos(latitude) / k0 in a Mercator
    projection (k0 from its standard parallel or scale factor), 1 in any other."""
    params = crs.to_dict()
    if params.get("proj") != "merc":
        return 1.0
    if "lat_ts" in params:
        k0 = math.cos(math.radians(params["lat_ts"]))
    else:
        k0 = float(params.get("k", params.get("k_0", 1.0)))
    _, (latitude,) = warp_transform(crs, "EPSG:4326", [x], [y])
    return math.cos(math.radians(latitude)) / k0


def check_target_fits(target: RasterFacts, input_: RasterFacts) -> None:
    if (target.height, target.width) != (input_.height, input_.width):
        raise DatasetError(
            f"{target.path}: size: target is {target.width}x{target.height} (WxH) but its input "
            f"{input_.path} is {input_.width}x{input_.height}"
        )
    if target.crs != input_.crs and target.crs is not None and input_.crs is not None:
        raise DatasetError(f"{target.path}: crs: target is in {target.crs} but its input {input_.path} in {input_.crs}")


def has_mask_band(src: rasterio.DatasetReader) -> bool:
    """The raster carries its own per-dataset mask (an internal or .msk mask band, not alpha or nodata)."""
    return src.mask_flag_enums[0] == [MaskFlags.per_dataset]


class InputReader:
    """One input raster opened for windowed reads under a pixel rule."""

    def __init__(self, path: str | Path, rule: PixelRule) -> None:
        self.path = Path(path)
        self.rule = rule
        self.src = open_raster(path)
        try:
            if self.src.count < rule.band_count_needed:
                raise DatasetError(
                    f"{path}: bands: has {self.src.count} bands, the rule reads bands {list(rule.indexes)}"
                )
            try:
                rule.check_dtype(self.src.dtypes[0])
            except ValueError as exc:
                raise DatasetError(f"{path}: {exc}") from None
            self._mask_band = has_mask_band(self.src)
        except BaseException:
            self.src.close()
            raise

    @property
    def height(self) -> int:
        return self.src.height

    @property
    def width(self) -> int:
        return self.src.width

    def read(self, window: Window | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(uint8 RGB [3, h, w], valid [h, w] or None) of ``window`` (None: the whole raster)."""
        try:
            raw = self.src.read(self.rule.indexes, window=window)
            mask = self.src.read_masks(1, window=window) > 0 if self._mask_band else None
        except RasterioError:
            raise DatasetError(f"{self.path}: cannot read pixels (truncated or corrupt TIFF?)") from None
        return self.rule.apply(raw, nodata=self.src.nodata, mask=mask)

    def close(self) -> None:
        self.src.close()

    def __enter__(self) -> InputReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_labels(path: str | Path, window: Window | None, shape: tuple[int, int]) -> np.ndarray:
    """A target's first band over ``window`` (its nodata as 0, ignored); its size must be ``shape``."""
    with open_raster(path) as tgt:
        if (tgt.height, tgt.width) != shape:
            raise DatasetError(
                f"{path}: size: target is {tgt.width}x{tgt.height} (WxH) but its input is {shape[1]}x{shape[0]}"
            )
        try:
            labels = tgt.read(1, window=window)
        except RasterioError:
            raise DatasetError(f"{path}: cannot read pixels (truncated or corrupt TIFF?)") from None
        if tgt.nodata is not None:
            labels[labels == tgt.nodata] = 0
    return labels


def read_item(
    input_path: str | Path,
    target_path: str | Path | None,
    rule: PixelRule,
    choose_window: Callable[[int, int], Window] | None = None,
) -> Tile:
    """Model pixels, validity and labels of a whole raster, or of the window ``choose_window(height, width)``
    picks once the raster's size is known (one open, and only that window's pixels read). Labels under
    invalid input pixels are 0 (ignored)."""
    with InputReader(input_path, rule) as reader:
        window = None if choose_window is None else choose_window(reader.height, reader.width)
        image, valid = reader.read(window)
        shape = (reader.height, reader.width)
    target = None
    if target_path is not None:
        target = read_labels(target_path, window, shape)
        if valid is not None:
            target[~valid] = 0
    return Tile(image=image, target=target, valid=valid)


def read_blocks(src: rasterio.DatasetReader) -> Iterator[tuple[Window, np.ndarray]]:
    """All bands' raw values in row strips of at most BLOCK_BYTES; a truncated file fails here, named."""
    row_bytes = src.width * src.count * np.dtype(src.dtypes[0]).itemsize
    rows = max(1, BLOCK_BYTES // max(1, row_bytes))
    for top in range(0, src.height, rows):
        window = Window(0, top, src.width, min(rows, src.height - top))
        try:
            block = src.read(window=window)
        except RasterioError:
            raise DatasetError(f"{src.name}: cannot read pixels (truncated or corrupt TIFF?)") from None
        yield window, block


def distinct_values(block: np.ndarray) -> set[int]:
    """Distinct pixel values; bincount for small unsigned ints is ~10x faster than np.unique on masks."""
    if block.dtype in (np.uint8, np.uint16):
        return set(np.flatnonzero(np.bincount(block.ravel())).tolist())
    return {int(v) for v in np.unique(block)}
