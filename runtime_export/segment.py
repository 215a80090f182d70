"""Whole-raster segmentation with the numpy runtime, reading and writing through rasterio.

``python -m runtime_export.segment --model DIR --input IN.tif --output OUT.tif --k 8 [--dataset ID]``

The procedure (two passes, each tile encoded once, bounded memory, no seams) is
``runtime_export.numpy_runtime.whole_raster``'s, which the QGIS plugin runs through GDAL: the same labels either way.

Pixels are read through the pixel rule (``runtime_export.rasters.InputReader``), as in
training: the rule of the dataset ``--dataset`` names, else the model's rule for the raster's dtype,
else R, G, B (and alpha) from the file's colour interpretation (``whole_raster.choose_input_rule``). A
file's own alpha band is honoured when the rule declares none; ``--bands``, ``--alpha-band`` and
``--value-range`` override fields of the rule.

The cell embeddings wait between the passes in a nameless temporary file (freed by the system when the
process ends, however it ends) beside the output or in ``--scratch-dir`` (about W * H * D' / 4 bytes,
``scratch_bytes`` in the report). Progress goes to stderr (``--quiet``: none), one line every few seconds
and one at the end of each pass:
``segment: pass 1/2 tile 12/64, 3.4 MP/s``; stdout is the one-line JSON report.

The output is a paletted uint8 GeoTIFF with the input's CRS and transform: a colour table with K distinct
colours, ``nodata_label`` (transparent) as its nodata value, nearest-neighbour overviews, and tags naming
the model (``SEGPIPE_CONFIG_HASH``, ``SEGPIPE_DATA_VERSIONS``, ``SEGPIPE_K``...); beside it, ``OUT.qml``, the
QGIS style listing the K segments. Both are written in a hidden folder beside the output named after the
process (``.segment-output-<pid>-...``), read back and only then renamed into place: a full disk never replaces
a good output, and what a killed run leaves there is removed by the next run into that folder. An output that is
the input (through links too) or whose style would be the input, or a ``.qml`` output (its own style), is
refused before anything is written.

Every user error (a bad path, flag, model or raster) is one line on stderr and exit status 2
(``runtime_export.cli``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
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

from runtime_export.atomic import fsync_dir, verify_raster
from runtime_export.cli import run_cli
from runtime_export.leftovers import dead_leftovers, owned_prefix
from runtime_export.numpy_runtime.label_style import (
    label_colours,
    label_style,
    label_tags,
    overview_factors,
    style_path,
)
from runtime_export.numpy_runtime.pixels import PixelRule, check_value_range
from runtime_export.numpy_runtime.prototypes import DEFAULT_MAX_FIT_CELLS
from runtime_export.numpy_runtime.runtime import RuntimeModel, load_runtime_model
from runtime_export.numpy_runtime.whole_raster import (
    DEFAULT_NODATA_LABEL,
    DEFAULT_TILE,
    RuleOverrides,
    ScratchSpaceError,
    Window,
    check_k,
    choose_input_rule,
    segment_source,
)
from runtime_export.rasters import InputReader, open_raster

# GDAL's block cache (default: 5% of RAM) would grow with the raster; this holds a row of tiles of a striped
# 4-band uint16 input 50,000 px wide, so each strip is still decoded once per pass.
GDAL_CACHE_BYTES = 256 * 2**20
PROGRESS_SECONDS = 5.0  # at most one progress line per interval, plus the last tile of each pass
PROG = "python -m runtime_export.segment"
OUTPUT_STAGING_PREFIX = ".segment-output-"  # + "<pid>-": the hidden folder the output is written in


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
    return choose_input_rule(meta, dtype, colorinterp, dataset_id, overrides, raster_name=str(input_path))


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
    wait between the passes in a nameless temporary file in ``scratch_dir`` (default: the output's folder); progress
    lines go to ``progress`` (None: silent). Paths are checked (``check_paths``) before anything is created."""
    started = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    check_paths(input_path, output_path)
    check_k(model, k, nodata_label)
    rule, rule_source = choose_file_rule(model.meta, input_path, dataset_id, overrides)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), InputReader(input_path, rule) as reader:
        profile = _label_profile(reader, nodata_label)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        for leftover in dead_leftovers(output_path.parent, OUTPUT_STAGING_PREFIX):  # of a killed run
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=owned_prefix(OUTPUT_STAGING_PREFIX), dir=output_path.parent))
        try:
            labels, style = staging / "labels.tif", staging / "labels.qml"
            with rasterio.open(labels, "w", **profile) as dst:
                dst.write_colormap(1, label_colours(k, nodata_label))
                dst.update_tags(**label_tags(model.meta, k, nodata_label, rule))
                stats = segment_source(
                    model,
                    RasterioSource(reader),
                    k,
                    lambda block, window: dst.write(block, 1, window=_rio_window(window)),
                    output_path.parent if scratch_dir is None else scratch_dir,
                    tile_size,
                    max_fit_cells,
                    nodata_label,
                    None if progress is None else Progress(progress),
                )
            # GDAL may report a failed write on stderr only and close cleanly, and building overviews over
            # blocks that failed to write crashes it: the file is read back before and after.
            verify_raster(labels)
            _build_overviews(labels)
            verify_raster(labels)
            style.write_text(label_style(k, nodata_label), encoding="utf-8")
            _publish(labels, output_path)
            _publish(style, style_path(output_path))
            fsync_dir(output_path.parent)  # the renames themselves, on disk
        except ScratchSpaceError:
            raise
        except (RasterioError, CPLE_BaseError, OSError) as exc:
            kept = "a previous file is left as it was"
            raise OSError(f"{output_path}: cannot write the labels, {kept}: {exc}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
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


def check_paths(input_path: Path, output_path: Path) -> None:
    """Refuse, before anything is created, what would lose or corrupt a file: an output that is the input (also
    through a symbolic or hard link), a style sidecar (``OUT.qml``) that is the input, a ``.qml`` output (the
    labels would be replaced by their own style), an output that is a folder; and names GDAL cannot open."""
    for flag, path in (("--input", input_path), ("--output", output_path)):
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(path).decode("utf-8", "backslashreplace")
            raise ValueError(
                f"{flag} {shown}: the path is not valid UTF-8, which GDAL cannot open: rename it"
            ) from None
    if not input_path.is_file():
        problem = "is a folder" if input_path.is_dir() else "no such file"
        raise ValueError(f"{input_path}: {problem} (--input is the raster to segment)")
    if output_path.suffix.lower() == ".qml":
        raise ValueError(f"{output_path}: a .qml output would be overwritten by its own QGIS style: name it .tif")
    if output_path.is_dir():
        raise ValueError(f"{output_path}: is a folder; --output is the label GeoTIFF to write")
    if _same_file(output_path, input_path):
        raise ValueError(f"{output_path}: is the input {input_path}; writing the labels there would replace it")
    if _same_file(style_path(output_path), input_path):
        raise ValueError(
            f"{output_path}: its QGIS style {style_path(output_path)} would replace the input {input_path}: "
            "choose another output name"
        )


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths are one file (device and inode, links followed); a path that does not exist is not."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _publish(path: Path, target: Path) -> None:
    """Sync ``path`` to disk and rename it onto ``target`` (same folder tree, one filesystem): atomic."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(path, target)


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
    """Nearest-neighbour overviews inside the GeoTIFF (``label_style.overview_factors``): labels are not averaged."""
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
        return check_value_range([float(part) for part in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected LO,HI, two finite numbers with LO below HI, e.g. 0,4095"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: the JSON report on stdout, exit 0; a user error is one line on stderr, exit 2."""
    return run_cli(PROG, _segment_cli, argv)


def _segment_cli(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="artifact directory (model.npz + meta.json)")
    parser.add_argument("--input", type=Path, required=True, help="GeoTIFF to segment (any size, bands and dtype)")
    parser.add_argument("--output", type=Path, required=True, help="label GeoTIFF to write")
    parser.add_argument("--k", type=int, required=True, help="number of clusters")
    parser.add_argument("--tile-size", type=_positive_int, default=DEFAULT_TILE, help="core tile side, a multiple of 4")
    parser.add_argument(
        "--max-fit-cells", type=_positive_int, default=DEFAULT_MAX_FIT_CELLS, help="cells k-means is fitted on"
    )
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
    except ScratchSpaceError as exc:
        raise ScratchSpaceError(f"{exc} (--scratch-dir)") from None
    sys.stdout.write(json.dumps(asdict(report)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
