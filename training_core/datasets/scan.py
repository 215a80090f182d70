"""Reading a whole dataset once: validation against its header, or inference of the header.

A ``dataset_header.yaml`` committed in the dataset folder is authoritative: the files are only validated
against it. Without one, the header is inferred: modalities and patterns from the layout; channels,
dtype, CRS, nodata, band selection (GDAL's colour interpretation) and, for non-uint8 inputs, the value
range from the inputs; label values from the masks.

Two fields describe the data rather than how to read it, so they are filled in either way when the header
leaves them out, and a declared value wins: ``licence``, the first line of the dataset folder's licence
file (``LICENCE_FILES``), and the input's ``ground_resolution_m``, the range of the inputs' ground pixel
sizes (a declared range is checked against every input, like ``crs``).

The inferred ``value_range`` is the 2nd and 98th percentile of a seeded sample of valid pixels of the
selected bands (seed: ``splits.seed``), at most ``VALUE_SAMPLE_TOTAL`` values over the dataset. It is
written into the header, so it is part of the data version, not a guess made again by every run.

Every file is read whole (in bounded strips), so a truncated or corrupt raster fails here, named.

Valid pixels (the pixel rule's validity: not nodata, not masked, alpha not 0) are counted strip by strip, so
memory does not grow with the data. A dataset with none is refused, named: it would train with every loss 0.
An input file with none is refused too, naming the file, rather than skipped: skipping would silently change
the items, split counts and data version the header and the shards record; the user removes the file or
corrects its nodata, alpha or mask.

Every file the scan reads (rasters, masks, the licence file, a committed header, ``splits.manifest_files``)
must resolve inside the dataset folder (links are followed; the dataset folder is resolved first, so it may
itself be a link): a link leading out is refused with one line naming the file and where it leads, unread.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
import rasterio

from runtime_export.errors import DatasetError
from runtime_export.numpy_runtime.pixels import PixelRule, infer_bands
from runtime_export.rasters import (
    RasterFacts,
    check_target_fits,
    distinct_values,
    has_mask_band,
    open_raster,
    raster_facts,
    read_blocks,
)
from training_core.datasets.discovery import (
    DatasetItem,
    dataset_root_of,
    discover_items,
    require_utf8,
    resolve_inside,
    tiff_files,
)
from training_core.datasets.schema import (
    HEADER_FILENAME,
    HEADER_VERSION,
    DatasetHeader,
    Modality,
    header_from_dict,
    load_header,
)
from training_core.splits import read_pinned_splits

INPUT_FOLDER, TARGET_FOLDER = "images", "masks"
INPUT_MODALITY, TARGET_MODALITY = "rgb", "labels"
VALUE_PERCENTILES = (2.0, 98.0)
VALUE_SAMPLE_TOTAL = 1 << 20  # pixel values pooled over a dataset to infer its value range
VALUE_SAMPLE_PER_ITEM = (256, 8192)  # each item's share of the pool, clamped to this range
LICENCE_FILES = ("LICENSE", "LICENCE", "LICENSE.txt", "LICENCE.txt")  # at the dataset folder's top, first found
LICENCE_MAX_CHARS = 200  # a one-line summary for a plugin's dialog, not the licence text
LICENCE_READ_BYTES = 64 * 1024  # enough for a first line; a large or binary file is not read whole
LABEL_DTYPE_KINDS = "ui"  # targets hold integer class values
T = TypeVar("T")


@dataclass(frozen=True)
class ItemFacts:
    """What one item's files hold; the scan's result, aggregated into an inferred header."""

    item_id: str
    input: RasterFacts
    target: RasterFacts | None
    label_values: tuple[int, ...] = ()
    bytes_written: int = 0
    value_sample: np.ndarray | None = None  # inference of non-uint8 inputs: valid values of the R, G, B bands
    sha256: tuple[str, ...] = ()  # of the tiles a shard build wrote (input, then target)
    valid_pixels: int = 0  # input pixels the pixel rule counts valid (a chip's, in a shard build)


@dataclass
class OpenItem:
    """An item's files opened and checked against the header and each other (metadata only)."""

    item: DatasetItem
    input: rasterio.DatasetReader
    input_facts: RasterFacts
    target: rasterio.DatasetReader | None
    target_facts: RasterFacts | None


def check_against(facts: RasterFacts, modality: Modality) -> None:
    """A file's metadata against its modality; the error names the file, the field and the problem."""
    where = f"{facts.path}: modality {modality.name!r}:"
    if modality.role == "input":
        rule = modality.pixel_rule()
        if facts.count < rule.band_count_needed:
            raise DatasetError(f"{where} bands: has {facts.count} bands, the header reads bands {list(rule.indexes)}")
        try:
            rule.check_dtype(facts.dtype)
        except ValueError as exc:
            raise DatasetError(f"{where} {exc}") from None
    else:
        if facts.count != 1:
            raise DatasetError(f"{where} channels: has {facts.count} bands, a target has 1")
        if np.dtype(facts.dtype).kind not in LABEL_DTYPE_KINDS:
            raise DatasetError(f"{where} dtype: is {facts.dtype}, a target holds integer labels")
    if modality.channels is not None and facts.count != modality.channels:
        raise DatasetError(f"{where} channels: has {facts.count} bands, expected {modality.channels}")
    if modality.dtype is not None and facts.dtype != modality.dtype:
        raise DatasetError(f"{where} dtype: is {facts.dtype}, expected {modality.dtype}")
    if modality.georef_required and not facts.georeferenced:
        raise DatasetError(f"{where} georef_required: the file has no CRS/geotransform")
    if modality.crs is not None and facts.crs is not None and facts.crs not in modality.crs:
        raise DatasetError(f"{where} crs: is {facts.crs}, expected one of {modality.crs}")
    declared = modality.ground_resolution_m
    if declared is not None and facts.pixel_size_m is not None:
        if not all(declared[0] <= size <= declared[1] for size in facts.pixel_size_m):
            raise DatasetError(
                f"{where} ground_resolution_m: pixels are {facts.pixel_size_m[0]} x {facts.pixel_size_m[1]} m, "
                f"outside {list(declared)}"
            )


@contextmanager
def open_item(item: DatasetItem, header: DatasetHeader, infer: bool = False) -> Iterator[OpenItem]:
    """Open an item's files and check them against the header (``infer``: only what the layout fixes)."""
    src = open_raster(item.input_path)
    tgt = None
    try:
        input_facts = raster_facts(src, item.input_path)
        if not infer:
            check_against(input_facts, header.input)
        elif input_facts.count < 3:
            raise DatasetError(
                f"{item.input_path}: bands: has {input_facts.count}, an input needs at least 3 (R, G, B)"
            )
        target_facts = None
        if item.target_path is not None and header.target is not None:
            tgt = open_raster(item.target_path)
            target_facts = raster_facts(tgt, item.target_path)
            check_against(target_facts, header.target)
            check_target_fits(target_facts, input_facts)
        yield OpenItem(item, src, input_facts, tgt, target_facts)
    finally:
        src.close()
        if tgt is not None:
            tgt.close()


def label_values_of(blocks: Iterator[tuple[Any, np.ndarray]]) -> tuple[int, ...]:
    found: set[int] = set()
    for _, block in blocks:
        found |= distinct_values(block)
    return tuple(sorted(found))


def check_label_values(path: Path, values: Sequence[int], modality: Modality) -> None:
    if modality.label_values is not None and (extra := sorted(set(values) - set(modality.label_values))):
        raise DatasetError(
            f"{path}: modality {modality.name!r} label_values: holds {extra}, not in {modality.label_values}"
        )


def sample_size_for(n_items: int) -> int:
    """Each item's share of the value sample pooled over a dataset of ``n_items``."""
    low, high = VALUE_SAMPLE_PER_ITEM
    return min(high, max(low, VALUE_SAMPLE_TOTAL // max(1, n_items)))


def inferred_rule(facts: RasterFacts) -> PixelRule:
    """Under inference, the rule an input is read with: the bands its colour interpretation names, the file's
    own nodata (what the inferred header will say)."""
    bands, alpha = infer_bands(facts.colorinterp)
    return PixelRule(bands=tuple(bands), alpha_band=alpha)


def inferred_value_sample(opened: OpenItem, seed: int, sample_size: int) -> np.ndarray | None:
    """Under inference, a non-uint8 input's value sample (bands from its colour interpretation); else None."""
    if opened.input_facts.dtype == "uint8":
        return None
    _, sample = input_pass(opened.input, inferred_rule(opened.input_facts), opened.item.item_id, seed, sample_size)
    return sample


def input_pass(
    src: rasterio.DatasetReader, rule: PixelRule, item_id: str, seed: int, sample_size: int
) -> tuple[int, np.ndarray | None]:
    """One read of every strip of an input: its count of valid pixels and, for ``sample_size`` > 0, a seeded
    sample of about that many valid values of the rule's R, G, B bands (None for 0)."""
    rng = np.random.default_rng([seed, zlib.crc32(item_id.encode())])
    picked = []
    indexes = np.array(rule.indexes) - 1
    mask_band = has_mask_band(src)
    total = src.width * src.height
    valid_pixels = 0
    for window, block in read_blocks(src):
        raw = block[indexes]
        mask = src.read_masks(1, window=window) > 0 if mask_band else None
        valid = rule.valid_mask(raw, src.nodata, mask)
        valid_pixels += raw.shape[1] * raw.shape[2] if valid is None else int(np.count_nonzero(valid))
        if not sample_size:
            continue
        values = raw[:3].reshape(3, -1) if valid is None else raw[:3][:, valid]
        want = min(values.shape[1], round(sample_size * block.shape[1] * block.shape[2] / total))
        if want:
            picked.append(values[:, rng.choice(values.shape[1], want, replace=False)].ravel())
    if not sample_size:
        return valid_pixels, None
    return valid_pixels, np.concatenate(picked) if picked else np.empty(0, dtype=src.dtypes[0])


def scan_item(item: DatasetItem, header: DatasetHeader, infer: bool = False, sample_size: int = 0) -> ItemFacts:
    """Open and read every pixel of one item, checking it against the header (or inferring, see open_item);
    counts its valid input pixels and, inferring a non-uint8 input, draws its value sample in the same read."""
    with open_item(item, header, infer) as opened:
        rule = inferred_rule(opened.input_facts) if infer else header.pixel_rule
        sampled = infer and opened.input_facts.dtype != "uint8"
        valid, sample = input_pass(opened.input, rule, item.item_id, header.splits.seed, sample_size if sampled else 0)
        labels: tuple[int, ...] = ()
        if opened.target is not None:
            labels = label_values_of(read_blocks(opened.target))
            check_label_values(item.target_path, labels, header.target)
        return ItemFacts(
            item.item_id, opened.input_facts, opened.target_facts, labels, value_sample=sample, valid_pixels=valid
        )


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ItemPool:
    """Per-item work on worker processes, or in this process for one worker.

    Processes, not threads: decoding and encoding pixels holds the GIL often enough that on 2 cores a
    process pool took 0.58 of a serial loop's time and a thread pool 0.75.
    """

    def __init__(self, workers: int | None, n_items: int) -> None:
        self.workers = max(1, min(workers or default_workers(), n_items))
        self._pool = ProcessPoolExecutor(self.workers) if self.workers > 1 else None

    def __enter__(self) -> ItemPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """One job beside the item work (in this process, at once, for one worker)."""
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        future: Future[T] = Future()
        future.set_result(fn(*args))
        return future

    def map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """fn over items, results in order; the first exception is raised."""
        if self._pool is None:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items, chunksize=max(1, len(items) // (8 * self.workers))))


def scan_items(
    items: Sequence[DatasetItem], header: DatasetHeader, workers: int | None = None, infer: bool = False
) -> list[ItemFacts]:
    sample_size = sample_size_for(len(items))
    with ItemPool(workers, len(items)) as pool:
        facts = pool.map(partial(scan_item, header=header, infer=infer, sample_size=sample_size), items)
    check_consistency(facts, infer)
    check_valid_pixels(header.dataset_id, facts)
    return facts


def validate_dataset(dataset_dir: str | Path, header: DatasetHeader, workers: int | None = None) -> list[DatasetItem]:
    """Discover the items and read every file against the header; raises DatasetError on the first problem."""
    items = discover_items(dataset_dir, header)
    scan_items(items, header, workers)
    return items


def check_consistency(facts: Sequence[ItemFacts], infer: bool = False) -> None:
    """Cross-file rules a per-file check cannot see: one dtype per modality; when inferring, one band
    count and one band selection for the inputs (a header has one of each)."""
    for role in ("input", "target"):
        files = [getattr(f, role) for f in facts if getattr(f, role) is not None]
        first = files[0] if files else None
        for other in files:
            if other.dtype != first.dtype:
                raise DatasetError(
                    f"{other.path}: dtype: is {other.dtype} but {first.path} is {first.dtype} (same modality)"
                )
    if not infer or not facts:
        return
    first = facts[0].input
    for other in (f.input for f in facts):
        if other.count != first.count:
            raise DatasetError(f"{other.path}: channels: has {other.count} bands but {first.path} has {first.count}")
        if infer_bands(other.colorinterp) != infer_bands(first.colorinterp):
            raise DatasetError(
                f"{other.path}: bands: colour interpretation {list(other.colorinterp)} differs from "
                f"{first.path}'s {list(first.colorinterp)}; commit a header that declares bands"
            )


def check_valid_pixels(dataset_id: str, facts: Sequence[ItemFacts]) -> None:
    """Refuse a dataset without a valid input pixel (naming it), then an input file without one (naming it);
    chips of one source count together (see the module docstring)."""
    per_file: dict[Path, int] = {}
    for fact in facts:
        per_file[fact.input.path] = per_file.get(fact.input.path, 0) + fact.valid_pixels
    if not any(per_file.values()):
        raise DatasetError(
            f"dataset {dataset_id!r}: no valid input pixel in any of its {len(per_file)} files "
            "(every pixel is nodata, masked or alpha 0): nothing to train on"
        )
    empty = [path for path, count in per_file.items() if count == 0]
    if empty:
        raise DatasetError(
            f"{empty[0]}: no valid pixel (every pixel is nodata, masked or alpha 0; {len(empty)} of the "
            f"{len(per_file)} input files have none): remove the file or correct its nodata, alpha band or mask"
        )


# --------------------------------------------------------------------------------------------- inference


def _layout_pattern(dataset_dir: Path, folder: str) -> tuple[str, list[str]]:
    """`images/*.tif` or `images/{split}/*.tif` with the raw split names found."""
    base = dataset_dir / folder
    direct = [PurePosixPath(rel) for rel in tiff_files(base, dataset_dir) if "/" not in rel]
    nested = sorted(
        p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and tiff_files(p, dataset_dir)
    )
    if direct and nested:
        raise DatasetError(f"{base}: holds both GeoTIFFs and raw-split sub-folders {nested}; use one layout")
    files = direct or [PurePosixPath(rel) for name in nested for rel in tiff_files(base / name, dataset_dir)]
    suffix = "*.tif" if all(p.name.lower().endswith(".tif") for p in files) else "*"
    return (f"{folder}/{{split}}/{suffix}", nested) if nested else (f"{folder}/{suffix}", [])


def layout_header(dataset_dir: str | Path, dataset_id: str | None = None) -> DatasetHeader:
    """The header's structure from the folder layout alone (no file opened): patterns, pairing, raw splits."""
    dataset_dir = Path(dataset_dir)
    dataset_id = dataset_id or dataset_dir.name
    if not (dataset_dir / INPUT_FOLDER).is_dir():
        raise DatasetError(f"{dataset_dir}: empty dataset: no {INPUT_FOLDER}/ folder with input GeoTIFFs")
    input_pattern, raw = _layout_pattern(dataset_dir, INPUT_FOLDER)
    modalities = [Modality(name=INPUT_MODALITY, role="input", pattern=input_pattern)]
    target = None
    if (dataset_dir / TARGET_FOLDER).is_dir():
        target_pattern, target_raw = _layout_pattern(dataset_dir, TARGET_FOLDER)
        if bool(target_raw) != bool(raw):  # masks in fewer raw splits than images is fine, a flat/nested mix not
            raise DatasetError(
                f"{dataset_dir / TARGET_FOLDER}: raw split folders {target_raw} but {INPUT_FOLDER}/ has {raw}; "
                "use the same layout for both"
            )
        modalities.append(Modality(name=TARGET_MODALITY, role="target", pattern=target_pattern, channels=1))
        target = TARGET_MODALITY
    return header_from_dict(
        {
            "dataset_id": dataset_id,
            "version": HEADER_VERSION,
            "description": f"inferred from the layout of {dataset_id}/",
            "modalities": [m.model_dump() for m in modalities],
            "pairing": {"strategy": "by_stem", "input_modality": INPUT_MODALITY, "target_modality": target},
            "splits": {"raw": raw},
        },
        dataset_dir,
    )


def infer_value_range(facts: Sequence[ItemFacts]) -> tuple[float, float] | None:
    """The 2nd/98th percentile of the pooled value samples (None for uint8 inputs)."""
    samples = [f.value_sample for f in facts if f.value_sample is not None]
    if not samples:
        return None
    pooled = np.concatenate(samples)
    if pooled.size == 0:
        raise DatasetError(f"{facts[0].input.path}: value_range: no valid input pixel to infer it from (all nodata?)")
    lo, hi = (float(v) for v in np.percentile(pooled, VALUE_PERCENTILES))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def complete_header(layout: DatasetHeader, facts: Sequence[ItemFacts]) -> DatasetHeader:
    """Fill channels, dtype, CRS, nodata, georef_required, bands, alpha band, value range and label values
    from the scanned (consistent) files."""
    updates = {}
    for modality, role in ((layout.input, "input"), (layout.target, "target")):
        files = [getattr(f, role) for f in facts if getattr(f, role) is not None]
        if modality is None or not files:
            continue
        nodata = {f.nodata for f in files}
        fields: dict[str, Any] = {
            "channels": files[0].count,
            "dtype": files[0].dtype,
            "crs": sorted({f.crs for f in files if f.crs is not None}) or None,
            "georef_required": all(f.georeferenced for f in files),
            "nodata": nodata.pop() if len(nodata) == 1 else None,
        }
        if role == "input":
            fields["bands"], fields["alpha_band"] = infer_bands(files[0].colorinterp)
            fields["value_range"] = infer_value_range(facts)
        else:
            fields["label_values"] = sorted({v for f in facts for v in f.label_values})
        updates[modality.name] = Modality.model_validate({**modality.model_dump(), **fields})
    modalities = [updates.get(m.name, m) for m in layout.modalities]
    return layout.model_copy(update={"modalities": modalities})


def read_licence(dataset_dir: Path) -> str | None:
    """The first non-empty line of the dataset folder's licence file, capped at ``LICENCE_MAX_CHARS``; None
    without such a file or line. Any bytes are taken: undecodable ones read as U+FFFD, control
    characters are dropped, so a stray binary file never stops an extraction. A licence file leading outside
    the dataset folder is refused unread: its first line would be printed and shipped in meta.json."""
    path = next((dataset_dir / name for name in LICENCE_FILES if (dataset_dir / name).is_file()), None)
    if path is None:
        return None
    resolve_inside(path, dataset_root_of(dataset_dir), "licence file")
    try:
        with path.open("rb") as handle:
            text = handle.read(LICENCE_READ_BYTES).decode("utf-8", errors="replace")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the licence file: {exc.strerror}") from None
    for line in text.splitlines():
        line = "".join(char for char in line if char.isprintable()).strip()
        if line:
            return line[:LICENCE_MAX_CHARS].rstrip()
    return None


def ground_resolution_range(facts: Sequence[ItemFacts]) -> tuple[float, float] | None:
    """[min, max] of the georeferenced inputs' ground pixel sizes (x and y); None when none is georeferenced."""
    sizes = [size for f in facts if f.input.pixel_size_m is not None for size in f.input.pixel_size_m]
    return (min(sizes), max(sizes)) if sizes else None


def describe_data(header: DatasetHeader, dataset_dir: Path, facts: Sequence[ItemFacts]) -> DatasetHeader:
    """The header with the descriptive fields it leaves out filled: ``licence`` from the licence file, the
    input's ``ground_resolution_m`` from the scanned files. Neither changes how pixels are read."""
    licence = header.licence if header.licence is not None else read_licence(dataset_dir)
    resolution = header.input.ground_resolution_m or ground_resolution_range(facts)
    rgb = header.input.model_copy(update={"ground_resolution_m": resolution})
    modalities = [rgb if modality.name == rgb.name else modality for modality in header.modalities]
    return header.model_copy(update={"licence": licence, "modalities": modalities})


def committed_header_path(dataset_dir: str | Path) -> Path | None:
    path = Path(dataset_dir) / HEADER_FILENAME
    return path if path.is_file() else None


def load_committed_header(dataset_dir: Path, dataset_id: str | None) -> DatasetHeader | None:
    path = committed_header_path(dataset_dir)
    if path is None:
        return None
    resolve_inside(path, dataset_root_of(dataset_dir), "committed header")
    header = load_header(path)
    expected = dataset_id or dataset_dir.name
    if header.dataset_id != expected:
        raise DatasetError(f"{path}: dataset_id: is {header.dataset_id!r} but the dataset folder is {expected!r}")
    return header


@dataclass(frozen=True)
class DatasetScan:
    """A dataset folder read once: its header (committed, or inferred), items and per-item facts."""

    header: DatasetHeader
    committed: bool
    items: list[DatasetItem]
    facts: list[ItemFacts]

    @property
    def label_values(self) -> list[int]:
        return sorted({v for f in self.facts for v in f.label_values})

    @property
    def crs(self) -> list[str]:
        return sorted({f.input.crs for f in self.facts if f.input.crs is not None})


def scan_dataset(dataset_dir: str | Path, dataset_id: str | None = None, workers: int | None = None) -> DatasetScan:
    """Read every file once: validated against the committed header if there is one, else used to infer it;
    either way the descriptive fields the header leaves out are filled (``describe_data``). The header's
    ``splits.manifest_files`` are read and checked too, so a bad pin list stops here, not at the shard build."""
    dataset_dir = Path(dataset_dir)
    require_utf8(dataset_dir, "dataset folder")
    committed = load_committed_header(dataset_dir, dataset_id)
    header = committed or layout_header(dataset_dir, dataset_id)
    items = discover_items(dataset_dir, header)
    read_pinned_splits(dataset_dir, header, items)
    facts = scan_items(items, header, workers, infer=committed is None)
    if committed is None:
        header = complete_header(header, facts)
    header = describe_data(header, dataset_dir, facts)
    return DatasetScan(header, committed is not None, items, facts)


def extract_header(dataset_dir: str | Path, dataset_id: str | None = None, workers: int | None = None) -> DatasetHeader:
    """The committed header, once every file was validated against it; else the header inferred from the files
    (either with its descriptive fields filled, see ``describe_data``)."""
    return scan_dataset(dataset_dir, dataset_id, workers).header
