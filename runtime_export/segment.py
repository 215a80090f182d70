"""Whole-raster segmentation with the numpy runtime, reading and writing through rasterio.

``python -m runtime_export.segment --model DIR --input IN.tif --output OUT.tif --k 8 [--dataset ID]``

The procedure (two passes, each tile encoded once, bounded memory, no seams) is
``runtime_export.whole_raster``'s, which the QGIS plugin runs through GDAL: the same labels either way.

Pixels are read through the pixel rule (``training_core.datasets.rasters.InputReader``), as in
training: the rule of the dataset ``--dataset`` names, else the model's rule for the raster's dtype,
else R, G, B (and alpha) from the file's colour interpretation (``whole_raster.choose_input_rule``). A
file's own alpha band is honoured when the rule declares none; ``--bands``, ``--alpha-band`` and
``--value-range`` override fields of the rule.

The cell embeddings wait between the passes in a temporary folder beside the output or under
``--scratch-dir`` (about W * H * D' / 4 bytes, ``scratch_bytes`` in the report). Progress goes to stderr
(``--quiet``: none), one line every few seconds and one at the end of each pass:
``segment: pass 1/2 tile 12/64, 3.4 MP/s``; stdout is the one-line JSON report.

The output is a paletted uint8 GeoTIFF with the input's CRS and transform: a colour table with K distinct
colours, ``nodata_label`` (transparent) as its nodata value, nearest-neighbour overviews, and tags naming
the model (``SEGPIPE_CONFIG_HASH``, ``SEGPIPE_DATA_VERSIONS``, ``SEGPIPE_K``...); beside it, ``OUT.qml``, the
QGIS style listing the K segments. It is written to a temporary sibling, read back and only then renamed
into place (``training_core.atomic``): a full disk never replaces a good output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import rasterio
import rasterio.windows
from rasterio._err import CPLE_BaseError  # GDAL errors raised on write/close (e.g. "File too large")
from rasterio.enums import Resampling
from rasterio.errors import RasterioError

from runtime_export.pixels import PixelRule
from runtime_export.prototypes import DEFAULT_MAX_FIT_CELLS
from runtime_export.runtime import RuntimeModel, load_runtime_model
from runtime_export.whole_raster import (
    DEFAULT_NODATA_LABEL,
    DEFAULT_TILE,
    RuleOverrides,
    ScratchSpaceError,
    Window,
    check_k,
    choose_input_rule,
    label_colours,
    label_style,
    label_tags,
    overview_factors,
    segment_source,
    style_path,
)
from training_core.atomic import atomic_path, atomic_write_text, verify_raster
from training_core.datasets.rasters import InputReader, open_raster

# GDAL's block cache (default: 5% of RAM) would grow with the raster; this holds a row of tiles of a striped
# 4-band uint16 input 50,000 px wide, so each strip is still decoded once per pass.
GDAL_CACHE_BYTES = 256 * 2**20
PROGRESS_SECONDS = 5.0  # at most one progress line per interval, plus the last tile of each pass


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


class RasterioSource:
    """``whole_raster.PixelSource`` over an ``InputReader``."""

    def __init__(self, reader: InputReader) -> None:
        self.reader, self.path = reader, reader.path
        self.width, self.height = reader.width, reader.height

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
        return self.reader.read(_rio_window(window))


def choose_file_rule(
    meta: dict[str, Any],
    input_path: str | Path,
    dataset_id: str | None = None,
    overrides: RuleOverrides = RuleOverrides(),
) -> tuple[PixelRule, str]:
    """``whole_raster.choose_input_rule`` for the file ``input_path``."""
    with open_raster(input_path) as src:
        dtype, colorinterp = src.dtypes[0], [interp.name for interp in src.colorinterp]
    return choose_input_rule(meta, dtype, colorinterp, dataset_id, overrides)


class Progress:
    """``segment: pass 1/2 tile 12/64, 3.4 MP/s`` lines on ``stream``: a ``whole_raster.ProgressCallback`` that
    writes at most one line every ``PROGRESS_SECONDS``, and one for the last tile of each pass."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.pass_number = stream, 0

    def __call__(self, pass_number: int, done: int, tiles: int, pixels: int) -> None:
        now = time.perf_counter()
        if pass_number != self.pass_number:
            self.pass_number, self.started, self.last = pass_number, now, now
        if now - self.last < PROGRESS_SECONDS and done < tiles:
            return
        self.last = now
        rate = pixels / 1e6 / max(now - self.started, 1e-9)
        self.stream.write(f"segment: pass {pass_number}/2 tile {done}/{tiles}, {rate:.1f} MP/s\n")
        self.stream.flush()


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
    """Segment a whole GeoTIFF into a paletted uint8 label GeoTIFF with one set of cluster ids; the cell embeddings
    wait between the passes in a scratch folder under ``scratch_dir`` (default: the output's folder); progress lines
    go to ``progress`` (None: silent)."""
    started = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    check_k(model, k, nodata_label)
    rule, rule_source = choose_file_rule(model.meta, input_path, dataset_id, overrides)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), InputReader(input_path, rule) as reader:
        profile = _label_profile(reader, nodata_label)
        with atomic_path(output_path, suffix=".tif") as tmp:
            try:
                with rasterio.open(tmp, "w", **profile) as dst:
                    dst.write_colormap(1, label_colours(k, nodata_label))
                    dst.update_tags(**label_tags(model.meta, k, nodata_label, rule))
                    stats = segment_source(
                        model,
                        RasterioSource(reader),
                        k,
                        lambda labels, window: dst.write(labels, 1, window=_rio_window(window)),
                        output_path.parent if scratch_dir is None else scratch_dir,
                        tile_size,
                        max_fit_cells,
                        nodata_label,
                        None if progress is None else Progress(progress),
                    )
                # GDAL may report a failed write on stderr only and close cleanly, and building overviews over
                # blocks that failed to write crashes it: the file is read back before and after.
                verify_raster(tmp)
                _build_overviews(tmp)
                verify_raster(tmp)
            except ScratchSpaceError:
                raise
            except (RasterioError, CPLE_BaseError, OSError) as exc:
                kept = "a previous file is left as it was"
                raise OSError(f"{output_path}: cannot write the labels, {kept}: {exc}") from None
        atomic_write_text(style_path(output_path), label_style(k, nodata_label))
    wall = time.perf_counter() - started
    return SegmentReport(
        input=str(input_path),
        output=str(output_path),
        rule=rule.to_dict(),
        rule_source=rule_source,
        width=reader.width,
        height=reader.height,
        k=k,
        **asdict(stats),
        wall_s=wall,
        megapixels_per_s=reader.width * reader.height / 1e6 / wall,
    )


def _rio_window(window: Window) -> rasterio.windows.Window:
    return rasterio.windows.Window(window.col_off, window.row_off, window.width, window.height)


def _label_profile(reader: InputReader, nodata_label: int) -> dict[str, Any]:
    return {
        "driver": "GTiff",
        "width": reader.width,
        "height": reader.height,
        "count": 1,
        "dtype": "uint8",
        "crs": reader.src.crs,
        "transform": reader.src.transform,
        "nodata": nodata_label,
        "photometric": "palette",
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }


def _build_overviews(path: Path) -> None:
    """Nearest-neighbour overviews inside the GeoTIFF (``whole_raster.overview_factors``): labels are not averaged."""
    with rasterio.open(path, "r+") as dst:
        factors = overview_factors(dst.width, dst.height)
        if factors:
            dst.build_overviews(factors, Resampling.nearest)
            dst.update_tags(ns="rio_overview", resampling="nearest")


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
        hint = " (--scratch-dir)" if isinstance(exc, ScratchSpaceError) else ""
        sys.stderr.write(f"error: {' '.join(str(exc).split())}{hint}\n")
        return 1
    sys.stdout.write(json.dumps(asdict(report)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
