"""Deterministic split: the exact rule, discovery-order invariance, stability under one added item, options."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from runtime_export.errors import DatasetError
from training_core.datasets.discovery import DatasetItem, discover_items
from training_core.datasets.scan import extract_header
from training_core.datasets.schema import DatasetHeader
from training_core.splits import (
    SPLITS,
    assign_splits,
    expected_split_counts,
    half_up,
    read_pinned_splits,
    split_counts,
)


def header(**splits: object) -> DatasetHeader:
    return DatasetHeader.model_validate(
        {
            "dataset_id": "toy",
            "version": 0,
            "modalities": [
                {"name": "rgb", "role": "input", "pattern": "images/*.tif"},
                {"name": "labels", "role": "target", "pattern": "masks/*.tif"},
            ],
            "pairing": {"input_modality": "rgb", "target_modality": "labels"},
            "splits": splits,
        }
    )


def items(n_labeled: int, n_unlabeled: int = 0, raw_split: str | None = None) -> list[DatasetItem]:
    """Items with made-up paths: the split reads ids, labels and raw splits only."""
    labeled = [DatasetItem(f"l{i:03d}", Path(f"l{i}.tif"), Path(f"m{i}.tif"), raw_split) for i in range(n_labeled)]
    return labeled + [DatasetItem(f"u{i:03d}", Path(f"u{i}.tif"), None, raw_split) for i in range(n_unlabeled)]


def test_kampala_gives_32_train_4_metrics_train_12_val(sample_extracted: Path) -> None:
    dataset = sample_extracted / "kampala_buildings"
    hdr = extract_header(dataset)
    assignment = assign_splits(discover_items(dataset, hdr), hdr)
    assert split_counts(assignment) == {"train": 32, "metrics_train": 4, "val": 12}
    assert split_counts(assignment) == expected_split_counts(16, 32, 0.25)


@pytest.mark.parametrize(
    ("n", "fraction", "metrics"),
    [
        (0, 0.25, 0),
        (1, 0.25, 0),
        (2, 0.25, 1),
        (3, 0.25, 1),
        (5, 0.25, 1),
        (6, 0.25, 2),
        (10, 0.25, 3),
        (16, 0.25, 4),
        (1, 0.5, 1),
        (3, 0.5, 2),
        (10, 0.35, 4),
        (10, 0.45, 5),
        (7, 0.0, 0),
        (7, 1.0, 7),
    ],
)
def test_exact_half_up_rounding(n: int, fraction: float, metrics: int) -> None:
    assert half_up(fraction, n) == metrics
    assignment = assign_splits(items(n, 2), header(train_metric_fraction_of_labeled=fraction))
    assert split_counts(assignment) == {"train": 2, "metrics_train": metrics, "val": n - metrics}


def test_unlabeled_items_always_train() -> None:
    assignment = assign_splits(items(4, 9), header())
    assert {assignment[f"u{i:03d}"] for i in range(9)} == {"train"}
    assert {assignment[f"l{i:03d}"] for i in range(4)} <= {"metrics_train", "val"}


def test_same_result_in_any_discovery_order() -> None:
    reference = assign_splits(items(30, 10), header())
    rng = random.Random(0)
    for _ in range(20):
        shuffled = items(30, 10)
        rng.shuffle(shuffled)
        assert assign_splits(shuffled, header()) == reference


def test_adding_or_removing_one_item_moves_at_most_one_other() -> None:
    rng = random.Random(1)
    for n in range(0, 60):
        before = assign_splits(items(n), header())
        after = assign_splits(items(n + 1), header())
        moved = [item_id for item_id in before if before[item_id] != after[item_id]]
        assert len(moved) <= 1, (n, moved)
        # removing an arbitrary item (not the last) also moves at most one other
        pool = items(n + 1)
        gone = pool.pop(rng.randrange(len(pool)))
        removed = assign_splits(pool, header())
        assert sum(removed[i] != after[i] for i in removed) <= 1, (n, gone.item_id)


def test_seed_and_dataset_id_key_the_ranking() -> None:
    base = assign_splits(items(40), header(seed=1))
    assert assign_splits(items(40), header(seed=1)) == base
    reseeded = assign_splits(items(40), header(seed=2))
    assert reseeded != base and split_counts(reseeded) == split_counts(base)
    other = header(seed=1).model_copy(update={"dataset_id": "other"})
    assert assign_splits(items(40), other) != base


def test_ratios_replace_the_fraction_rule() -> None:
    assignment = assign_splits(items(8, 3), header(ratios={"metrics_train": 0.5, "train": 0.25, "val": 0.25}))
    assert split_counts(assignment) == {"train": 3 + 2, "metrics_train": 4, "val": 2}
    with pytest.raises(ValueError, match="ratios must sum to 1"):
        header(ratios={"val": 0.5})


def write_list(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return path.name


def test_manifest_files_pin_items(tmp_path: Path) -> None:
    hdr = header(manifest_files={"val": write_list(tmp_path / "val.txt", ["# held out", "l000", "", "l001  # both"])})
    pinned = read_pinned_splits(tmp_path, hdr)
    assert pinned == {"l000": "val", "l001": "val"}
    assignment = assign_splits(items(6, 1), hdr, pinned)
    assert assignment["l000"] == assignment["l001"] == "val"
    # the rule runs over the 4 unpinned labeled items: floor(0.25 * 4 + 0.5) = 1
    assert split_counts(assignment) == {"train": 1, "metrics_train": 1, "val": 5}


def test_manifest_files_errors_name_file_and_item(tmp_path: Path) -> None:
    twice = header(
        manifest_files={
            "val": write_list(tmp_path / "v.txt", ["l000"]),
            "metrics_train": write_list(tmp_path / "m.txt", ["l001", "l000"]),
        }
    )
    with pytest.raises(DatasetError, match=r"m.txt:2: splits.manifest_files.metrics_train: pins an item already"):
        read_pinned_splits(tmp_path, twice)
    unknown = header(manifest_files={"val": write_list(tmp_path / "u.txt", ["l000", "nope"])})
    with pytest.raises(
        DatasetError, match=r"u.txt:2: splits.manifest_files.val: names no item of dataset 'toy'"
    ) as err:
        read_pinned_splits(tmp_path, unknown, items(2))
    assert "nope" not in str(err.value)
    with pytest.raises(DatasetError, match=r"manifest_files.val: a listed line names no item of dataset 'toy'"):
        assign_splits(items(2), unknown, read_pinned_splits(tmp_path, unknown))
    unlabeled = header(manifest_files={"val": write_list(tmp_path / "x.txt", ["u000"])})
    with pytest.raises(DatasetError, match=r"u0.tif: splits.manifest_files pins it to 'val' but it has no target"):
        assign_splits(items(2, 1), unlabeled, read_pinned_splits(tmp_path, unlabeled))
    missing = header(manifest_files={"val": "absent.txt"})
    with pytest.raises(DatasetError, match=r"absent.txt: splits.manifest_files.val: cannot read"):
        read_pinned_splits(tmp_path, missing)


def test_preserve_raw_split() -> None:
    pool = items(4, 1, raw_split="train") + [
        DatasetItem(f"v{i}", Path(f"v{i}.tif"), Path(f"vm{i}.tif"), "test") for i in range(4)
    ]
    assignment = assign_splits(pool, header(preserve_raw_split=True))
    assert all(assignment[item.item_id] == "train" for item in pool if item.raw_split == "train")
    assert split_counts(assignment) == {"train": 5, "metrics_train": 1, "val": 3}
    # without the option the raw split is ignored: all 8 labeled items follow the rule
    assert split_counts(assign_splits(pool, header())) == {"train": 1, "metrics_train": 2, "val": 6}
    odd = [DatasetItem("x", Path("x.tif"), Path("xm.tif"), "holdout-2")]
    with pytest.raises(DatasetError, match=r"x.tif: splits.preserve_raw_split: raw split 'holdout-2'"):
        assign_splits(odd, header(preserve_raw_split=True))


def test_expected_counts_cover_every_split() -> None:
    assert tuple(expected_split_counts(3, 2)) == SPLITS
    assert expected_split_counts(3, 2) == {"train": 2, "metrics_train": 1, "val": 2}


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "lists/../../secret.txt", "C:/Windows/win.ini"])
def test_manifest_files_outside_the_dataset_are_refused_by_the_schema(path: str) -> None:
    with pytest.raises(ValueError, match="must be a relative path inside the dataset folder"):
        header(manifest_files={"val": path})


def test_manifest_file_linked_outside_the_dataset_is_refused_unread(tmp_path: Path) -> None:
    """A link inside the folder to a file outside it: refused before reading, and nothing of it is echoed."""
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    dataset = tmp_path / "toy"
    dataset.mkdir()
    (dataset / "val.txt").symlink_to(secret)
    leads_out = r"val.txt: splits.manifest_files.val: leads to .*secret.txt, outside the dataset folder"
    with pytest.raises(DatasetError, match=leads_out) as err:
        read_pinned_splits(dataset, header(manifest_files={"val": "val.txt"}), items(2))
    assert "root:x" not in str(err.value)


def test_manifest_file_contents_never_reach_an_error(tmp_path: Path) -> None:
    (tmp_path / "val.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(DatasetError) as err:
        read_pinned_splits(tmp_path, header(manifest_files={"val": "val.txt"}), items(2))
    assert "root" not in str(err.value).replace(str(tmp_path), "")
