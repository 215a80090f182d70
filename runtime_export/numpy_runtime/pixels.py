"""The pixel rule: which source bands are R, G, B, how their values map to the model's 0..255, which
pixels are valid. Numpy alone: the numpy runtime (and the QGIS plugin through it) applies this same
rule to raw rasters, so the pixels the model sees are the same in training, evaluation and segmentation.

Validity, one rule everywhere: a pixel is invalid when the declared alpha band is 0 there, or the
raster's own per-dataset mask says so, or all three selected bands equal the nodata value (NaN counts
as nodata in float rasters). Invalid pixels keep their scaled values; callers mask them.

Scaling: uint8 sources without a ``value_range`` pass through unchanged. Any other source needs
``value_range: (lo, hi)``: ``v -> clip(rint((v - lo) * 255 / (hi - lo)), 0, 255)``, computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_BANDS = (1, 2, 3)


@dataclass(frozen=True)
class PixelRule:
    """How one dataset's raw input bands become model pixels. Band numbers are 1-based, like GDAL's."""

    bands: tuple[int, int, int] = DEFAULT_BANDS
    alpha_band: int | None = None
    nodata: float | None = None  # used where the raster declares no nodata of its own
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if len(self.bands) != 3 or not all(is_int(band) and band >= 1 for band in self.bands):
            raise ValueError(f"bands {self.bands}: need three 1-based band numbers (R, G, B)")
        if self.alpha_band is not None and not (
            is_int(self.alpha_band) and self.alpha_band >= 1 and self.alpha_band not in self.bands
        ):
            raise ValueError(f"alpha_band {self.alpha_band!r}: must be a 1-based band that is not one of {self.bands}")
        if self.nodata is not None and not is_number(self.nodata):  # NaN and infinities are float nodata values
            raise ValueError(f"nodata {self.nodata!r}: must be a number or null")
        if self.value_range is not None:
            check_value_range(self.value_range)

    @property
    def indexes(self) -> tuple[int, ...]:
        """The bands to read, in order: R, G, B, then the alpha band if declared."""
        return self.bands if self.alpha_band is None else (*self.bands, self.alpha_band)

    @property
    def band_count_needed(self) -> int:
        return max(self.indexes)

    def check_dtype(self, dtype: str) -> None:
        """A source dtype this rule cannot bring to uint8 is a ValueError naming the missing rule."""
        if self.value_range is None and dtype != "uint8":
            raise ValueError(f"dtype {dtype} has no scaling rule: declare value_range [lo, hi] (uint8 passes through)")

    def apply(
        self, raw: np.ndarray, nodata: float | None = None, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``raw`` [len(indexes), H, W] as read in ``indexes`` order -> (uint8 RGB [3, H, W], valid [H, W] or None).

        ``nodata`` is the raster's own nodata value (the rule's is the fallback); ``mask`` its
        per-dataset mask (True = valid), if it has one. ``valid`` None means every pixel is valid.
        """
        rgb = raw[:3]
        self.check_dtype(rgb.dtype.name)
        return self.to_uint8(rgb), self.valid_mask(raw, nodata, mask)

    def valid_mask(
        self, raw: np.ndarray, nodata: float | None = None, mask: np.ndarray | None = None
    ) -> np.ndarray | None:
        """The validity rule alone (see the module docstring); None means every pixel is valid."""
        rgb = raw[:3]
        valid = None if self.alpha_band is None else raw[3] > 0
        if mask is not None:
            valid = mask if valid is None else valid & mask
        nodata = self.nodata if nodata is None else nodata
        if nodata is not None:
            empty = np.isnan(rgb).all(axis=0) if np.isnan(nodata) else (rgb == nodata).all(axis=0)
            valid = ~empty if valid is None else valid & ~empty
        if rgb.dtype.kind == "f":
            finite = np.isfinite(rgb).all(axis=0)
            valid = finite if valid is None else valid & finite
        return valid

    def to_uint8(self, rgb: np.ndarray) -> np.ndarray:
        """Source values -> the model's uint8 domain (see the module docstring)."""
        if self.value_range is None:
            return np.ascontiguousarray(rgb, dtype=np.uint8)
        lo, hi = self.value_range
        scaled = (rgb.astype(np.float64) - lo) * 255.0 / (hi - lo)
        scaled = np.nan_to_num(scaled, nan=0.0)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (``meta.json``'s input rules)."""
        return {
            "bands": list(self.bands),
            "alpha_band": self.alpha_band,
            "nodata": self.nodata,
            "value_range": None if self.value_range is None else list(self.value_range),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PixelRule:
        """The inverse of ``to_dict``; a field of the wrong type or shape is a ValueError naming it."""
        bands, value_range = data.get("bands", DEFAULT_BANDS), data.get("value_range")
        if not isinstance(bands, list | tuple):
            raise ValueError(f"bands {bands!r}: need three 1-based band numbers (R, G, B)")
        if value_range is not None:
            value_range = check_value_range(value_range)
        return cls(
            bands=tuple(bands), alpha_band=data.get("alpha_band"), nodata=data.get("nodata"), value_range=value_range
        )


def check_value_range(value_range: object) -> tuple[float, float]:
    """``(lo, hi)`` as floats, or a ValueError: two finite numbers, lo below hi (an infinite or NaN bound scales
    every value to 0 or NaN, and lo >= hi has no scale at all)."""
    if not (
        isinstance(value_range, list | tuple)
        and len(value_range) == 2
        and all(is_number(bound) and math.isfinite(bound) for bound in value_range)
        and value_range[0] < value_range[1]
    ):
        raise ValueError(f"value_range {value_range!r}: need [lo, hi], two finite numbers with lo below hi")
    return float(value_range[0]), float(value_range[1])


def is_number(value: object) -> bool:
    """An int or float, numpy's included; a bool is not a number here (JSON ``true`` is not ``1``)."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def is_int(value: object) -> bool:
    """An int, numpy's included, not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def infer_bands(colorinterp: Sequence[str]) -> tuple[list[int], int | None]:
    """(R, G, B band numbers, alpha band or None) from the bands' GDAL colour interpretation names (any case:
    rasterio says ``red``, GDAL ``Red``); the first three bands when they name no red, green and blue (e.g.
    NAIP's RGBN, whose bands GDAL calls gray/undefined)."""
    where = {name.lower(): number for number, name in enumerate(colorinterp, start=1)}
    rgb = [where.get(name) for name in ("red", "green", "blue")]
    bands = rgb if None not in rgb else list(DEFAULT_BANDS)
    alpha = where.get("alpha")
    return bands, alpha if alpha not in bands else None
