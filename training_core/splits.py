"""Deterministic split of a dataset's items into train | metrics_train | val.

Items are source rasters: a raster the shard build cuts into chips is one item here, and all its chips
follow it (``training_core.shards``), so no area of one raster is in two splits.

The rule:

- Unlabeled items (no target) go to ``train``.
- Labeled items are ranked by a keyed hash: blake2b of the item id, keyed by ``seed`` and ``dataset_id``.
  The first ``floor(fraction * n + 0.5)`` (half up: 1 of 2, 1 of 3, 2 of 6) go to ``metrics_train``, the
  rest to ``val``; ``fraction`` is ``splits.train_metric_fraction_of_labeled`` (0.25).
  Each item's rank depends on its own id only, so the assignment is the same on any machine and in any
  discovery order, and adding or removing one item moves at most one other across the boundary.

Header options, applied in this order:

- ``manifest_files``: ``{split: path}``, a text file relative to the dataset folder listing item ids (one
  a line, ``#`` comments) pinned to that split. Pinned items are taken out before the rule runs. Listing an
  unknown item, an item twice, or an unlabeled item in a labeled split is an error.
- ``preserve_raw_split``: items whose raw split (the ``{split}`` folder) names a training split
  (``train``, ``training``, ``trn``) stay in ``train``, even when labeled, so the provider's training data
  never reaches evaluation. Items in a held-out raw split (``val``, ``valid``, ``validation``, ``test``,
  ``metrics_train``) follow the labeled rule among themselves. Any other raw split name is an error.
- ``ratios``: ``{split: fraction}`` summing to 1, replacing the fraction rule for labeled items; boundaries
  are cumulative over the ranking in the order metrics_train, train, val, each rounded half up. (With three
  buckets, adding one item may move up to two others.)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

from runtime_export.errors import DatasetError
from training_core.datasets.discovery import DatasetItem, dataset_root_of, resolve_inside
from training_core.datasets.schema import DatasetHeader

SPLITS = ("train", "metrics_train", "val")
LABELED_SPLITS = ("metrics_train", "val")
RAW_TRAIN_NAMES = frozenset({"train", "training", "trn"})
RAW_HELD_OUT_NAMES = frozenset({"val", "valid", "validation", "test", "metrics_train"})


def half_up(fraction: float, n: int) -> int:
    """floor(fraction * n + 0.5), exact: 0.35 * 10 is 3.4999... in floats, 7/20 * 10 is 3.5."""
    return math.floor(Fraction(str(fraction)) * n + Fraction(1, 2))


def expected_split_counts(n_labeled: int, n_unlabeled: int, fraction: float = 0.25) -> dict[str, int]:
    """Counts the default rule gives (no ratios, pins or preserved raw splits)."""
    metrics = half_up(fraction, n_labeled)
    return {"train": n_unlabeled, "metrics_train": metrics, "val": n_labeled - metrics}


def rank_key(seed: int, dataset_id: str, item_id: str) -> bytes:
    """The item's place in the ranking; depends on nothing but these three values."""
    key = hashlib.blake2b(f"{seed}\x00{dataset_id}".encode(), digest_size=32).digest()
    return hashlib.blake2b(item_id.encode(), key=key, digest_size=16).digest()


def _split_labeled(ranked: Sequence[str], header: DatasetHeader) -> dict[str, str]:
    policy = header.splits
    n = len(ranked)
    if policy.ratios is None:
        bounds = [("metrics_train", half_up(policy.train_metric_fraction_of_labeled, n)), ("val", n)]
    else:
        cumulative = Fraction(0)
        bounds = []
        for split in ("metrics_train", "train", "val"):
            cumulative += Fraction(str(policy.ratios.get(split, 0.0)))
            bounds.append((split, min(n, math.floor(cumulative * n + Fraction(1, 2)))))
        bounds[-1] = ("val", n)
    assignment: dict[str, str] = {}
    start = 0
    for split, end in bounds:
        assignment.update((item_id, split) for item_id in ranked[start:end])
        start = max(start, end)
    return assignment


def read_pinned_splits(
    dataset_dir: str | Path, header: DatasetHeader, items: Sequence[DatasetItem] = ()
) -> dict[str, str]:
    """item id -> split from the header's manifest_files (empty without them); with ``items``, a line naming
    none of them is an error naming the file and line.

    Each file must resolve (links followed) inside the dataset folder. Errors name the file and line,
    never what the line holds: a manifest is user data, and a path to a file outside the dataset is refused.
    """
    pinned: dict[str, str] = {}
    pinned_at: dict[str, str] = {}
    root = dataset_root_of(dataset_dir)
    known = {item.item_id for item in items}
    for split, rel in (header.splits.manifest_files or {}).items():
        path = Path(dataset_dir) / rel
        resolve_inside(path, root, f"splits.manifest_files.{split}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DatasetError(f"{path}: splits.manifest_files.{split}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise DatasetError(f"{path}: splits.manifest_files.{split}: not a UTF-8 text file") from None
        for number, line in enumerate(lines, start=1):
            item_id = line.split("#", 1)[0].strip()
            if not item_id:
                continue
            if items and item_id not in known:
                raise DatasetError(
                    f"{path}:{number}: splits.manifest_files.{split}: names no item of dataset {header.dataset_id!r}"
                )
            if item_id in pinned:
                raise DatasetError(
                    f"{path}:{number}: splits.manifest_files.{split}: pins an item already pinned "
                    f"by {pinned_at[item_id]}"
                )
            pinned[item_id] = split
            pinned_at[item_id] = f"{path}:{number}"
    return pinned


def assign_splits(
    items: Sequence[DatasetItem], header: DatasetHeader, pinned: Mapping[str, str] | None = None
) -> dict[str, str]:
    """item id -> split for every item (see the module docstring); `pinned` from read_pinned_splits."""
    by_id = {item.item_id: item for item in items}
    assignment: dict[str, str] = {}
    for item_id, split in (pinned or {}).items():
        item = by_id.get(item_id)
        if item is None:
            # The line is not echoed: it may be anything (a pinned file is user data).
            raise DatasetError(
                f"splits.manifest_files.{split}: a listed line names no item of dataset {header.dataset_id!r}"
            )
        if split in LABELED_SPLITS and not item.labeled:
            raise DatasetError(f"{item.input_path}: splits.manifest_files pins it to {split!r} but it has no target")
        assignment[item_id] = split
    ruled = []
    for item in items:
        if item.item_id in assignment:
            continue
        if not item.labeled:
            assignment[item.item_id] = "train"
        elif header.splits.preserve_raw_split and item.raw_split is not None:
            raw = item.raw_split.lower()
            if raw in RAW_TRAIN_NAMES:
                assignment[item.item_id] = "train"
            elif raw in RAW_HELD_OUT_NAMES:
                ruled.append(item.item_id)
            else:
                raise DatasetError(
                    f"{item.input_path}: splits.preserve_raw_split: raw split {item.raw_split!r} is neither a "
                    f"training ({sorted(RAW_TRAIN_NAMES)}) nor a held-out ({sorted(RAW_HELD_OUT_NAMES)}) name"
                )
        else:
            ruled.append(item.item_id)
    seed, dataset_id = header.splits.seed, header.dataset_id
    ranked = sorted(ruled, key=lambda item_id: (rank_key(seed, dataset_id, item_id), item_id))
    assignment.update(_split_labeled(ranked, header))
    return assignment


def split_counts(assignment: Mapping[str, str]) -> dict[str, int]:
    counts = dict.fromkeys(SPLITS, 0)
    for split in assignment.values():
        counts[split] += 1
    return counts
