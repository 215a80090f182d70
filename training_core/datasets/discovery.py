"""Dataset folders and their items, and the content hash that is a raw dataset's data version.

A dataset folder under the extracted root looks like ``<dataset_id>/images/*.tif`` (inputs) and
optionally ``<dataset_id>/masks/*.tif`` (single-band labels, 0 = ignore), or with one more folder level
naming a raw split (``images/train/*.tif``).

Modality patterns are relative to ``source_root`` (itself relative to the dataset folder). They match
GeoTIFF files (``.tif``/``.tiff``, any case) segment by segment: ``*``, ``?`` and ``[...]`` stay inside
one path segment, ``{split}`` captures the raw split name. Items pair by stem (``by_stem``): the item id
is the file stem, compared case-insensitively so ``a.tif`` and ``a.TIF`` are a duplicate, not two items.

Symbolic links are followed, by discovery and by the content hash alike, as long as they stay inside the
dataset folder (itself resolved first, so a dataset folder that is a link is fine): the hash covers the bytes
the readers read, so changed pixels behind a link change the data version. Link cycles are walked once.
A link leading outside the dataset folder is never read: discovery refuses it with one line naming the link
and where it leads (under ``source_root`` any visible entry, not only GeoTIFFs, because GDAL reads sidecar
files such as ``.msk`` or ``.aux.xml`` beside a raster on its own), and the content hash leaves it out.

File names must be valid UTF-8: GDAL cannot open any other, so such a GeoTIFF is refused, named, at discovery.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime_export.errors import DatasetError
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


def shown(path: str | Path) -> str:
    """A path as an error shows it: bytes that are not UTF-8 as ``\\xNN``, as they are on disk."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def require_utf8(path: Path, what: str) -> None:
    """Refuse a path GDAL cannot open: rasterio passes paths to GDAL as UTF-8, so other bytes fail there."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DatasetError(
            f"{shown(path)}: {what}: the path is not valid UTF-8, which GDAL cannot open; rename it"
        ) from None


def dataset_root_of(dataset_dir: str | Path) -> Path:
    """The dataset folder with every link resolved: what each file it holds must resolve inside."""
    return Path(os.path.realpath(dataset_dir))


def resolve_inside(path: Path, dataset_root: Path, what: str) -> Path:
    """``path`` with links followed, which must lie inside ``dataset_root`` (``dataset_root_of``): a link to a
    secret or a system file would otherwise be read, and parts of it printed or shipped (a licence line)."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(dataset_root):
        raise DatasetError(
            f"{shown(path)}: {what}: leads to {shown(real)}, outside the dataset folder {shown(dataset_root)} "
            "(links must stay inside it)"
        )
    return real


def discover_datasets(extracted_root: str | Path) -> list[str]:
    """Dataset ids: the sub-folder names of the extracted root, sorted (hidden folders skipped)."""
    root = Path(extracted_root)
    if not root.is_dir():
        raise DatasetError(f"{shown(root)}: extracted root is not a directory")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def dataset_folder(extracted_root: str | Path, dataset_id: str) -> Path:
    """One dataset's folder: the sub-folder of the extracted root named by its id. An id is a name, not a path,
    so ``--dataset-id ../elsewhere`` cannot read outside the root the user gave."""
    root = Path(extracted_root)
    if not root.is_dir():
        raise DatasetError(f"{shown(root)}: extracted root is not a directory")
    if dataset_id in ("", ".", "..") or "/" in dataset_id or "\\" in dataset_id:
        raise DatasetError(f"{shown(dataset_id)}: dataset id: must be a folder name in {shown(root)}, not a path")
    folder = root / dataset_id
    if not folder.is_dir():
        raise DatasetError(f"{shown(folder)}: no such dataset folder")
    return folder


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


def tiff_files(root: Path, dataset_dir: Path) -> list[str]:
    """Relative posix paths of every GeoTIFF under root (hidden entries skipped), sorted. Root and every visible
    entry under it must resolve inside the dataset folder, and each GeoTIFF's path must be UTF-8."""
    dataset_root = dataset_root_of(dataset_dir)
    resolve_inside(root, dataset_root, "folder")
    found = []
    for folder, files, outside in _walk(root, dataset_root):
        if outside:
            resolve_inside(folder / outside[0], dataset_root, "link")  # raises, naming where it leads
        rel = folder.relative_to(root)
        # Hidden files are skipped too: macOS `._name.tif` resource forks are not GeoTIFFs.
        for name in files:
            if name.lower().endswith(TIFF_SUFFIXES):
                require_utf8(folder / name, "file name")
                found.append((rel / name).as_posix())
    return sorted(found)


def _walk(root: Path, dataset_root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """(folder, sorted visible file names, sorted visible entries leading outside ``dataset_root``) under root,
    following links that stay inside (never entering a folder outside); each real folder once (no cycles)."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        visible_dirs = sorted(d for d in dirs if not d.startswith("."))
        dirs[:] = [d for d in visible_dirs if _stays_inside(folder, d, dataset_root)]
        visible = sorted(f for f in files if not f.startswith("."))
        inside = [f for f in visible if _stays_inside(folder, f, dataset_root)]
        outside = sorted({*visible_dirs, *visible} - {*dirs, *inside})
        yield Path(folder), inside, outside


def _stays_inside(folder: str, name: str, dataset_root: Path) -> bool:
    """The walk only enters folders inside, so only a link can lead out: the common case costs one lstat."""
    path = os.path.join(folder, name)
    return not os.path.islink(path) or Path(os.path.realpath(path)).is_relative_to(dataset_root)


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
    files = tiff_files(root, dataset_dir)
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
    """Data version: sha256 over every visible file's relative path, size and bytes, links followed. A link
    leading outside the dataset folder is left out unread: no reader reads it (discovery refuses it)."""
    dataset_dir = Path(dataset_dir)
    digest = hashlib.sha256()
    for folder, files, _ in _walk(dataset_dir, dataset_root_of(dataset_dir)):
        for name in files:
            path = folder / name
            if not path.is_file():
                continue  # a dangling link or a socket: nothing a reader reads
            rel = os.fsencode(path.relative_to(dataset_dir).as_posix())  # a name's bytes, UTF-8 or not
            digest.update(len(rel).to_bytes(8, "little") + rel)
            digest.update(path.stat().st_size.to_bytes(8, "little"))
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()
