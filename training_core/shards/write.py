"""Writing shards: ``build_shards`` writes a plan's tiles and indexes in parallel into a hidden staging folder,
the manifest last, then swaps the folder in; crash recovery puts back a folder left aside and removes the
pid-named staging folders of dead builds.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dataclass_replace
from functools import partial
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import RasterioError
from rasterio.windows import Window

from runtime_export import rasters
from runtime_export.atomic import verify_raster
from runtime_export.errors import DatasetError
from runtime_export.numpy_runtime.pixels import PixelRule
from runtime_export.rasters import distinct_values, has_mask_band, open_raster
from training_core.datasets.discovery import dataset_content_hash, dataset_root_of, require_utf8
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
    open_item,
    sample_size_for,
)
from training_core.datasets.schema import HEADER_FILENAME, DatasetHeader, Modality, Sharding, dump_header, header_hash
from training_core.shards.index import (
    INDEX_FILENAME,
    INPUTS_DIR,
    LAYOUT_VERSION,
    MANIFEST_FILENAME,
    TARGETS_DIR,
    IndexEntry,
    _read_manifest_file,
    _sha256,
    shard_name,
    tile_relpath,
)
from training_core.shards.plan import Chip, ShardPlan, build_key, plan_shards


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
