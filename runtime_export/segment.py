"""Whole-raster segmentation with the numpy runtime: any size, bounded memory, one set of cluster ids.

``python -m runtime_export.segment --model DIR --input IN.tif --output OUT.tif --k 8 [--dataset ID]``

Pixels are read through the pixel rule (``training_core.datasets.rasters.InputReader``), as in
training: the rule of the dataset ``--dataset`` names, else the model's rule for the raster's dtype,
else R, G, B (and alpha) from the file's colour interpretation (``runtime.select_input_rule``). A
file's own alpha band is honoured when the rule declares none; ``--bands``, ``--alpha-band`` and
``--value-range`` override fields of the rule.

Per-tile clustering would number clusters differently in every tile, so this runs in two passes, and
encodes each tile once:

1. encode and fit: encode every tile (window reads); write its core cells' embeddings to a scratch
   file; keep the cells on a global lattice (``runtime_export.prototypes``: every ``s``-th stride-4
   cell in both directions, ``s`` chosen so at most ``max_fit_cells`` are kept) and run the model's
   soft k-means once over them -> one set of K prototypes for the raster, as evaluation fits them;
2. assign: read each tile's cells back from the scratch file (its core and the cells its labels
   reach), assign them to the fixed prototypes, smooth, upsample, and write the arg-max labels of
   the tile's core.

The scratch file holds the clustered embedding of every stride-4 cell, float32 [H/4, W/4, D']:
about W * H * D' bytes / 4 (1.7 GB for 8192 x 8192 with D' = 99), reserved up front (a full disk
fails at the start), in a temporary folder beside the output or under ``--scratch-dir``, and removed
at the end, failure or not (``scratch_bytes`` in the report). Memory stays at one tile plus the
lattice sample. Progress goes to stderr (``--quiet``: none), one line every few seconds and one at
the end of each pass: ``segment: pass 1/2 tile 12/64, 3.4 MP/s``; stdout is the one-line JSON report.

Tiles overlap by a margin wider than the encoder's receptive field and start on the stride-4 grid,
so a core cell's embedding does not depend on where the tiles are cut, and pass 2 sees the raster's
cells as one grid: no seams, and a raster segmented in one tile or in many gives the same labels.
Invalid pixels (the rule's validity: alpha band, the file's mask, nodata) are filled with the model's
mean colour before encoding, never fitted, and written as ``nodata_label``, which the output declares
as its nodata value. The output is a uint8 GeoTIFF with the input's CRS and transform, written to a
temporary sibling, read back and only then renamed into place (``training_core.atomic``): a full
disk never replaces a good output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import rasterio
from rasterio._err import CPLE_BaseError  # GDAL errors raised on write/close (e.g. "File too large")
from rasterio.errors import RasterioError
from rasterio.windows import Window

from runtime_export.prototypes import (
    DEFAULT_MAX_FIT_CELLS,
    PrototypeSample,
    cell_grid,
    encoder_input,
    lattice_step,
    valid_cells,
)
from runtime_export.runtime import STRIDE, Embedding, RuntimeModel, load_runtime_model, select_input_rule
from training_core.atomic import atomic_path, verify_raster
from training_core.datasets.pixels import PixelRule
from training_core.datasets.rasters import InputReader, infer_bands, open_raster

DEFAULT_TILE = 512
DEFAULT_NODATA_LABEL = 255
# Encoder receptive field, in stride-4 cells, beyond a cell's own 4x4 block: conv1 reaches 1 px,
# conv2 2 px, the four residual convs 4 px each (19 px), rounded up with the avg-pool block.
ENCODER_REACH_CELLS = 6
# GDAL's block cache (default: 5% of RAM) would grow with the raster; this holds a row of tiles of a striped
# 4-band uint16 input 50,000 px wide, so each strip is still decoded once per pass.
GDAL_CACHE_BYTES = 256 * 2**20
PROGRESS_SECONDS = 5.0  # at most one progress line per interval, plus the last tile of each pass
SCRATCH_PREFIX = ".segment-scratch-"


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
    scratch_bytes: int  # the cell embeddings spilled between the passes (removed at the end)
    wall_s: float
    megapixels_per_s: float


def margin_pixels(smooth_iters: int) -> int:
    """Overlap per side of the encoded windows, in pixels. The encoder's receptive field: a core cell's embedding
    does not depend on the tiling. And at least a label's reach: no valid pixel's label depends on the cells of a
    tile whose read window is all invalid, so such a tile is never encoded."""
    return STRIDE * max(ENCODER_REACH_CELLS, label_reach_cells(smooth_iters))


def label_reach_cells(smooth_iters: int) -> int:
    """Cells on each side of a pixel's own cell that its label depends on: the smoothing's, one for the upsampling."""
    return smooth_iters + 1


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


def _read_tile(model: RuntimeModel, reader: InputReader, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
    """What the encoder is fed for ``window`` (``prototypes.encoder_input``: invalid pixels filled, padded to
    multiples of 4); and its validity (unpadded; None: all valid)."""
    rgb, valid = reader.read(window)
    return encoder_input(model, rgb, valid), valid


def _core_cells(tile: TileWindow) -> tuple[slice, slice]:
    """The core's stride-4 cells inside the read window's cell grid."""
    r = (tile.core.row_off - tile.read.row_off) // STRIDE
    c = (tile.core.col_off - tile.read.col_off) // STRIDE
    return slice(r, r + math.ceil(tile.core.height / STRIDE)), slice(c, c + math.ceil(tile.core.width / STRIDE))


class EmbeddingSpill:
    """The clustered embedding of every stride-4 cell of a raster, float32 [h_cells, w_cells, D'], in a scratch file.

    Each access maps only the rows it touches and unmaps them on return: a mapped file's pages count in the
    process's RSS, so one map of the whole file would grow to the file's size.
    """

    def __init__(self, path: Path, grid: tuple[int, int], dim: int) -> None:
        self.path, self.grid, self.dim = path, grid, dim
        self._row_bytes = grid[1] * dim * np.dtype(np.float32).itemsize
        self.nbytes = grid[0] * self._row_bytes
        self._file = open(path, "w+b")  # closed by close()
        try:
            _reserve(self._file.fileno(), self.nbytes)
        except OSError as exc:
            self._file.close()
            raise OSError(
                f"{path}: cannot reserve {self.nbytes / 1e6:.0f} MB of scratch space for the cell embeddings "
                f"(free some, or pass --scratch-dir): {exc}"
            ) from None

    def _rows(self, start: int, stop: int) -> np.memmap:
        shape = (stop - start, self.grid[1], self.dim)
        return np.memmap(self._file, np.float32, "r+", offset=start * self._row_bytes, shape=shape)

    def write(self, origin: tuple[int, int], cells: np.ndarray) -> None:
        """Store ``cells`` [h, w, D'] with their first cell at ``origin`` (row, column)."""
        (row, col), (h, w) = origin, cells.shape[:2]
        self._rows(row, row + h)[:, col : col + w] = cells

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """A copy of the cells [rows, cols] (contiguous, [h, w, D'])."""
        return np.array(self._rows(rows.start, rows.stop)[:, cols])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EmbeddingSpill:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _reserve(fd: int, size: int) -> None:
    """Allocate the file's blocks now: a full disk is an error here, not a SIGBUS when a mapped page is written."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:  # macOS, Windows: a sparse file
        os.ftruncate(fd, size)


def _embedding_dim(model: RuntimeModel) -> int:
    """D', the width of the clustered embedding, as the model makes it (encoder channels, colour channels if any)."""
    return model.embed(np.zeros((3, STRIDE, STRIDE), np.uint8)).embeddings.shape[1]


class Progress:
    """``segment: pass 1/2 tile 12/64, 3.4 MP/s`` lines on ``stream`` (None: silent): at most one every
    ``PROGRESS_SECONDS``, and one for the last tile of each pass; the rate counts core pixels."""

    def __init__(self, stream: TextIO | None, tiles: int) -> None:
        self.stream, self.tiles = stream, tiles
        self.start(1)

    def start(self, pass_number: int) -> None:
        self.pass_number, self.done, self.pixels = pass_number, 0, 0
        self.started = self.last = time.perf_counter()

    def step(self, tile: TileWindow) -> None:
        self.done += 1
        self.pixels += tile.core.width * tile.core.height
        now = time.perf_counter()
        if self.stream is None or (now - self.last < PROGRESS_SECONDS and self.done < self.tiles):
            return
        self.last = now
        rate = self.pixels / 1e6 / max(now - self.started, 1e-9)
        self.stream.write(f"segment: pass {self.pass_number}/2 tile {self.done}/{self.tiles}, {rate:.1f} MP/s\n")
        self.stream.flush()


def fit_raster_prototypes(
    model: RuntimeModel,
    reader: InputReader,
    k: int,
    tiles: list[TileWindow],
    step: int,
    spill: EmbeddingSpill,
    progress: Progress | None = None,
) -> tuple[np.ndarray, int]:
    """Pass 1: encode every tile once and spill its core cells' embeddings; prototypes [K, D'] fitted on the lattice
    cells of every core, and how many cells were used."""
    progress = progress or Progress(None, len(tiles))
    sample = PrototypeSample(step)
    for tile in tiles:
        rgb, valid = _read_tile(model, reader, tile.read)
        # All invalid: no valid pixel's label reaches its core's cells (margin_pixels), which stay zero.
        if valid is None or valid.any():
            embedding = model.embed(rgb)
            rows, cols = _core_cells(tile)
            origin = (tile.core.row_off // STRIDE, tile.core.col_off // STRIDE)
            spill.write(origin, embedding.embeddings.reshape(*embedding.grid, -1)[rows, cols])
            sample.add(embedding, rows, cols, origin, None if valid is None else valid_cells(valid)[rows, cols])
        progress.step(tile)
    if not sample.n_cells:
        raise ValueError(f"{reader.path}: no valid pixels to fit cluster prototypes on (all nodata?)")
    return sample.fit(k, model.cluster_iters, model.temperature), sample.n_cells


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
    scratch_dir: str | Path | None = None,
    progress: TextIO | None = None,
) -> SegmentReport:
    """Segment a whole GeoTIFF into a uint8 label GeoTIFF with one set of cluster ids; the cell embeddings wait
    between the passes in a scratch folder under ``scratch_dir`` (default: the output's folder); progress lines go
    to ``progress`` (None: silent)."""
    started = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    if not 2 <= k <= model.max_k:
        raise ValueError(f"k={k} is outside [2, max_k={model.max_k}]")
    if 0 <= nodata_label < k or not 0 <= nodata_label <= 255:
        raise ValueError(f"nodata label {nodata_label} must be a uint8 value that is not a cluster id (>= k={k})")
    rule, rule_source = choose_input_rule(model.meta, input_path, dataset_id, overrides)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), InputReader(input_path, rule) as reader:
        width, height = reader.width, reader.height
        tiles = list(tile_windows(width, height, tile_size, margin_pixels(model.smooth_iters)))
        grid = cell_grid(height, width)
        step = lattice_step(grid[0] * grid[1], max_fit_cells)
        meter = Progress(progress, len(tiles))
        scratch_parent = output_path.parent if scratch_dir is None else Path(scratch_dir)
        scratch_parent.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=scratch_parent) as scratch,
            EmbeddingSpill(Path(scratch) / "embeddings.f32", grid, _embedding_dim(model)) as spill,
        ):
            prototypes, fit_cells = fit_raster_prototypes(model, reader, k, tiles, step, spill, meter)
            meter.start(2)
            nodata_pixels = _write_labels(model, reader, tiles, spill, prototypes, output_path, nodata_label, meter)
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
        scratch_bytes=spill.nbytes,
        wall_s=wall,
        megapixels_per_s=width * height / 1e6 / wall,
    )


def _write_labels(
    model: RuntimeModel,
    reader: InputReader,
    tiles: list[TileWindow],
    spill: EmbeddingSpill,
    prototypes: np.ndarray,
    output_path: Path,
    nodata_label: int,
    progress: Progress,
) -> int:
    """Pass 2: every tile's core labels into ``output_path`` (atomically); returns the number of nodata pixels."""
    profile = {
        "driver": "GTiff",
        "width": reader.width,
        "height": reader.height,
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
                    _, valid = reader.read(tile.core)  # the validity only: the pixels were encoded in pass 1
                    if valid is not None and not valid.any():
                        labels = np.full(valid.shape, nodata_label, np.uint8)  # nothing to assign
                    else:
                        labels = _assign_tile(model, spill, tile, prototypes)
                        if valid is not None:
                            labels[~valid] = nodata_label
                    nodata_pixels += 0 if valid is None else int(valid.size - np.count_nonzero(valid))
                    dst.write(labels[None], window=tile.core)
                    progress.step(tile)
            verify_raster(tmp)  # GDAL may report a failed write on stderr only and close cleanly
        except (RasterioError, CPLE_BaseError, OSError) as exc:
            raise OSError(f"{output_path}: cannot write the labels, a previous file is left as it was: {exc}") from None
    return nodata_pixels


def _assign_tile(model: RuntimeModel, spill: EmbeddingSpill, tile: TileWindow, prototypes: np.ndarray) -> np.ndarray:
    """Pass 2 for one tile: uint8 labels [core] from the spilled cells of its core and of the cells around it that
    its labels reach (clipped to the raster, whose edges the smoothing replicates as in one whole-raster tile)."""
    reach, (h_cells, w_cells) = label_reach_cells(model.smooth_iters), spill.grid
    r0, c0 = max(tile.core.row_off // STRIDE - reach, 0), max(tile.core.col_off // STRIDE - reach, 0)
    r1 = min(math.ceil((tile.core.row_off + tile.core.height) / STRIDE) + reach, h_cells)
    c1 = min(math.ceil((tile.core.col_off + tile.core.width) / STRIDE) + reach, w_cells)
    cells = spill.read(slice(r0, r1), slice(c0, c1))
    h, w, dim = cells.shape
    # ``assign`` reads the embeddings only: no seed logits. The size is the padded window's, as in pass 1.
    embedding = Embedding(cells.reshape(h * w, dim), np.empty((h * w, 0), np.float32), (h, w), (h * STRIDE, w * STRIDE))
    labels = model.labels_from_assignment(model.assign(embedding, prototypes), embedding)
    y, x = tile.core.row_off - r0 * STRIDE, tile.core.col_off - c0 * STRIDE
    return labels[y : y + tile.core.height, x : x + tile.core.width]


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
    parser.add_argument(
        "--scratch-dir",
        type=Path,
        help="folder for the temporary cell embeddings, about width * height * D' / 4 bytes (default: the output's)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
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
            scratch_dir=args.scratch_dir,
            progress=None if args.quiet else sys.stderr,
        )
    except (ValueError, OSError) as exc:  # DatasetError and ArtifactError are ValueErrors
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        return 1
    sys.stdout.write(json.dumps(asdict(report)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
