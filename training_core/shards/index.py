"""A built dataset's layout names and their reading: the manifest (``read_manifest``), a shard's index lines
(``IndexEntry``, ``read_index``) and a split's items (``iter_split_items``, what the loaders read).

An item is listed once: ``read_index`` and ``iter_split_items`` refuse an item or a tile listed twice, naming the
index file, the line and the item (a duplicated line would be trained on and scored twice).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from runtime_export.errors import DatasetError
from training_core.splits import SPLITS

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


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def tile_relpath(folder: str, item_id: str) -> str:
    return f"{folder}/{item_id}.tif"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
