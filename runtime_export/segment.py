"""Whole-raster segmentation with the numpy runtime: any size, bounded memory, one set of cluster ids.

``python -m runtime_export.segment --model DIR --input IN.tif --output OUT.tif --k 8 [--dataset ID]``

Pixels are read through the pixel rule (``training_core.datasets.rasters.InputReader``), as in
training: the rule of the dataset ``--dataset`` names, else the model's rule for the raster's dtype,
else R, G, B (and alpha) from the file's colour interpretation (``runtime.select_input_rule``). A
file's own alpha band is honoured when the rule declares none; ``--bands``, ``--alpha-band`` and
``--value-range`` override fields of the rule.

Per-tile clustering would number clusters differently in every tile, so this runs in two passes:

1. fit: encode every tile (window reads), keep the embeddings of cells on a global lattice (every
   ``s``-th stride-4 cell in both directions, ``s`` chosen so at most ``max_fit_cells`` are kept),
   and run the model's soft k-means once over them -> one set of K prototypes for the raster;
2. assign: encode every tile again, assign its cells to the fixed prototypes, smooth, upsample,
   and write the arg-max labels of the tile's core.

Tiles overlap by a margin wider than the encoder's receptive field plus the smoothing, and start on
the stride-4 grid, so a core's labels do not depend on where the tiles are cut: no seams, and a
raster segmented in one tile or in many gives the same labels. Invalid pixels (the rule's validity:
alpha band, the file's mask, nodata) are filled with the model's mean colour before encoding, never
fitted, and written as ``nodata_label``, which the output declares as its nodata value. The output is
a uint8 GeoTIFF with the input's CRS and transform, written to a temporary sibling, read back and
only then renamed into place (``training_core.atomic``): a full disk never replaces a good output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio._err import CPLE_BaseError  # GDAL errors raised on write/close (e.g. "File too large")
from rasterio.errors import RasterioError
from rasterio.windows import Window

from runtime_export.runtime import STRIDE, RuntimeModel, load_runtime_model, select_input_rule, soft_kmeans
from training_core.atomic import atomic_path, verify_raster
from training_core.datasets.pixels import PixelRule
from training_core.datasets.rasters import InputReader, infer_bands, open_raster

DEFAULT_TILE = 512
DEFAULT_MAX_FIT_CELLS = 65_536
DEFAULT_NODATA_LABEL = 255
# Encoder receptive field, in stride-4 cells, beyond a cell's own 4x4 block: conv1 reaches 1 px,
# conv2 2 px, the four residual convs 4 px each (19 px), rounded up with the avg-pool block.
ENCODER_REACH_CELLS = 6


@dataclass(frozen=True)
class TileWindow:
    """A core region (what the tile writes) inside the window it reads (core + margin, clipped to the raster)."""

    core: Window
    read: Window


@dataclass(frozen=True)
class RuleOverrides:
    """Command-line changes to the chosen pixel rule; None keeps the rule's field."""

    bands: tuple[int, int, int] | None = None
    alpha_band: int | None = None  # 0: no alpha band
    value_range: tuple[float, float] | None = None


@dataclass
class SegmentReport:
    input: str
    output: str
    rule: dict[str, Any]  # the PixelRule the input was read with
    rule_source: str
    width: int
    height: int
    k: int
    tiles: int
    fit_cells: int
    lattice_step: int
    nodata_pixels: int
    wall_s: float
    megapixels_per_s: float


def margin_pixels(smooth_iters: int) -> int:
    """Overlap per side: receptive field + smoothing reach + one cell for the bilinear upsampling, in pixels."""
    return STRIDE * (ENCODER_REACH_CELLS + smooth_iters + 2)


def tile_windows(width: int, height: int, tile_size: int, margin: int) -> Iterator[TileWindow]:
    """Row-major tiles of ``tile_size`` (a multiple of 4) with ``margin`` on each side, clipped to the raster."""
    if tile_size % STRIDE or margin % STRIDE:
        raise ValueError(f"tile size {tile_size} and margin {margin} must be multiples of {STRIDE}")
    for row in range(0, height, tile_size):
        for col in range(0, width, tile_size):
            core = Window(col, row, min(tile_size, width - col), min(tile_size, height - row))
            r0, c0 = max(row - margin, 0), max(col - margin, 0)
            r1, c1 = min(row + core.height + margin, height), min(col + core.width + margin, width)
            yield TileWindow(core=core, read=Window(c0, r0, c1 - c0, r1 - r0))


def choose_input_rule(
    meta: dict[str, Any],
    input_path: str | Path,
    dataset_id: str | None = None,
    overrides: RuleOverrides = RuleOverrides(),
) -> tuple[PixelRule, str]:
    """The pixel rule to read ``input_path`` with, and where it came from (see the module docstring)."""
    with open_raster(input_path) as src:
        dtype, colorinterp = src.dtypes[0], [interp.name for interp in src.colorinterp]
    rule = select_input_rule(meta, dtype, dataset_id, own_value_range=overrides.value_range is not None)
    bands, file_alpha = infer_bands(colorinterp)
    if rule is None:
        rule, source = PixelRule(bands=tuple(bands), alpha_band=file_alpha), "file colour interpretation"
    else:
        source = f"dataset {dataset_id}" if dataset_id is not None else f"model input_rules for {dtype}"
        # The file's own alpha band marks invalid pixels, as its mask and nodata do (an RGBA export of
        # an RGB dataset): added unless the rule declares one.
        if rule.alpha_band is None and file_alpha is not None and file_alpha not in rule.bands:
            rule, source = replace(rule, alpha_band=file_alpha), f"{source}, the file's alpha band"
    changes = {key: value for key, value in asdict(overrides).items() if value is not None}
    if not changes:
        return rule, source
    if changes.get("alpha_band") == 0:
        changes["alpha_band"] = None
    return replace(rule, **changes), f"{source}, overridden: {', '.join(sorted(changes))}"


def _read_tile(reader: InputReader, window: Window, fill: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Model RGB of ``window`` with invalid pixels filled, padded (edge) to multiples of 4; and its validity
    (unpadded; None: all valid)."""
    rgb, valid = reader.read(window)
    if valid is not None:
        rgb[:, ~valid] = fill[:, None]  # a fresh array of this read: filled in place
    pad_h, pad_w = (-rgb.shape[1]) % STRIDE, (-rgb.shape[2]) % STRIDE
    if pad_h or pad_w:
        rgb = np.pad(rgb, ((0, 0), (0, pad_h), (0, pad_w)), mode="edge")
    return rgb, valid


def _core_cells(tile: TileWindow) -> tuple[slice, slice]:
    """The core's stride-4 cells inside the read window's cell grid."""
    r = (tile.core.row_off - tile.read.row_off) // STRIDE
    c = (tile.core.col_off - tile.read.col_off) // STRIDE
    return slice(r, r + math.ceil(tile.core.height / STRIDE)), slice(c, c + math.ceil(tile.core.width / STRIDE))


def _valid_cells(valid: np.ndarray) -> np.ndarray:
    """Cells whose 4x4 block is mostly valid pixels (partial edge blocks: of the pixels they have)."""
    h, w = math.ceil(valid.shape[0] / STRIDE), math.ceil(valid.shape[1] / STRIDE)
    padded = np.zeros((h * STRIDE, w * STRIDE), np.float32)
    padded[: valid.shape[0], : valid.shape[1]] = valid
    present = np.zeros_like(padded)
    present[: valid.shape[0], : valid.shape[1]] = 1
    blocks = (h, STRIDE, w, STRIDE)
    return padded.reshape(blocks).sum(axis=(1, 3)) > 0.5 * present.reshape(blocks).sum(axis=(1, 3))


def fit_raster_prototypes(
    model: RuntimeModel, reader: InputReader, k: int, tiles: list[TileWindow], fill: np.ndarray, step: int
) -> tuple[np.ndarray, int]:
    """Pass 1: prototypes [K, D'] from the lattice cells of every tile's core; and how many cells were used."""
    rows, embeddings, seeds = [], [], []
    for tile in tiles:
        rgb, valid = _read_tile(reader, tile.read, fill)
        h, w = rgb.shape[1] // STRIDE, rgb.shape[2] // STRIDE  # the padded tile's cell grid
        rs, cs = _core_cells(tile)
        cell_r = np.arange(h)[rs] + tile.read.row_off // STRIDE  # global cell coordinates
        cell_c = np.arange(w)[cs] + tile.read.col_off // STRIDE
        on_lattice = (cell_r[:, None] % step == 0) & (cell_c[None, :] % step == 0)
        keep = on_lattice if valid is None else on_lattice & _valid_cells(valid)[rs, cs]
        if not keep.any():
            continue  # nothing to fit here (nodata, or off the lattice): skip the encoder
        embedding = model.embed(rgb)
        local = (np.arange(h)[rs][:, None] * w + np.arange(w)[cs][None, :])[keep]
        rows.append((cell_r[:, None] * (1 << 31) + cell_c[None, :])[keep])
        embeddings.append(embedding.embeddings[local])
        seeds.append(embedding.seed_logits[local, :k])
    if not rows:
        raise ValueError(f"{reader.path}: no valid pixels to fit cluster prototypes on (all nodata?)")
    order = np.argsort(np.concatenate(rows), kind="stable")  # raster order: independent of the tiling
    all_embeddings = np.concatenate(embeddings)[order]
    all_seeds = np.concatenate(seeds)[order]
    _, prototypes = soft_kmeans(all_embeddings, all_seeds, model.cluster_iters, model.temperature)
    return prototypes, int(order.size)


def segment_raster(
    model: RuntimeModel,
    input_path: str | Path,
    output_path: str | Path,
    k: int,
    tile_size: int = DEFAULT_TILE,
    max_fit_cells: int = DEFAULT_MAX_FIT_CELLS,
    nodata_label: int = DEFAULT_NODATA_LABEL,
    dataset_id: str | None = None,
    overrides: RuleOverrides = RuleOverrides(),
) -> SegmentReport:
    """Segment a whole GeoTIFF into a uint8 label GeoTIFF with one set of cluster ids."""
    started = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    if not 2 <= k <= model.max_k:
        raise ValueError(f"k={k} is outside [2, max_k={model.max_k}]")
    if 0 <= nodata_label < k or not 0 <= nodata_label <= 255:
        raise ValueError(f"nodata label {nodata_label} must be a uint8 value that is not a cluster id (>= k={k})")
    rule, rule_source = choose_input_rule(model.meta, input_path, dataset_id, overrides)
    with InputReader(input_path, rule) as reader:
        width, height = reader.width, reader.height
        tiles = list(tile_windows(width, height, tile_size, margin_pixels(model.smooth_iters)))
        cells = math.ceil(width / STRIDE) * math.ceil(height / STRIDE)
        step = max(1, math.ceil(math.sqrt(cells / max_fit_cells)))
        fill = np.rint(model.mean.ravel() * model.input_divisor).astype(np.uint8)  # normalises to ~0
        prototypes, fit_cells = fit_raster_prototypes(model, reader, k, tiles, fill, step)
        profile = {
            "driver": "GTiff",
            "width": width,
            "height": height,
            "count": 1,
            "dtype": "uint8",
            "crs": reader.src.crs,
            "transform": reader.src.transform,
            "nodata": nodata_label,
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
            "compress": "deflate",
            "BIGTIFF": "IF_SAFER",
        }
        nodata_pixels = 0
        with atomic_path(output_path, suffix=".tif") as tmp:
            try:
                with rasterio.open(tmp, "w", **profile) as dst:
                    for tile in tiles:
                        labels, invalid = _assign_tile(model, reader, tile, prototypes, fill)
                        if invalid is not None:
                            labels[invalid] = nodata_label
                            nodata_pixels += int(invalid.sum())
                        dst.write(labels[None], window=tile.core)
                verify_raster(tmp)  # GDAL may report a failed write on stderr only and close cleanly
            except (RasterioError, CPLE_BaseError, OSError) as exc:
                raise OSError(
                    f"{output_path}: cannot write the labels, a previous file is left as it was: {exc}"
                ) from None
    wall = time.perf_counter() - started
    return SegmentReport(
        input=str(input_path),
        output=str(output_path),
        rule=rule.to_dict(),
        rule_source=rule_source,
        width=width,
        height=height,
        k=k,
        tiles=len(tiles),
        fit_cells=fit_cells,
        lattice_step=step,
        nodata_pixels=nodata_pixels,
        wall_s=wall,
        megapixels_per_s=width * height / 1e6 / wall,
    )


def _assign_tile(
    model: RuntimeModel, reader: InputReader, tile: TileWindow, prototypes: np.ndarray, fill: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pass 2 for one tile: (uint8 labels of the core, its invalid pixels or None when all are valid)."""
    rgb, valid = _read_tile(reader, tile.read, fill)
    r0, c0 = tile.core.row_off - tile.read.row_off, tile.core.col_off - tile.read.col_off
    core = (slice(r0, r0 + tile.core.height), slice(c0, c0 + tile.core.width))
    invalid = None if valid is None else ~valid[core]
    if invalid is not None and invalid.all():
        return np.zeros(invalid.shape, dtype=np.uint8), invalid  # all invalid: skip the encoder
    embedding = model.embed(rgb)
    labels = model.labels_from_assignment(model.assign(embedding, prototypes), embedding)
    return labels[core], invalid


def _band_list(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected three band numbers R,G,B, e.g. 1,2,3")
    return int(parts[0]), int(parts[1]), int(parts[2])


def _value_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI, e.g. 0,4095") from None
    return lo, hi


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime_export.segment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="artifact directory (model.npz + meta.json)")
    parser.add_argument("--input", type=Path, required=True, help="GeoTIFF to segment (any size, bands and dtype)")
    parser.add_argument("--output", type=Path, required=True, help="label GeoTIFF to write")
    parser.add_argument("--k", type=int, required=True, help="number of clusters")
    parser.add_argument("--tile-size", type=int, default=DEFAULT_TILE, help="core tile side, a multiple of 4")
    parser.add_argument("--max-fit-cells", type=int, default=DEFAULT_MAX_FIT_CELLS, help="cells k-means is fitted on")
    parser.add_argument("--nodata-label", type=int, default=DEFAULT_NODATA_LABEL, help="label written under nodata")
    parser.add_argument("--dataset", help="read the input with this training dataset's pixel rule (see meta.json)")
    parser.add_argument("--bands", type=_band_list, help="source bands read as R,G,B (1-based), e.g. 3,2,1")
    parser.add_argument("--alpha-band", type=int, help="band whose 0 marks invalid pixels; 0: none")
    parser.add_argument("--value-range", type=_value_range, help="LO,HI source values mapped to 0 and 255")
    args = parser.parse_args(argv)
    overrides = RuleOverrides(bands=args.bands, alpha_band=args.alpha_band, value_range=args.value_range)
    try:
        report = segment_raster(
            load_runtime_model(args.model),
            args.input,
            args.output,
            args.k,
            tile_size=args.tile_size,
            max_fit_cells=args.max_fit_cells,
            nodata_label=args.nodata_label,
            dataset_id=args.dataset,
            overrides=overrides,
        )
    except (ValueError, OSError) as exc:  # DatasetError and ArtifactError are ValueErrors
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        return 1
    sys.stdout.write(json.dumps(asdict(report)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
