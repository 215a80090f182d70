"""Real-looking non-uint8 imagery generated at test time from the bundled sample tiles.

``make_rgbn_uint16_cog`` turns 20 kampala_buildings tiles (its 16 labeled ones and 4 unlabeled ones)
into a dataset of 4-band uint16 Cloud-Optimized GeoTIFFs stored B, G, R, NIR, the way many satellite and
aerial products ship: colour interpretation blue, green, red, undefined (so header inference reads bands
[3, 2, 1]), values ``rgb * 40 + 300`` (NIR from the green band), and a nodata border (0 in every band,
nodata=0) whose labels are 0 (ignored). CRS and transform are the source tile's. Deterministic: the same
bytes on every run.

``scale_by_hand`` is the documented scaling rule (``runtime_export.numpy_runtime.pixels``) written again with
numpy alone, so a test comparing against it does not compare the pixel rule with itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp

SAMPLE_KAMPALA = Path(__file__).resolve().parents[1] / "sample_data" / "extracted" / "kampala_buildings"
N_UNLABELED = 4
BORDER = 16  # top rows and left columns of nodata
GAIN, OFFSET = 40, 300  # uint16 value = uint8 value * GAIN + OFFSET
NIR_GAIN, NIR_OFFSET = 30, 500  # NIR = green (uint8) * NIR_GAIN + NIR_OFFSET
STORED_ORDER = (ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined)
RGB_BANDS = (3, 2, 1)  # 1-based R, G, B in the stored B, G, R, NIR order


def source_items() -> tuple[list[str], list[str]]:
    """(labeled, unlabeled) kampala item ids used: every tile with a mask, and the first 4 without one."""
    images = sorted(p.stem for p in (SAMPLE_KAMPALA / "images").glob("*.tif"))
    labeled = sorted(p.stem for p in (SAMPLE_KAMPALA / "masks").glob("*.tif"))
    unlabeled = [item_id for item_id in images if item_id not in set(labeled)][:N_UNLABELED]
    return labeled, unlabeled


def border_mask(height: int, width: int) -> np.ndarray:
    """True on the nodata border (the top ``BORDER`` rows and the left ``BORDER`` columns)."""
    border = np.zeros((height, width), dtype=bool)
    border[:BORDER, :] = True
    border[:, :BORDER] = True
    return border


def rgbn_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [3, H, W] -> uint16 B, G, R, NIR [4, H, W] with the nodata border (0 in every band)."""
    wide = rgb.astype(np.uint16)
    r, g, b = (wide[i] * GAIN + OFFSET for i in range(3))
    nir = wide[1] * NIR_GAIN + NIR_OFFSET
    out = np.stack([b, g, r, nir]).astype(np.uint16)
    out[:, border_mask(*rgb.shape[1:])] = 0
    return out


def make_rgbn_uint16_cog(root: Path, dataset_id: str = "rgbn_uint16_cog") -> Path:
    """Write ``root/<dataset_id>/images/*.tif`` (uint16 B, G, R, NIR COGs) and ``masks/*.tif``; returns the folder."""
    dataset = Path(root) / dataset_id
    (dataset / "images").mkdir(parents=True)
    (dataset / "masks").mkdir()
    labeled, unlabeled = source_items()
    for item_id in sorted([*labeled, *unlabeled]):
        with rasterio.open(SAMPLE_KAMPALA / "images" / f"{item_id}.tif") as src:
            rgb, crs, transform = src.read(), src.crs, src.transform
        profile = {
            "driver": "COG",
            "width": rgb.shape[2],
            "height": rgb.shape[1],
            "count": 4,
            "dtype": "uint16",
            "crs": crs,
            "transform": transform,
            "nodata": 0,
            "blocksize": 128,  # 256 px tiles: two levels of tiles, so the COG has an overview
            "compress": "DEFLATE",
            "overview_resampling": "nearest",
        }
        with rasterio.open(dataset / "images" / f"{item_id}.tif", "w", **profile) as dst:
            dst.write(rgbn_from_rgb(rgb))
            dst.colorinterp = STORED_ORDER
        if item_id in labeled:
            with rasterio.open(SAMPLE_KAMPALA / "masks" / f"{item_id}.tif") as src:
                labels, mask_profile = src.read(), src.profile
            labels[:, border_mask(*labels.shape[1:])] = 0
            with rasterio.open(dataset / "masks" / f"{item_id}.tif", "w", **mask_profile) as dst:
                dst.write(labels)
    return dataset


def scale_by_hand(raw_bgrn: np.ndarray, lo: float, hi: float, bands: Sequence[int] = RGB_BANDS) -> np.ndarray:
    """Raw bands [N, H, W] -> uint8 RGB [3, H, W] by the documented rule, independently of ``PixelRule``:
    R, G, B are the 1-based ``bands``; each value ``v`` becomes ``clip(rint((v - lo) * 255 / (hi - lo)), 0, 255)``."""
    picked = np.stack([raw_bgrn[band - 1] for band in bands]).astype(np.float64)
    scaled = np.rint((picked - lo) * 255.0 / (hi - lo))
    return np.clip(scaled, 0, 255).astype(np.uint8)
