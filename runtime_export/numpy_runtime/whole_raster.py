"""Whole-raster segmentation without I/O: any size, bounded memory, one set of cluster ids.

The procedure, shared by ``python -m runtime_export.segment`` (rasterio) and the QGIS plugin (GDAL through
QGIS), which bring the pixels (a ``PixelSource``) and take the labels (a ``LabelSink``). Numpy alone, with
relative imports only: the plugin build vendors this package's numpy modules unchanged.

Per-tile clustering would number clusters differently in every tile, so this runs in two passes, and
encodes each tile once:

1. encode and fit: encode every tile (window reads); write its core cells' embeddings to a scratch
   file; keep the cells on a global lattice (``prototypes``: every ``s``-th stride-4 cell in both
   directions, ``s`` chosen so at most ``max_fit_cells`` are kept) and run the model's soft k-means
   once over them -> one set of K prototypes for the raster, as evaluation fits them;
2. assign: read each tile's cells back from the scratch file (its core and the cells its labels
   reach), assign them to the fixed prototypes, smooth, upsample, and hand the arg-max labels of the
   tile's core to the sink.

The scratch file holds the clustered embedding of every stride-4 cell, float32 [H/4, W/4, D']: about
W * H * D' bytes / 4 (1.7 GB for 8192 x 8192 with D' = 99), reserved up front (a full disk fails at the
start) as a nameless temporary file in the scratch folder, which the system frees when the process ends,
however it ends (a SIGKILL included). Memory stays at one tile plus the lattice sample.

Tiles overlap by a margin wider than the encoder's receptive field and start on the stride-4 grid, so a
core cell's embedding does not depend on where the tiles are cut, and pass 2 sees the raster's cells as
one grid: no seams, and a raster segmented in one tile or in many gives the same labels. Invalid pixels
(the pixel rule's validity) are filled with the model's mean colour before encoding, never fitted, and
labelled ``nodata_label``.

What a label raster carries to look right when opened (colours, tags, overviews, the QGIS style) is
``label_style``'s.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .pixels import PixelRule, infer_bands
from .prototypes import DEFAULT_MAX_FIT_CELLS, PrototypeSample, cell_grid, encoder_input, lattice_step, valid_cells
from .runtime import STRIDE, Embedding, RuntimeModel, select_input_rule

DEFAULT_TILE = 512
DEFAULT_NODATA_LABEL = 255
# Encoder receptive field, in stride-4 cells, beyond a cell's own 4x4 block: conv1 reaches 1 px,
# conv2 2 px, the four residual convs 4 px each (19 px), rounded up with the avg-pool block.
ENCODER_REACH_CELLS = 6
SCRATCH_NAME = "segment-scratch.f32"  # the spill's name in messages (the file itself has none)


@dataclass(frozen=True)
class Window:
    """A rectangle of pixels: column and row of its top-left pixel, width and height (GDAL's order)."""

    col_off: int
    row_off: int
    width: int
    height: int


@dataclass(frozen=True)
class TileWindow:
    """A core region (what the tile writes) inside the window it reads (core + margin, clipped to the raster)."""

    core: Window
    read: Window


class PixelSource(Protocol):
    """A raster opened under a pixel rule: model pixels and validity of any window."""

    path: Path
    width: int
    height: int

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
        """(uint8 RGB [3, h, w], valid [h, w] or None: every pixel valid)."""
        ...


LabelSink = Callable[[np.ndarray, Window], None]  # uint8 labels [h, w] of one core window
# Called after every tile: pass number (1 or 2), tiles done, tile count, core pixels done in this pass. It may
# raise to stop the run (a cancel); the scratch file is removed either way.
ProgressCallback = Callable[[int, int, int, int], None]


@dataclass(frozen=True)
class RuleOverrides:
    """Changes to the chosen pixel rule; None keeps the rule's field."""

    bands: tuple[int, int, int] | None = None
    alpha_band: int | None = None  # 0: no alpha band
    value_range: tuple[float, float] | None = None


class ScratchSpaceError(OSError):
    """The scratch folder cannot hold the cell embeddings."""


@dataclass(frozen=True)
class PassStats:
    tiles: int
    fit_cells: int
    lattice_step: int
    nodata_pixels: int
    scratch_bytes: int  # the cell embeddings spilled between the passes (removed at the end)


def choose_input_rule(
    meta: dict[str, Any],
    dtype: str,
    colorinterp: Sequence[str],
    dataset_id: str | None = None,
    overrides: RuleOverrides = RuleOverrides(),
    raster_name: str = "the raster",
) -> tuple[PixelRule, str]:
    """The pixel rule to read a raster of ``dtype`` with bands named ``colorinterp``, and where it came from: the
    rule of the dataset ``dataset_id`` names, else the model's rule for the dtype (``runtime.select_input_rule``),
    else R, G, B (and alpha) from the colour interpretation; then ``overrides``. ``raster_name`` names the raster
    in messages."""
    own_value_range = overrides.value_range is not None
    rule = select_input_rule(meta, dtype, dataset_id, own_value_range=own_value_range, raster_name=raster_name)
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


def check_k(model: RuntimeModel, k: int, nodata_label: int) -> None:
    """K within the model's range, and a nodata label that is no cluster id."""
    model.check_k(k)
    if 0 <= nodata_label < k or not 0 <= nodata_label <= 255:
        raise ValueError(f"nodata label {nodata_label} must be a uint8 value that is not a cluster id (>= k={k})")


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
    if tile_size <= 0 or tile_size % STRIDE or margin % STRIDE:
        raise ValueError(f"tile size {tile_size} and margin {margin} must be multiples of {STRIDE}, the tile size > 0")
    for row in range(0, height, tile_size):
        for col in range(0, width, tile_size):
            core = Window(col, row, min(tile_size, width - col), min(tile_size, height - row))
            r0, c0 = max(row - margin, 0), max(col - margin, 0)
            r1, c1 = min(row + core.height + margin, height), min(col + core.width + margin, width)
            yield TileWindow(core=core, read=Window(c0, r0, c1 - c0, r1 - r0))


def core_cells(tile: TileWindow) -> tuple[slice, slice]:
    """The core's stride-4 cells inside the read window's cell grid."""
    r = (tile.core.row_off - tile.read.row_off) // STRIDE
    c = (tile.core.col_off - tile.read.col_off) // STRIDE
    return slice(r, r + math.ceil(tile.core.height / STRIDE)), slice(c, c + math.ceil(tile.core.width / STRIDE))


class EmbeddingSpill:
    """The clustered embedding of every stride-4 cell of a raster, float32 [h_cells, w_cells, D'], in a scratch file.

    The file has no name in ``path``'s folder (``tempfile.TemporaryFile``: unlinked at once on POSIX, delete-on-close
    on Windows), so the system frees it when the process ends however it ends, a SIGKILL included: a killed run
    leaves no gigabytes behind. ``path`` names it in messages. Each access maps only the rows it touches and unmaps
    them on return: a mapped file's pages count in the process's RSS, so one map of the whole file would grow to the
    file's size.
    """

    def __init__(self, path: Path, grid: tuple[int, int], dim: int) -> None:
        self.path, self.grid, self.dim = path, grid, dim
        self._row_bytes = grid[1] * dim * np.dtype(np.float32).itemsize
        self.nbytes = grid[0] * self._row_bytes
        self._file = tempfile.TemporaryFile(prefix=f".{path.name}.", dir=path.parent)  # closed by close()
        try:
            _reserve(self._file.fileno(), self.nbytes)
        except OSError as exc:
            self._file.close()
            raise ScratchSpaceError(
                f"{path.parent}: cannot reserve {self.nbytes / 1e6:.0f} MB of scratch space for the cell embeddings "
                f"(free some, or choose another scratch folder): {exc}"
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


def embedding_dim(model: RuntimeModel) -> int:
    """D', the width of the clustered embedding, as the model makes it (encoder channels, colour channels if any)."""
    return model.embed(np.zeros((3, STRIDE, STRIDE), np.uint8)).embeddings.shape[1]


def segment_source(
    model: RuntimeModel,
    source: PixelSource,
    k: int,
    sink: LabelSink,
    scratch_dir: str | Path,
    tile_size: int = DEFAULT_TILE,
    max_fit_cells: int = DEFAULT_MAX_FIT_CELLS,
    nodata_label: int = DEFAULT_NODATA_LABEL,
    progress: ProgressCallback | None = None,
) -> PassStats:
    """Both passes over ``source``: every core window's labels go to ``sink`` once, in row-major order; the cell
    embeddings wait between the passes in a nameless temporary file in ``scratch_dir`` (``EmbeddingSpill``)."""
    check_k(model, k, nodata_label)
    tiles = list(tile_windows(source.width, source.height, tile_size, margin_pixels(model.smooth_iters)))
    grid = cell_grid(source.height, source.width)
    step = lattice_step(grid[0] * grid[1], max_fit_cells)
    Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    with EmbeddingSpill(Path(scratch_dir) / SCRATCH_NAME, grid, embedding_dim(model)) as spill:
        prototypes, fit_cells = fit_raster_prototypes(model, source, k, tiles, step, spill, progress)
        nodata_pixels = assign_labels(model, source, tiles, spill, prototypes, nodata_label, sink, progress)
    return PassStats(len(tiles), fit_cells, step, nodata_pixels, spill.nbytes)


def fit_raster_prototypes(
    model: RuntimeModel,
    source: PixelSource,
    k: int,
    tiles: list[TileWindow],
    step: int,
    spill: EmbeddingSpill,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, int]:
    """Pass 1: encode every tile once and spill its core cells' embeddings; prototypes [K, D'] fitted on the lattice
    cells of every core, and how many cells were used."""
    sample, pixels = PrototypeSample(step), 0
    for done, tile in enumerate(tiles, start=1):
        rgb, valid = source.read(tile.read)
        # All invalid: no valid pixel's label reaches its core's cells (margin_pixels), which stay zero.
        if valid is None or valid.any():
            embedding = model.embed(encoder_input(model, rgb, valid))
            rows, cols = core_cells(tile)
            origin = (tile.core.row_off // STRIDE, tile.core.col_off // STRIDE)
            spill.write(origin, embedding.embeddings.reshape(*embedding.grid, -1)[rows, cols])
            sample.add(embedding, rows, cols, origin, None if valid is None else valid_cells(valid)[rows, cols])
        pixels += tile.core.width * tile.core.height
        if progress is not None:
            progress(1, done, len(tiles), pixels)
    if not sample.n_cells:
        raise ValueError(f"{source.path}: no valid pixels to fit cluster prototypes on (all nodata?)")
    return sample.fit(k, model.cluster_iters, model.temperature), sample.n_cells


def assign_labels(
    model: RuntimeModel,
    source: PixelSource,
    tiles: list[TileWindow],
    spill: EmbeddingSpill,
    prototypes: np.ndarray,
    nodata_label: int,
    sink: LabelSink,
    progress: ProgressCallback | None = None,
) -> int:
    """Pass 2: every tile's core labels to ``sink``; returns the number of nodata pixels."""
    nodata_pixels = pixels = 0
    for done, tile in enumerate(tiles, start=1):
        _, valid = source.read(tile.core)  # the validity only: the pixels were encoded in pass 1
        if valid is not None and not valid.any():
            labels = np.full(valid.shape, nodata_label, np.uint8)  # nothing to assign
        else:
            labels = assign_tile(model, spill, tile, prototypes)
            if valid is not None:
                labels[~valid] = nodata_label
        nodata_pixels += 0 if valid is None else int(valid.size - np.count_nonzero(valid))
        sink(labels, tile.core)
        pixels += tile.core.width * tile.core.height
        if progress is not None:
            progress(2, done, len(tiles), pixels)
    return nodata_pixels


def assign_tile(model: RuntimeModel, spill: EmbeddingSpill, tile: TileWindow, prototypes: np.ndarray) -> np.ndarray:
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
