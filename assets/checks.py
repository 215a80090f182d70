"""Asset checks. Blocking checks stop everything downstream when data is wrong (Dagster skips the
downstream steps and the UI shows the failed check and its problems); the quality check only warns.

Data-plane checks are partitioned like their assets and log one result per dataset, also in a run over
several (``assets.lineage.partition_check_evaluation``): each dataset passes or fails on its own problems,
all of them collected instead of stopping at the first, so one run shows everything that needs fixing.
"""

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg

from assets.datasets import DATASETS, dataset_header, processed_shards
from assets.lineage import partition_check_evaluation
from assets.resources import ProjectPaths
from runtime_export.errors import DatasetError
from runtime_export.rasters import open_raster
from training_core.datasets.built import built_header
from training_core.datasets.discovery import DatasetItem, discover_items
from training_core.datasets.scan import validate_dataset
from training_core.datasets.schema import load_header
from training_core.shards.index import IndexEntry, read_index, shard_dirs
from training_core.shards.verify import entries_by_source, source_problems, tile_problems
from training_core.splits import SPLITS, assign_splits, expected_split_counts, read_pinned_splits

CheckEvent = dg.AssetCheckEvaluation | dg.Output


@dg.asset_check(asset=dataset_header, partitions_def=DATASETS, blocking=True)
def header_matches_files(context: dg.AssetCheckExecutionContext, paths: ProjectPaths) -> Iterator[CheckEvent]:
    """Every file of the dataset opens and agrees with the header (bands, dtype, CRS, labels, pairing)."""

    def problems(dataset_id: str) -> list[str]:
        header = load_header(paths.header_path(dataset_id))
        validate_dataset(paths.dataset_dir(dataset_id), header)
        return []

    yield from per_dataset_results(context, problems)


@dg.asset_check(asset=processed_shards, partitions_def=DATASETS, blocking=True)
def every_item_in_one_split(context: dg.AssetCheckExecutionContext, paths: ProjectPaths) -> Iterator[CheckEvent]:
    """Each item (source raster) of the raw dataset appears in exactly one split of the shards, and nothing
    else does: its chips are all in that split and tile the source raster exactly (no pixel twice or lost)."""

    def problems(dataset_id: str) -> list[str]:
        header = load_header(paths.header_path(dataset_id))
        expected = {item.item_id: item for item in discover_items(paths.dataset_dir(dataset_id), header)}
        entries = [entry for _, _, entry in index_entries(paths.processed_root, dataset_id)]
        listed = Counter(entry.item_id for entry in entries)
        found = [f"{item_id}: listed {n} times" for item_id, n in sorted(listed.items()) if n != 1]
        of_source = entries_by_source(entries)
        found += [f"{item_id}: in no split" for item_id in sorted(expected.keys() - of_source.keys())]
        for source, chips in sorted(of_source.items()):
            if source not in expected:
                found.append(f"{source}: not an item of the raw dataset")
                continue
            # A source listed once, whole, tiles itself: only chipped sources need their raster's size.
            size = None if len(chips) == 1 and chips[0].window is None else raster_size(expected[source])
            found += source_problems(source, chips, size)
        return found

    yield from per_dataset_results(context, problems)


@dg.asset_check(asset=processed_shards, partitions_def=DATASETS, blocking=True)
def split_counts_follow_rule(context: dg.AssetCheckExecutionContext, paths: ProjectPaths) -> Iterator[CheckEvent]:
    """Every item (source raster, with all its chips) sits in the split the deterministic rule gives it; with
    the default policy the counts of sources are exactly half-up(fraction x labeled) metrics_train, the other
    labeled val, the unlabeled train."""

    def problems(dataset_id: str) -> list[str]:
        dataset_dir = paths.dataset_dir(dataset_id)
        header = load_header(paths.header_path(dataset_id))
        items = discover_items(dataset_dir, header)
        rule = assign_splits(items, header, read_pinned_splits(dataset_dir, header, items))
        entries = [entry for _, _, entry in index_entries(paths.processed_root, dataset_id)]
        actual = {source: {chip.split for chip in chips} for source, chips in entries_by_source(entries).items()}
        found = [
            f"{item_id}: in {sorted(actual.get(item_id, ())) or None}, the rule says {split!r}"
            for item_id, split in sorted(rule.items())
            if actual.get(item_id) != {split}
        ]
        policy = header.splits
        if policy.ratios is None and policy.manifest_files is None and not policy.preserve_raw_split:
            n_labeled = sum(1 for item in items if item.target_path is not None)
            expected = expected_split_counts(n_labeled, len(items) - n_labeled, policy.train_metric_fraction_of_labeled)
            placed = Counter(split for splits in actual.values() for split in splits)
            counts = {split: placed[split] for split in SPLITS}
            if counts != expected:
                found.append(f"split counts {counts} differ from the rule's {expected}")
        return found

    yield from per_dataset_results(context, problems)


@dg.asset_check(asset=processed_shards, partitions_def=DATASETS, blocking=True)
def index_paths_inside_shard(context: dg.AssetCheckExecutionContext, paths: ProjectPaths) -> Iterator[CheckEvent]:
    """Every path in every ``index.jsonl`` is relative and resolves inside its shard directory."""

    def problems(dataset_id: str) -> list[str]:
        found = []
        for split in SPLITS:
            for shard_dir in shard_dirs(paths.processed_root, dataset_id, split):
                try:
                    entries = read_index(shard_dir)
                except DatasetError as exc:  # read_index rejects absolute and escaping paths
                    found.append(str(exc))
                    continue
                found += [
                    f"{shard_dir}: {path} does not exist"
                    for path in entry_paths(shard_dir, entries)
                    if not path.is_file()
                ]
        return found

    yield from per_dataset_results(context, problems)


@dg.asset_check(asset=processed_shards, partitions_def=DATASETS, blocking=True)
def tiles_intact_and_readable(context: dg.AssetCheckExecutionContext, paths: ProjectPaths) -> Iterator[CheckEvent]:
    """Every tile's bytes equal the checksum its build recorded (no truncated or altered tile); every input
    has the bands its header reads; every target is one band of its input's height x width."""

    def problems(dataset_id: str) -> list[str]:
        header = built_header(paths.processed_root, dataset_id)
        found = []
        for _, shard_dir, entry in index_entries(paths.processed_root, dataset_id):
            found += tile_problems(shard_dir, entry, header)
        return found

    yield from per_dataset_results(context, problems)


def index_entries(processed_root: str, dataset_id: str) -> Iterator[tuple[str, Path, IndexEntry]]:
    """(split, shard directory, index entry) for every item in the dataset's shards."""
    for split in SPLITS:
        for shard_dir in shard_dirs(processed_root, dataset_id, split):
            for entry in read_index(shard_dir):
                yield split, shard_dir, entry


def raster_size(item: DatasetItem) -> tuple[int, int]:
    """(height, width) of an item's input raster: what its chips must tile."""
    with open_raster(item.input_path) as src:
        return src.height, src.width


def entry_paths(shard_dir: Path, entries: list[IndexEntry]) -> Iterator[Path]:
    for entry in entries:
        yield shard_dir / entry.input
        if entry.has_target:
            yield shard_dir / entry.target


def per_dataset_results(
    context: dg.AssetCheckExecutionContext, problems_of: Callable[[str], list[str]]
) -> Iterator[CheckEvent]:
    """One result per dataset of the run: passed when it has no problem; a bad-input error is a problem."""
    for dataset_id in context.op_execution_context.partition_keys:
        try:
            problems = problems_of(dataset_id)
        except (DatasetError, OSError) as exc:
            problems = [str(exc)]
        report = "\n".join(f"- {problem}" for problem in problems)
        yield partition_check_evaluation(
            context,
            dataset_id,
            passed=not problems,
            description=problems[0] if problems else None,
            metadata={"n_problems": len(problems), "problems": dg.MetadataValue.md(report or "none")},
        )
    yield dg.Output(None)  # the check's own output, which the steps a blocking check guards wait for
