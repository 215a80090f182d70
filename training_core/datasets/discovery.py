"""Dataset folders and their items, and the content hash that is a raw dataset's data version.

A dataset folder under the extracted root looks like ``<dataset_id>/images/*.tif`` (inputs) and
optionally ``<dataset_id>/masks/*.tif`` (single-band labels, 0 = ignore), or with one more folder level
naming a raw split (``images/train/*.tif``).

Modality patterns are relative to ``source_root`` (itself relative to the dataset folder). They match
GeoTIFF files (``.tif``/``.tiff``, any case) segment by segment: ``*``, ``?`` and ``[...]`` stay inside
one path segment, ``{split}`` captures the raw split name. Items pair by stem (``by_stem``): the item id
is the file stem, compared case-insensitively so ``a.tif`` and ``a.TIF`` are a duplicate, not two items.

Symbolic links (a linked ``source_root``, linked folders or files) are followed, by discovery and by the
content hash alike: the hash covers the bytes the readers read, so changed pixels behind a link change
the data version. Link cycles are walked once.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from training_core.datasets.errors import DatasetError
from training_core.datasets.schema import DatasetHeader, Modality

TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class DatasetItem:
    item_id: str
    input_path: Path
    target_path: Path | None
    raw_split: str | None

    @property
    def labeled(self) -> bool:
        return self.target_path is not None


def discover_datasets(extracted_root: str | Path) -> list[str]:
    """Dataset ids: the sub-folder names of the extracted root, sorted (hidden folders skipped)."""
    root = Path(extracted_root)
    if not root.is_dir():
        raise DatasetError(f"{root}: extracted root is not a directory")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Glob -> regex where wildcards never cross `/` and `{split}` is a named group; case-insensitive."""
    out = []
    for token in re.findall(r"\{split\}|\[[^\]/]+\]|.", pattern):
        if token == "{split}":
            out.append(r"(?P<split>[^/]+)")
        elif token == "*":
            out.append(r"[^/]*")
        elif token == "?":
            out.append(r"[^/]")
        elif token.startswith("[") and len(token) > 1:
            out.append("[^" + re.escape(token[2:-1]) + "]" if token[1] == "!" else "[" + re.escape(token[1:-1]) + "]")
        else:
            out.append(re.escape(token))
    return re.compile("".join(out), re.IGNORECASE)


def tiff_files(root: Path) -> list[str]:
    """Relative posix paths of every GeoTIFF under root (hidden entries skipped), sorted."""
    found = []
    for folder, files in _walk(root):
        rel = folder.relative_to(root)
        # Hidden files are skipped too: macOS `._name.tif` resource forks are not GeoTIFFs.
        found += [(rel / f).as_posix() for f in files if f.lower().endswith(TIFF_SUFFIXES)]
    return sorted(found)


def _walk(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """(folder, sorted visible file names) under root, following links; each real folder once (no cycles)."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield Path(folder), sorted(f for f in files if not f.startswith("."))


def _match(root: Path, files: list[str], modality: Modality) -> dict[str, tuple[str, Path, str | None]]:
    """casefolded item id -> (item id, path, raw split) for the files matching the modality's pattern."""
    regex = _pattern_regex(modality.pattern)
    matched: dict[str, tuple[str, Path, str | None]] = {}
    for rel in files:
        hit = regex.fullmatch(rel)
        if hit is None:
            continue
        path = root / rel
        item_id = path.stem
        key = item_id.casefold()
        if key in matched:
            raise DatasetError(
                f"{path}: duplicate item stem {item_id!r} in modality {modality.name!r}: "
                f"{matched[key][1]} has the same stem (item ids must be unique, case-insensitive)"
            )
        matched[key] = (item_id, path, hit.groupdict().get("split"))
    return matched


def discover_items(dataset_dir: str | Path, header: DatasetHeader) -> list[DatasetItem]:
    """Pair inputs and targets by stem; sorted by item id. Opens no file."""
    dataset_dir = Path(dataset_dir)
    root = dataset_dir / header.source_root
    if not root.is_dir():
        raise DatasetError(f"{root}: source_root of dataset {header.dataset_id!r} is not a directory")
    files = tiff_files(root)
    inputs = _match(root, files, header.input)
    if not inputs:
        raise DatasetError(
            f"{root}: empty dataset: no file matches input pattern {header.input.pattern!r} "
            f"(modality {header.input.name!r})"
        )
    targets = _match(root, files, header.target) if header.target is not None else {}
    for key, (_, target_path, target_split) in targets.items():
        if key not in inputs:
            raise DatasetError(
                f"{target_path}: target without input: no {header.input.name!r} file with stem "
                f"{target_path.stem!r} matches {header.input.pattern!r}"
            )
        if target_split != inputs[key][2]:
            raise DatasetError(
                f"{target_path}: target is in raw split {target_split!r} but its input {inputs[key][1]} "
                f"is in {inputs[key][2]!r}"
            )
    known_raw = set(header.splits.raw)
    items = []
    for key, (item_id, input_path, raw_split) in inputs.items():
        if known_raw and raw_split not in known_raw:
            raise DatasetError(f"{input_path}: raw split {raw_split!r} is not in splits.raw {sorted(known_raw)}")
        target = targets.get(key)
        items.append(DatasetItem(item_id, input_path, None if target is None else target[1], raw_split))
    return sorted(items, key=lambda item: item.item_id)


def dataset_content_hash(dataset_dir: str | Path) -> str:
    """Data version: sha256 over every visible file's relative path, size and bytes, links followed."""
    dataset_dir = Path(dataset_dir)
    digest = hashlib.sha256()
    for folder, files in _walk(dataset_dir):
        for name in files:
            path = folder / name
            if not path.is_file():
                continue  # a dangling link or a socket: nothing a reader reads
            rel = path.relative_to(dataset_dir).as_posix().encode()
            digest.update(len(rel).to_bytes(8, "little") + rel)
            digest.update(path.stat().st_size.to_bytes(8, "little"))
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()
