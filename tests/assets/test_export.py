"""The export assets' parity tiles are model pixels read under each dataset's pixel rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from assets.export import PARITY_TILE_SIZE, PARITY_TILES, parity_tiles
from training_core.datasets.schema import HEADER_FILENAME, load_header
from training_core.shards import build_shards


def test_parity_tiles_of_a_uint16_four_band_dataset(tmp_path: Path) -> None:
    images = tmp_path / "extracted" / "naip" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    geo = {"crs": "EPSG:3857", "transform": Affine(1, 0, 500, 0, -1, 900), "width": 280, "height": 300}
    raws = {}
    for name in ("a", "b", "c"):
        raws[name] = rng.integers(300, 4000, (4, 300, 280), dtype=np.uint16)
        with rasterio.open(images / f"{name}.tif", "w", driver="GTiff", count=4, dtype="uint16", **geo) as dst:
            dst.write(raws[name])
    processed = tmp_path / "processed"
    build_shards(tmp_path / "extracted", processed, "naip", workers=1)
    rule = load_header(processed / "naip" / HEADER_FILENAME).pixel_rule
    assert rule.value_range is not None

    tiles = parity_tiles(str(processed), ["naip"])
    assert len(tiles) == PARITY_TILES
    expected = [rule.to_uint8(raw[:3, :PARITY_TILE_SIZE, :PARITY_TILE_SIZE]) for raw in raws.values()]
    for tile in tiles:
        assert tile.dtype == np.uint8 and tile.shape == (3, PARITY_TILE_SIZE, PARITY_TILE_SIZE)
        assert any(np.array_equal(tile, candidate) for candidate in expected)
