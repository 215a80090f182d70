"""What a label raster carries so that it looks right when opened, the same from both writers
(``runtime_export.segment`` through rasterio, the QGIS plugin through GDAL).

``label_colours`` (K distinct colours, the nodata label transparent), ``overview_factors`` and ``label_tags``
(model, data versions, K); and beside it ``label_style``, a QGIS style (``.qml``, which QGIS loads with the
raster, ``style_path``) listing the K segments alone, where the GeoTIFF's colour table has 256 entries.
Numpy and the standard library only, with relative imports only: the plugin build vendors this package unchanged.
"""

from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path
from typing import Any

from .pixels import PixelRule
from .runtime import RUNTIME_VERSION
from .whole_raster import DEFAULT_NODATA_LABEL

OVERVIEW_MIN_SIDE = 256  # overviews halve the raster until its longer side would drop below this
TAG_PREFIX = "SEGPIPE_"


def label_colours(k: int, nodata_label: int = DEFAULT_NODATA_LABEL) -> dict[int, tuple[int, int, int, int]]:
    """RGBA colour of every label: K distinct colours (hues a golden angle apart, so neighbouring ids differ
    strongly at any K) and the nodata label transparent."""
    colours = {}
    for label in range(k):
        red, green, blue = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.75 - 0.25 * (label % 2), 0.95)
        colours[label] = (round(red * 255), round(green * 255), round(blue * 255), 255)
    colours[nodata_label] = (0, 0, 0, 0)
    return colours


def label_style(k: int, nodata_label: int = DEFAULT_NODATA_LABEL) -> str:
    """A QGIS layer style (``.qml``): a paletted renderer with one entry per segment, ``segment 0`` ... ``segment K-1``,
    in ``label_colours``; the nodata label is the raster's nodata, so QGIS draws it transparent."""
    entries = "\n".join(
        f'        <paletteEntry value="{label}" color="#{red:02x}{green:02x}{blue:02x}" alpha="{alpha}" '
        f'label="segment {label}"/>'
        for label, (red, green, blue, alpha) in label_colours(k, nodata_label).items()
        if label != nodata_label
    )
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22" styleCategories="Symbology">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <rasterTransparency/>
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation saturation="0" colorizeOn="0" grayscaleMode="0" colorizeStrength="100"/>
    <rasterresampler maxOversampling="2"/>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
"""


def style_path(output: str | Path) -> Path:
    """Where QGIS looks for a raster's default style: the same name with ``.qml``."""
    return Path(output).with_suffix(".qml")


def overview_factors(width: int, height: int) -> list[int]:
    """Decimation factors 2, 4, 8, ... while the overview's longer side stays at least ``OVERVIEW_MIN_SIDE``."""
    factors, factor = [], 2
    while math.ceil(max(width, height) / factor) >= OVERVIEW_MIN_SIDE:
        factors.append(factor)
        factor *= 2
    return factors


def label_tags(meta: dict[str, Any], k: int, nodata_label: int, rule: PixelRule) -> dict[str, str]:
    """Metadata tags of a label raster: which model (config hash, code and data versions) made it, with what K."""
    lineage = meta.get("lineage", {})
    tags = {
        "K": str(k),
        "NODATA_LABEL": str(nodata_label),
        "RUNTIME_VERSION": RUNTIME_VERSION,
        "CONFIG_HASH": str(lineage.get("config_hash", "")),
        "CODE_VERSION": str(lineage.get("code_version", "")),
        "DATA_VERSIONS": json.dumps(lineage.get("data_versions", {}), sort_keys=True),
        "INPUT_RULE": json.dumps(rule.to_dict(), sort_keys=True),
    }
    return {f"{TAG_PREFIX}{key}": value for key, value in tags.items()}
