"""Processed shards (layout v0): build, read and verify.

```
<processed_root>/<dataset_id>/<split>/shard-00000/inputs/<item_id>.tif
                                                /targets/<item_id>.tif   (labeled items)
                                                /index.jsonl
<processed_root>/<dataset_id>/manifest.json       counts, tile counts, seed, header hash, data version
<processed_root>/<dataset_id>/dataset_header.yaml the header the build used
```

Chips. A source raster taller or wider than ``sharding.chip_size`` is cut into chips on a grid of that size
from its top-left pixel; the last row and column of chips are clipped, so every pixel is in exactly one
chip. Each chip is an item ``<source item id>@r<row>_c<col>`` (pixel offsets) whose index line adds
``source_item`` and ``window`` (``[col_off, row_off, width, height]``); a smaller raster stays one item
under its own id. The split rule and the manifest's ``counts`` are about source rasters: every chip of a
source is in its source's split (no area of one raster in two splits); ``tile_counts`` counts the items.

Tiles are uncompressed GeoTIFFs (unless the header says otherwise) keeping bands, dtype, CRS, nodata and
mask band; a chip's transform is its window's. Each chip (input and target tile) is its own task, reading
only its window of the source, so a build holds about one chip per worker whatever the size of the rasters.

Items are written in parallel into a hidden sibling ``.<dataset_id>.building-*``; the manifest is written
last, then the folder is swapped in: the previous one is renamed aside, the new one renamed in, the old one
deleted. A crash at any point leaves a complete old or new folder: if it hits between the two renames the
old one waits aside and the next build puts it back before anything else; leftovers of dead builds are
removed then too. Builds of one dataset
must not run concurrently (Dagster runs one per partition). The manifest holds no timestamps, so a rebuild
of the same data and settings is byte-identical.

A processed dataset folder that is a symbolic link (shards kept on another disk) stays a link: the build is
staged beside the folder it leads to and swapped in there. A build never replaces what is not a build: a
non-empty folder without a manifest, a file, or a place overlapping the raw dataset folder is refused.

An item is listed once: ``read_index`` and ``iter_split_items`` (what the loaders read) refuse an item or a
tile listed twice, naming the index file, the line and the item (a duplicated line would be trained on and
scored twice), and ``verify_shards`` reports each repeat.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dataclass_replace
from functools import partial
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import RasterioError
from rasterio.windows import Window

from runtime_export import rasters
from runtime_export.atomic import verify_raster
from runtime_export.cli import run_cli
from runtime_export.errors import DatasetError
from runtime_export.numpy_runtime.pixels import PixelRule
from runtime_export.rasters import distinct_values, has_mask_band, open_raster, raster_facts
from training_core.datasets.built import built_header
from training_core.datasets.discovery import (
    DatasetItem,
    dataset_content_hash,
    dataset_folder,
    dataset_root_of,
    discover_datasets,
    discover_items,
    require_utf8,
)
from training_core.datasets.scan import (
    ItemFacts,
    ItemPool,
    check_consistency,
    check_label_values,
    check_valid_pixels,
    complete_header,
    describe_data,
    inferred_rule,
    inferred_value_sample,
    layout_header,
    load_committed_header,
    open_item,
    sample_size_for,
)
from training_core.datasets.schema import (
    HEADER_FILENAME,
    DatasetHeader,
    Modality,
    Sharding,
    dump_header,
    header_from_dict,
    header_hash,
    load_header,
)
from training_core.splits import SPLITS, assign_splits, read_pinned_splits, split_counts

PROG = "segpipe-shards"
LAYOUT_VERSION = 0
MANIFEST_FILENAME = "manifest.json"
INDEX_FILENAME = "index.jsonl"
INPUTS_DIR, TARGETS_DIR = "inputs", "targets"

ChipWindow = tuple[int, int, int, int]  # col_off, row_off, width, height in source pixels


@dataclass(frozen=True)
class IndexEntry:
    """One line of index.jsonl; `input` and `target` are relative to the shard directory. A chip names its
    source raster's item and its window of it."""

    dataset_id: str
    item_id: str
    raw_split: str | None
    split: str
    input: str
    has_target: bool
    target: str | None = None
    input_sha256: str | None = None  # of the tile file: verify_shards finds truncated or altered tiles
    target_sha256: str | None = None
    source_item: str | None = None  # chips only
    window: ChipWindow | None = None

    @property
    def source(self) -> str:
        """The item id of the source raster: the split rule's unit."""
        return self.item_id if self.source_item is None else self.source_item

    def to_json(self) -> str:
        line = asdict(self)
        return json.dumps(
            {key: value for key, value in line.items() if value is not None or key not in _INDEX_OPTIONAL}
        )


def chip_id(source_item: str, row: int, col: int) -> str:
    return f"{source_item}@r{row}_c{col}"


def chip_windows(height: int, width: int, chip_size: int) -> list[ChipWindow]:
    """The chip grid of a raster, row by row from (0, 0); the last row and column clipped to the raster."""
    return [
        (col, row, min(chip_size, width - col), min(chip_size, height - row))
        for row in range(0, height, chip_size)
        for col in range(0, width, chip_size)
    ]


@dataclass(frozen=True)
class Chip:
    """One item of the shards: a whole source raster (``window`` None) or one window of it."""

    source: DatasetItem
    window: ChipWindow | None = None

    @property
    def item_id(self) -> str:
        if self.window is None:
            return self.source.item_id
        col, row, _, _ = self.window
        return chip_id(self.source.item_id, row, col)


def plan_chips(items: Sequence[DatasetItem], chip_size: int) -> list[Chip]:
    """The items' chips, in item order and grid order within an item; opens each input for its size only."""
    chips: list[Chip] = []
    for item in items:
        with open_raster(item.input_path) as src:
            height, width = src.height, src.width
        if height <= chip_size and width <= chip_size:
            chips.append(Chip(item))
        else:
            chips += [Chip(item, window) for window in chip_windows(height, width, chip_size)]
    return chips


@dataclass(frozen=True)
class ShardPlan:
    """What a build will write, known before any pixel is read."""

    dataset_dir: Path
    header: DatasetHeader
    header_committed: bool
    items: list[DatasetItem]
    assignment: dict[str, str]  # source item id -> split
    pinned: dict[str, str]
    chips: list[Chip]

    @property
    def counts(self) -> dict[str, int]:
        """Source rasters per split (the split rule's counts)."""
        return split_counts(self.assignment)

    @property
    def tile_counts(self) -> dict[str, int]:
        """Items (chips and whole rasters) per split."""
        return split_counts({chip.item_id: self.assignment[chip.source.item_id] for chip in self.chips})

    def shards(self) -> dict[str, list[list[Chip]]]:
        """split -> shards (chip lists of at most shard_size; sources sorted by id, chips in grid order)."""
        size = self.header.sharding.shard_size
        out: dict[str, list[list[Chip]]] = {}
        for split in SPLITS:
            members = [chip for chip in self.chips if self.assignment[chip.source.item_id] == split]
            out[split] = [members[i : i + size] for i in range(0, len(members), size)]
        return out


@dataclass
class ShardBuildReport:
    """What a build produced (or found up to date: reused); JSON-friendly through to_dict."""

    dataset_id: str
    counts: dict[str, int]  # source rasters per split
    tile_counts: dict[str, int]  # items (chips) per split
    n_items: int
    n_labeled: int
    bytes_written: int
    elapsed_s: float
    data_version: str
    header_hash: str
    manifest_path: Path
    header_path: Path
    label_values: list[int]
    crs: list[str]
    seed: int
    shard_size: int
    reused: bool = False
    shards: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self), "manifest_path": str(self.manifest_path), "header_path": str(self.header_path)}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def tile_relpath(folder: str, item_id: str) -> str:
    return f"{folder}/{item_id}.tif"


# ---------------------------------------------------------------------------------------------- planning


def plan_shards(
    extracted_root: str | Path,
    dataset_id: str,
    *,
    seed: int | None = None,
    shard_size: int | None = None,
    header_path: str | Path | None = None,
) -> ShardPlan:
    """Header (``header_path``, else the committed one, else the layout part of the inferred one), items and
    split assignment. ``header_path`` is an extracted header (the ``dataset_header`` asset's file): it is
    authoritative like a committed one."""
    dataset_dir = dataset_folder(extracted_root, dataset_id)
    require_utf8(dataset_dir, "dataset folder")
    committed = load_committed_header(dataset_dir, dataset_id)
    if header_path is not None:
        committed = load_header(header_path)
        if committed.dataset_id != dataset_id:
            raise DatasetError(f"{header_path}: dataset_id: is {committed.dataset_id!r}, expected {dataset_id!r}")
    header = committed or layout_header(dataset_dir, dataset_id)
    if seed is not None or shard_size is not None:
        data = header.model_dump()
        data["splits"]["seed"] = header.splits.seed if seed is None else seed
        data["sharding"]["shard_size"] = header.sharding.shard_size if shard_size is None else shard_size
        header = header_from_dict(data, f"{dataset_dir} (seed/shard_size overrides)")
    items = discover_items(dataset_dir, header)
    pinned = read_pinned_splits(dataset_dir, header, items)
    assignment = assign_splits(items, header, pinned)
    chips = plan_chips(items, header.sharding.chip_size)
    return ShardPlan(dataset_dir, header, committed is not None, items, assignment, pinned, chips)


def build_key(plan: ShardPlan, data_version: str) -> str:
    """Identifies a build's inputs: an inferred header is a function of the data, so data version plus the
    planned header (settings, overrides) decide the output."""
    return hashlib.sha256(f"{LAYOUT_VERSION}:{data_version}:{header_hash(plan.header)}".encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class _TileTask:
    chip: Chip
    shard_dir: Path


def _window_strips(src: rasterio.DatasetReader, window: Window) -> Iterator[tuple[Window, Window, np.ndarray]]:
    """(source window, tile window, all bands' raw values) of ``window`` in row strips of at most BLOCK_BYTES."""
    row_bytes = window.width * src.count * np.dtype(src.dtypes[0]).itemsize
    rows = max(1, rasters.BLOCK_BYTES // max(1, row_bytes))
    for top in range(0, window.height, rows):
        height = min(rows, window.height - top)
        strip = Window(window.col_off, window.row_off + top, window.width, height)
        try:
            block = src.read(window=strip)
        except RasterioError:
            raise DatasetError(f"{src.name}: cannot read pixels (truncated or corrupt TIFF?)") from None
        yield strip, Window(0, top, window.width, height), block


def _window_transform(window: Window, transform: Affine) -> Affine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # rasterio 1.4 multiplies Affines with `*`
        return rasterio.windows.transform(window, transform)


def _copy_tile(
    src: rasterio.DatasetReader,
    window: Window,
    dst: Path,
    modality: Modality,
    sharding: Sharding,
    rule: PixelRule | None = None,
) -> tuple[set[int], int]:
    """Stream ``window`` of src into dst verbatim (every band, source dtype, CRS, nodata, its own mask band; the
    window's transform); returns the distinct values seen (targets) and, given an input's ``rule``, its count of
    valid pixels (0 without), strip by strip. The tile is read back before it counts as written."""
    profile = {
        "driver": "GTiff",
        "width": window.width,
        "height": window.height,
        "count": src.count,
        "dtype": src.dtypes[0],
        "crs": src.crs,
        "transform": _window_transform(window, src.transform),
        "nodata": src.nodata if src.nodata is not None else modality.nodata,
        "BIGTIFF": "IF_SAFER",
    }
    if not sharding.force_uncompressed_tiff and src.compression is not None:
        profile["compress"] = src.compression.value
    mask_band = has_mask_band(src)
    values: set[int] = set()
    valid_pixels = 0
    try:
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(dst, "w", **profile) as out:
            out.colorinterp = src.colorinterp
            for strip, tile_strip, block in _window_strips(src, window):
                out.write(block, window=tile_strip)
                mask = src.read_masks(1, window=strip) if mask_band else None
                if mask is not None:
                    out.write_mask(mask, window=tile_strip)
                if modality.role == "target":
                    values |= distinct_values(block)
                if rule is not None:
                    raw = block[np.array(rule.indexes) - 1]
                    valid = rule.valid_mask(raw, src.nodata, None if mask is None else mask > 0)
                    valid_pixels += raw.shape[1] * raw.shape[2] if valid is None else int(np.count_nonzero(valid))
    except RasterioError as exc:
        raise OSError(f"{dst}: cannot write the tile (disk full?): {exc}") from None
    verify_raster(dst, full=False)
    return values, valid_pixels


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_item(task: _TileTask, header: DatasetHeader, infer: bool, sample_size: int) -> ItemFacts:
    """One tile task: open the chip's source, copy its window (input, then target), collect its labels and,
    under inference, its share of the value sample. The facts are the chip's; its RasterFacts the source's."""
    chip, item = task.chip, task.chip.source
    with open_item(item, header, infer) as opened:
        col, row, width, height = chip.window or (0, 0, opened.input.width, opened.input.height)
        window = Window(col, row, width, height)
        written = [task.shard_dir / tile_relpath(INPUTS_DIR, chip.item_id)]
        rule = inferred_rule(opened.input_facts) if infer else header.pixel_rule
        _, valid_pixels = _copy_tile(opened.input, window, written[0], header.input, header.sharding, rule)
        labels: tuple[int, ...] = ()
        if opened.target is not None:
            written.append(task.shard_dir / tile_relpath(TARGETS_DIR, chip.item_id))
            values, _ = _copy_tile(opened.target, window, written[1], header.target, header.sharding)
            labels = tuple(sorted(values))
            check_label_values(item.target_path, labels, header.target)
    sample = None
    if infer:
        # Drawn from the tile just written: the chip's pixels, nodata and mask, seeded by the chip's id (a whole
        # raster's sample is the one header extraction draws).
        with open_raster(written[0]) as tile:
            chip_view = dataclass_replace(opened, item=dataclass_replace(item, item_id=chip.item_id), input=tile)
            sample = inferred_value_sample(chip_view, header.splits.seed, sample_size)
    size = sum(path.stat().st_size for path in written)
    return ItemFacts(
        chip.item_id,
        opened.input_facts,
        opened.target_facts,
        labels,
        size,
        value_sample=sample,
        sha256=tuple(_sha256(path) for path in written),
        valid_pixels=valid_pixels,
    )


def _write_shards(plan: ShardPlan, out_dir: Path, pool: ItemPool) -> tuple[DatasetHeader, list[ItemFacts], dict]:
    """Write every tile and index into out_dir; returns the completed header, the facts and the shard names."""
    tasks: list[_TileTask] = []
    members_of: dict[Path, list[Chip]] = {}
    shard_names: dict[str, list[str]] = {}
    for split, shards in plan.shards().items():
        shard_names[split] = []
        for number, members in enumerate(shards):
            shard_dir = out_dir / split / shard_name(number)
            (shard_dir / INPUTS_DIR).mkdir(parents=True)
            if any(chip.source.labeled for chip in members):
                (shard_dir / TARGETS_DIR).mkdir()
            shard_names[split].append(f"{split}/{shard_name(number)}")
            tasks += [_TileTask(chip, shard_dir) for chip in members]
            members_of[shard_dir] = members
    infer = not plan.header_committed
    # Each chip draws its share of the value sample: a large raster weighs by its area.
    write = partial(_write_item, header=plan.header, infer=infer, sample_size=sample_size_for(len(plan.chips)))
    facts = pool.map(write, tasks)
    check_consistency(facts, infer)
    check_valid_pixels(plan.header.dataset_id, facts)
    header = complete_header(plan.header, facts) if infer else plan.header
    header = describe_data(header, plan.dataset_dir, facts)
    facts_of = {f.item_id: f for f in facts}
    for shard_dir, members in members_of.items():
        entries = [
            _index_entry(plan.header.dataset_id, chip, plan.assignment[chip.source.item_id], facts_of[chip.item_id])
            for chip in members
        ]
        (shard_dir / INDEX_FILENAME).write_text("".join(entry.to_json() + "\n" for entry in entries))
    return header, facts, shard_names


def _index_entry(dataset_id: str, chip: Chip, split: str, facts: ItemFacts) -> IndexEntry:
    item = chip.source
    target = tile_relpath(TARGETS_DIR, chip.item_id) if item.labeled else None
    return IndexEntry(
        dataset_id,
        chip.item_id,
        item.raw_split,
        split,
        tile_relpath(INPUTS_DIR, chip.item_id),
        item.labeled,
        target,
        input_sha256=facts.sha256[0],
        target_sha256=facts.sha256[1] if item.labeled else None,
        source_item=None if chip.window is None else item.item_id,
        window=chip.window,
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(processed_root: Path, dataset_id: str) -> None:
    """Undo what a crashed build left: put back a folder renamed aside, drop dead builds' temp folders."""
    final = processed_root / dataset_id
    asides = sorted(processed_root.glob(f".{dataset_id}.old-*"), key=lambda p: p.stat().st_mtime)
    if not final.exists() and asides and (asides[-1] / MANIFEST_FILENAME).is_file():
        os.rename(asides.pop(), final)
    for aside in asides:
        shutil.rmtree(aside, ignore_errors=True)
    for building in processed_root.glob(f".{dataset_id}.building-*"):
        pid = building.name.rsplit("-", 2)[-2]
        if not (pid.isdigit() and _pid_alive(int(pid))):
            shutil.rmtree(building, ignore_errors=True)


def _build_place(final: Path, dataset_dir: Path) -> Path:
    """Where a build is swapped in: ``final``, or the folder it leads to when it is a link (so the link stays a
    link and the rename stays on one file system). Refused, as a build would replace what is not a build: a
    place overlapping the raw dataset folder, a file, a non-empty folder without a manifest."""
    place = Path(os.path.realpath(final)) if final.is_symlink() else final
    leads = f" (a link to {place})" if place != final else ""
    require_utf8(place, "processed dataset folder")
    raw = dataset_root_of(dataset_dir)
    real = Path(os.path.realpath(place))
    if real.is_relative_to(raw) or raw.is_relative_to(real):
        raise DatasetError(f"{final}{leads}: processed dataset folder overlaps the raw dataset folder {raw}")
    if not place.parent.is_dir():
        raise DatasetError(f"{final}{leads}: the folder {place.parent} to build in does not exist")
    if place.exists() and not place.is_dir():
        raise DatasetError(f"{final}{leads}: exists and is not a folder; move it away or choose another processed root")
    if place.is_dir() and not (place / MANIFEST_FILENAME).is_file() and any(place.iterdir()):
        raise DatasetError(
            f"{final}{leads}: exists and is not a shard build (no {MANIFEST_FILENAME}); move it away or choose "
            "another processed root"
        )
    return place


def _swap_in(new_dir: Path, final: Path) -> None:
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(final, aside)
    os.rename(new_dir, final)
    if aside is not None:
        shutil.rmtree(aside)


def _report(manifest: dict, manifest_path: Path, elapsed_s: float, reused: bool) -> ShardBuildReport:
    return ShardBuildReport(
        dataset_id=manifest["dataset_id"],
        counts=manifest["counts"],
        tile_counts=manifest["tile_counts"],
        n_items=manifest["n_items"],
        n_labeled=manifest["n_labeled"],
        bytes_written=manifest["bytes_written"],
        elapsed_s=elapsed_s,
        data_version=manifest["data_version"],
        header_hash=manifest["header_hash"],
        manifest_path=manifest_path,
        header_path=manifest_path.parent / HEADER_FILENAME,
        label_values=manifest["label_values"],
        crs=manifest["crs"],
        seed=manifest["seed"],
        shard_size=manifest["shard_size"],
        reused=reused,
        shards=manifest["shards"],
    )


def build_shards(
    extracted_root: str | Path,
    processed_root: str | Path,
    dataset_id: str,
    *,
    seed: int | None = None,
    shard_size: int | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    header_path: str | Path | None = None,
) -> ShardBuildReport:
    """Build the dataset's shards and swap them in atomically.

    An existing output built from the same data and settings is reused (``reused=True``); one built from
    anything else is replaced only with ``overwrite=True``. Bad input raises DatasetError and leaves the
    processed root as it was.
    """
    started = time.perf_counter()
    processed_root = Path(processed_root)
    require_utf8(processed_root, "processed root")
    plan = plan_shards(extracted_root, dataset_id, seed=seed, shard_size=shard_size, header_path=header_path)
    processed_root.mkdir(parents=True, exist_ok=True)
    final = processed_root / dataset_id
    place = _build_place(final, plan.dataset_dir)
    _recover(place.parent, place.name)
    if final.exists() and not overwrite:
        existing = _read_manifest_file(final / MANIFEST_FILENAME)
        if existing.get("build_key") != build_key(plan, dataset_content_hash(plan.dataset_dir)):
            raise DatasetError(
                f"{final}: exists and was built from other data or settings (build_key differs); "
                "pass overwrite=True (--overwrite) to replace it"
            )
        return _report(existing, final / MANIFEST_FILENAME, time.perf_counter() - started, reused=True)
    out_dir = place.parent / f".{place.name}.building-{os.getpid()}-{secrets.token_hex(4)}"
    out_dir.mkdir()
    try:
        with ItemPool(workers, len(plan.chips)) as pool:
            # The content hash reads every source byte: one worker does it beside the tile writers.
            data_version = pool.submit(dataset_content_hash, plan.dataset_dir)
            header, facts, shard_names = _write_shards(plan, out_dir, pool)
            manifest = _manifest(plan, header, facts, shard_names, data_version.result())
        dump_header(header, out_dir / HEADER_FILENAME)
        # The manifest is written last: a folder with a manifest is a complete build.
        (out_dir / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_in(out_dir, place)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return _report(manifest, final / MANIFEST_FILENAME, time.perf_counter() - started, reused=False)


def _manifest(
    plan: ShardPlan, header: DatasetHeader, facts: list[ItemFacts], shard_names: dict, data_version: str
) -> dict:
    return {
        "layout_version": LAYOUT_VERSION,
        "dataset_id": header.dataset_id,
        "seed": header.splits.seed,
        "shard_size": header.sharding.shard_size,
        "chip_size": header.sharding.chip_size,
        "header_hash": header_hash(header),
        "data_version": data_version,
        "build_key": build_key(plan, data_version),
        "counts": plan.counts,
        "tile_counts": plan.tile_counts,
        "n_items": len(plan.items),
        "n_labeled": sum(item.labeled for item in plan.items),
        "shards": shard_names,
        "label_values": sorted({v for f in facts for v in f.label_values}),
        "crs": sorted({f.input.crs for f in facts if f.input.crs is not None}),
        "bytes_written": sum(f.bytes_written for f in facts),
        "pinned": plan.pinned,
    }


# ------------------------------------------------------------------------------------------------ reading


def _read_manifest_file(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no manifest (shards not built, or a build did not finish)") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: manifest is not valid JSON: {exc.msg}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: manifest is not UTF-8 text (corrupt?)") from None
    if not isinstance(manifest, dict) or manifest.get("layout_version") != LAYOUT_VERSION:
        raise DatasetError(f"{path}: layout_version: expected {LAYOUT_VERSION}")
    return manifest


def read_manifest(processed_root: str | Path, dataset_id: str) -> dict:
    return _read_manifest_file(Path(processed_root) / dataset_id / MANIFEST_FILENAME)


def _inside(shard_dir: Path, rel: object, where: str, key: str) -> str:
    """The relative path, if it names a file inside shard_dir: absolute paths and `..` are refused."""
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{where}: {key}: expected a relative path, got {rel!r}")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise DatasetError(f"{where}: {key}: absolute path {rel!r} (index paths are relative to the shard)")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise DatasetError(f"{where}: {key}: path {rel!r} leaves the shard directory")
    if not (shard_dir / rel).resolve().is_relative_to(shard_dir.resolve()):
        raise DatasetError(f"{where}: {key}: path {rel!r} resolves outside the shard directory")
    return rel


_INDEX_TYPES = {"dataset_id": str, "item_id": str, "raw_split": (str, type(None)), "split": str, "has_target": bool}
_INDEX_OPTIONAL = {"target", "input_sha256", "target_sha256", "source_item", "window"}


def _chip_keys(data: dict, where: str) -> tuple[str | None, ChipWindow | None]:
    """A chip's ``source_item`` and ``window`` (both or neither): offsets >= 0, sizes >= 1, integers."""
    source, window = data.get("source_item"), data.get("window")
    if (source is None) != (window is None):
        raise DatasetError(f"{where}: source_item and window go together, got {source!r} and {window!r}")
    if source is None:
        return None, None
    if not isinstance(source, str) or not source:
        raise DatasetError(f"{where}: source_item: unexpected value {source!r}")
    if not (
        isinstance(window, list)
        and len(window) == 4
        and all(isinstance(v, int) and not isinstance(v, bool) for v in window)
        and min(window[:2]) >= 0
        and min(window[2:]) >= 1
    ):
        raise DatasetError(f"{where}: window: expected [col_off, row_off, width, height], got {window!r}")
    return source, tuple(window)


def _parse_index_line(shard_dir: Path, line: str, where: str) -> IndexEntry:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: expected a JSON object")
    required = {*_INDEX_TYPES, "input"}
    if missing := sorted(required - data.keys()):
        raise DatasetError(f"{where}: missing key {missing[0]!r}")
    if unknown := sorted(data.keys() - required - _INDEX_OPTIONAL):
        raise DatasetError(f"{where}: unknown key {unknown[0]!r}")
    for key, kind in _INDEX_TYPES.items():
        if not isinstance(data[key], kind):
            raise DatasetError(f"{where}: {key}: unexpected value {data[key]!r}")
    if data["split"] not in SPLITS:
        raise DatasetError(f"{where}: split: {data['split']!r} is not one of {SPLITS}")
    target = data.get("target")
    if data["has_target"] != (target is not None):
        raise DatasetError(f"{where}: has_target is {data['has_target']} but target is {target!r}")
    source_item, window = _chip_keys(data, where)
    return IndexEntry(
        data["dataset_id"],
        data["item_id"],
        data["raw_split"],
        data["split"],
        _inside(shard_dir, data["input"], where, "input"),
        data["has_target"],
        None if target is None else _inside(shard_dir, target, where, "target"),
        data.get("input_sha256"),
        data.get("target_sha256"),
        source_item,
        window,
    )


def _index_lines(shard_dir: Path) -> list[tuple[str, IndexEntry]]:
    """``(<index file>:<line>, entry)`` for each line of a shard's index.jsonl, paths checked (see read_index)."""
    index = shard_dir / INDEX_FILENAME
    try:
        lines = index.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{index}: missing shard index") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{index}: not UTF-8 text (corrupt?)") from None
    found = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            where = f"{index}:{number}"
            found.append((where, _parse_index_line(shard_dir, line, where)))
    return found


def _repeat(first_at: dict[tuple[str, str], str], where: str, shard_dir: Path, entry: IndexEntry) -> str | None:
    """The problem if the entry's item, or its input tile, was listed before (``first_at``: what was listed ->
    where), else None, noting it. A repeat would be trained on and scored twice."""
    for key, what in (
        (("item", entry.item_id), f"item {entry.item_id!r}"),
        (("tile", str(shard_dir / entry.input)), f"item {entry.item_id!r}: tile {entry.input!r}"),
    ):
        first = first_at.setdefault(key, where)
        if first != where:
            return f"{where}: {what} is listed again, first at {first} (an item is listed once)"
    return None


def _read_index(shard_dir: Path, first_at: dict[tuple[str, str], str]) -> list[IndexEntry]:
    entries = []
    for where, entry in _index_lines(shard_dir):
        if (problem := _repeat(first_at, where, shard_dir, entry)) is not None:
            raise DatasetError(problem)
        entries.append(entry)
    return entries


def read_index(shard_dir: str | Path) -> list[IndexEntry]:
    """Parse a shard's index.jsonl; rejects absolute or escaping paths and an item or tile listed twice, naming
    file and line."""
    return _read_index(Path(shard_dir), {})


def shard_dirs(processed_root: str | Path, dataset_id: str, split: str) -> list[Path]:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    split_dir = Path(processed_root) / dataset_id / split
    return sorted(p for p in split_dir.glob("shard-*") if p.is_dir()) if split_dir.is_dir() else []


def iter_split_items(processed_root: str | Path, dataset_id: str, split: str) -> Iterator[tuple[Path, IndexEntry]]:
    """(shard directory, entry) for every item of a split, as ``read_index`` reads them; an item listed in two
    shards of the split is refused too, naming both places."""
    first_at: dict[tuple[str, str], str] = {}
    for shard_dir in shard_dirs(processed_root, dataset_id, split):
        for entry in _read_index(shard_dir, first_at):
            yield shard_dir, entry


# --------------------------------------------------------------------------------------------- verifying


def tile_problems(shard_dir: Path, entry: IndexEntry, header: DatasetHeader) -> list[str]:
    """A tile whose bytes differ from the checksum the build recorded (truncated, altered), or that does not
    open with what the header reads (input bands, a chip its window's size, a target of one band and its
    input's size)."""
    problems = []
    tiles = [(entry.input, entry.input_sha256)]
    if entry.target is not None:
        tiles.append((entry.target, entry.target_sha256))
    for rel, expected in tiles:
        path = shard_dir / rel
        if expected is None:
            problems.append(f"{path}: no checksum in {INDEX_FILENAME} (built by an older layout?): rebuild")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        elif _sha256(path) != expected:
            problems.append(f"{path}: contents differ from the checksum the build recorded (truncated or altered)")
    if problems:
        return problems
    try:
        with open_raster(shard_dir / entry.input) as src:
            facts = raster_facts(src, shard_dir / entry.input)
        if facts.count < header.pixel_rule.band_count_needed:
            return [f"{facts.path}: has {facts.count} bands, the header reads {list(header.pixel_rule.indexes)}"]
        if entry.window is not None and (facts.width, facts.height) != entry.window[2:]:
            return [f"{facts.path}: is {facts.width}x{facts.height} (WxH) but its window is {list(entry.window)}"]
        if entry.target is not None:
            with open_raster(shard_dir / entry.target) as tgt:
                if tgt.count != 1 or tgt.shape != (facts.height, facts.width):
                    return [f"{tgt.name}: is {tgt.count}x{tgt.shape}, expected 1x{(facts.height, facts.width)}"]
    except DatasetError as exc:
        return [str(exc)]
    return []


def entries_by_source(entries: Iterable[IndexEntry]) -> dict[str, list[IndexEntry]]:
    """Index entries grouped by source raster, in the order met."""
    grouped: dict[str, list[IndexEntry]] = {}
    for entry in entries:
        grouped.setdefault(entry.source, []).append(entry)
    return grouped


def coverage_problems(source: str, windows: Sequence[ChipWindow], height: int, width: int) -> list[str]:
    """Whether a source's chip windows tile its height x width pixels exactly: none outside, none twice, none
    left out."""
    for window in windows:
        col, row, w, h = window
        if col + w > width or row + h > height:
            return [f"{source}: chip window {list(window)} reaches outside the {width}x{height} (WxH) raster"]
    # Counted on the grid of every window edge: each cell of it lies wholly inside a window or wholly outside.
    cols = sorted({0, width, *(c for c, _, _, _ in windows), *(c + w for c, _, w, _ in windows)})
    rows = sorted({0, height, *(r for _, r, _, _ in windows), *(r + h for _, r, _, h in windows)})
    col_at, row_at = {c: i for i, c in enumerate(cols)}, {r: i for i, r in enumerate(rows)}
    cover = np.zeros((len(rows) - 1, len(cols) - 1), dtype=np.int64)
    for col, row, w, h in windows:
        cover[row_at[row] : row_at[row + h], col_at[col] : col_at[col + w]] += 1
    problems = []
    for wrong, what in ((cover > 1, "is in more than one chip"), (cover == 0, "is in no chip")):
        if wrong.any():
            r, c = np.argwhere(wrong)[0]
            problems.append(f"{source}: pixel (row {rows[r]}, col {cols[c]}) {what} of the {width}x{height} raster")
    return problems


def source_problems(source: str, entries: Sequence[IndexEntry], size: tuple[int, int] | None) -> list[str]:
    """A source raster's items: all in one split, and tiling it exactly. ``size``: the source's (height, width);
    None when the source is not at hand: the chips must then tile their bounding box."""
    problems = []
    if len(splits := sorted({entry.split for entry in entries})) > 1:
        problems.append(f"{source}: its chips are in splits {splits}, all must be in its one split")
    if len(entries) == 1 and entries[0].window is None:
        return problems
    if size is None:
        if any(entry.window is None for entry in entries):
            return [*problems, f"{source}: is an item whole and also {len(entries) - 1} other item(s)"]
        size = (max(e.window[1] + e.window[3] for e in entries), max(e.window[0] + e.window[2] for e in entries))
    height, width = size
    windows = [(0, 0, width, height) if entry.window is None else entry.window for entry in entries]
    return problems + coverage_problems(source, windows, height, width)


def verify_shards(processed_root: str | Path, dataset_id: str) -> list[str]:
    """Problems with a built dataset (empty list = sound): manifest and index readable, every index path
    inside its shard, every item and tile listed once (a repeat named by index file and line), every item in
    exactly one split, every source raster's chips in one split and tiling
    their bounding box, the assignment of sources equal to the split rule's, source and tile counts equal to
    the manifest's, every tile's bytes equal to the checksum the build recorded, every input opening with the
    bands the header reads (a chip with its window's size) and every target with its input's shape."""
    root = Path(processed_root) / dataset_id
    try:
        manifest = read_manifest(processed_root, dataset_id)
        header = built_header(processed_root, dataset_id)
    except DatasetError as exc:
        return [str(exc)]
    problems: list[str] = []
    seen: dict[str, IndexEntry] = {}
    first_at: dict[tuple[str, str], str] = {}
    for split in SPLITS:
        for shard_dir in shard_dirs(processed_root, dataset_id, split):
            try:
                lines = _index_lines(shard_dir)
            except DatasetError as exc:
                problems.append(str(exc))
                continue
            for where, entry in lines:
                if entry.split != split or entry.dataset_id != dataset_id:
                    problems.append(f"{where}: item {entry.item_id!r} is labelled {entry.dataset_id}/{entry.split}")
                if (repeat := _repeat(first_at, where, shard_dir, entry)) is not None:
                    problems.append(repeat)
                    continue  # the rest is about its first listing
                seen[entry.item_id] = entry
                problems += tile_problems(shard_dir, entry, header)
    of_source = entries_by_source(seen.values())
    for source, entries in of_source.items():
        problems += [f"{root}: {problem}" for problem in source_problems(source, entries, None)]
    tiles = split_counts({item_id: entry.split for item_id, entry in seen.items()})
    if tiles != manifest.get("tile_counts"):
        problems.append(f"{root}: tile counts {tiles} differ from the manifest's {manifest.get('tile_counts')}")
    actual = {source: entries[0].split for source, entries in of_source.items()}
    if split_counts(actual) != manifest["counts"]:
        problems.append(f"{root}: split counts {split_counts(actual)} differ from the manifest's {manifest['counts']}")
    firsts = {source: entries[0] for source, entries in of_source.items()}
    items = [
        DatasetItem(source, Path(e.input), None if e.target is None else Path(e.target), e.raw_split)
        for source, e in firsts.items()
    ]
    try:
        expected = assign_splits(items, header, manifest.get("pinned"))
    except DatasetError as exc:
        return [*problems, str(exc)]
    if moved := sorted(source for source in actual if expected[source] != actual[source]):
        problems.append(
            f"{root}: {len(moved)} items are not where the split rule puts them, e.g. {moved[0]!r} is in "
            f"{actual[moved[0]]!r}, the rule says {expected[moved[0]]!r}"
        )
    return problems


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: a bad input is one line ``segpipe-shards: error: ...`` on stderr and exit 2."""
    return run_cli(PROG, _main, argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Build processed shards (layout v0).")
    parser.add_argument("--extracted-root", required=True, type=Path)
    parser.add_argument("--processed-root", required=True, type=Path)
    parser.add_argument("--dataset-id", help="one dataset (default: every sub-folder of the extracted root)")
    parser.add_argument("--seed", type=int, help="override the header's splits.seed")
    parser.add_argument("--shard-size", type=int, help="override the header's sharding.shard_size")
    parser.add_argument("--overwrite", action="store_true", help="replace output built from other data/settings")
    parser.add_argument("--dry-run", action="store_true", help="print the planned split counts; write nothing")
    parser.add_argument("--workers", type=int, help="processes writing tiles (default: CPU count)")
    args = parser.parse_args(argv)
    # Inside an Env, GDAL's errors (a truncated TIFF's) reach rasterio, which raises them, instead of being
    # printed on stderr beside the one line naming the file.
    with rasterio.Env():
        ids = [args.dataset_id] if args.dataset_id else discover_datasets(args.extracted_root)
        for dataset_id in ids:
            if args.dry_run:
                plan = plan_shards(args.extracted_root, dataset_id, seed=args.seed, shard_size=args.shard_size)
                shards = {split: len(members) for split, members in plan.shards().items()}
                summary = {
                    "dataset_id": dataset_id,
                    "dry_run": True,
                    "counts": plan.counts,
                    "tile_counts": plan.tile_counts,
                    "shards": shards,
                    "header": "committed" if plan.header_committed else "inferred",
                }
                print(json.dumps(summary))
                continue
            report = build_shards(
                args.extracted_root,
                args.processed_root,
                dataset_id,
                seed=args.seed,
                shard_size=args.shard_size,
                overwrite=args.overwrite,
                workers=args.workers,
            )
            print(json.dumps(report.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
