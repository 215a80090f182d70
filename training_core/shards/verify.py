"""Verifying a built dataset: ``verify_shards`` lists its problems (manifest, index, tiles and their checksums,
chip coverage, the split rule, counts); the tile and source checks serve the asset checks too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from runtime_export.errors import DatasetError
from runtime_export.rasters import open_raster, raster_facts
from training_core.datasets.built import built_header
from training_core.datasets.discovery import DatasetItem
from training_core.datasets.schema import DatasetHeader
from training_core.shards.index import (
    INDEX_FILENAME,
    ChipWindow,
    IndexEntry,
    _index_lines,
    _repeat,
    _sha256,
    read_manifest,
    shard_dirs,
)
from training_core.splits import SPLITS, assign_splits, split_counts


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
