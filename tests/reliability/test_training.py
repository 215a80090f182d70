"""Bad input and faults of ``python -m training_core.train`` and ``python -m training_core.eval`` (issue 24).

Each case runs the command line in a child process, as a user would, and asserts the promise of
docs/OPERATIONS.md through the harness: a non-zero exit, one line on stderr naming the file, field or flag and
the problem, no traceback, every input byte-identical afterwards and no hidden leftover files. Where a case
writes on purpose (steps checkpointed before bad data stops training), it checks what it wrote.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.reliability.harness import REPO, Outcome, Untouched, assert_refused, hidden_entries, run_module
from training_core.checkpoint import LAST_NAME, load_checkpoint, step_checkpoint_name
from training_core.config import load_config
from training_core.shards.write import build_shards
from training_core.train import train

TRAIN, EVAL = "training_core.train", "training_core.eval"
SAMPLE = REPO / "sample_data" / "extracted"
DATASETS = ("kampala_buildings", "quebec_buildings", "unlabeled_scenes")
# Seconds per run: a tiny model on 32-pixel patches, no progress line before the error (log_every 100).
TINY_YAML = (
    "model: {embed_dim: 8, max_k: 4}\nbatch_size: 2\nsteps: 4\ncheckpoint_every: 50\nlog_every: 100\n"
    "device: cpu\ndata: {patch_size: 32, synthetic_items: 4}\n"
)


@dataclass(frozen=True)
class Base:
    """Built once per module, read by every case (each case asserts that it stays byte-identical)."""

    processed: Path  # shards of DATASETS
    config: Path  # TINY_YAML
    checkpoint_dir: Path  # 2 steps of the tiny config on synthetic tiles: step-000002.pt, last.pt


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    root = tmp_path_factory.mktemp("base")
    for dataset_id in DATASETS:
        build_shards(SAMPLE, root / "processed", dataset_id, workers=1)
    config = root / "tiny.yaml"
    config.write_text(TINY_YAML)
    train(load_config(config).model_copy(update={"steps": 2}), root / "ckpt", resume=False)
    return Base(root / "processed", config, root / "ckpt")


@dataclass
class World:
    """One case's view: the shared inputs, a private folder, and what the case hands the command."""

    base: Base
    tmp: Path
    inputs: list[Path] = field(default_factory=list)  # asserted byte-identical after the run

    def __post_init__(self) -> None:
        self.inputs += [self.base.processed, self.base.config, self.base.checkpoint_dir]

    @property
    def out(self) -> Path:
        """Where the command would write (a checkpoint dir or a report): absent after a refusal."""
        return self.tmp / "out"

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        self.inputs.append(path)
        return path

    def shards(self, dataset_id: str) -> Path:
        """A private copy of one dataset's shards (a processed root), to damage."""
        root = self.tmp / "processed"
        shutil.copytree(self.base.processed / dataset_id, root / dataset_id)
        self.inputs.append(root)
        return root

    def train_args(self, *args: str | Path, config: Path | None = None) -> list[str | Path]:
        return ["--config", config or self.base.config, "--checkpoint_dir", self.out, *args]


def truncated_tile(root: Path, split: str) -> Path:
    """Cut the first tile of a split short, as an interrupted copy leaves it."""
    tile = sorted(root.glob(f"*/{split}/shard-*/inputs/*.tif"))[0]
    tile.write_bytes(tile.read_bytes()[:3000])
    return tile


@dataclass(frozen=True)
class Case:
    id: str
    module: str
    # Prepares the inputs (damaging private copies) and returns the arguments and the fragments the error
    # line must hold (paths known only once the case is set up).
    setup: Callable[[World], tuple[list[str | Path], list[str]]]
    writes: bool = False  # the command may write under World.out before refusing (checked by `then`)
    then: Callable[[World], None] | None = None
    file_limit: int | None = None  # RLIMIT_FSIZE in bytes: a write past it fails as on a full disk


def flags(*args: str | Path, fragments: tuple[str, ...] = ()) -> Callable[[World], tuple[list, list[str]]]:
    """A case whose only input is the command line (over the tiny config for training)."""
    return lambda world: (world.train_args(*args), list(fragments))


def bad_config(text: str, *fragments: str) -> Callable[[World], tuple[list, list[str]]]:
    def setup(world: World) -> tuple[list, list[str]]:
        path = world.write("bad.yaml", text)
        return world.train_args(config=path), [str(path), *fragments]

    return setup


def shards_args(root: Path, dataset_id: str) -> list[str | Path]:
    return ["--data-source", "shards", "--processed-root", root, "--dataset-id", dataset_id]


def corrupt_manifest(world: World) -> tuple[list, list[str]]:
    root = world.shards("unlabeled_scenes")
    manifest = root / "unlabeled_scenes" / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    return world.train_args(*shards_args(root, "unlabeled_scenes")), [str(manifest), "not valid JSON"]


def truncated_train_tile(world: World) -> tuple[list, list[str]]:
    root = world.shards("unlabeled_scenes")
    tile = truncated_tile(root, "train")
    return world.train_args(*shards_args(root, "unlabeled_scenes")), ["reading the training data", str(tile)]


def damaged_val_tile_at_periodic_evaluation(world: World) -> tuple[list, list[str]]:
    root = world.shards("kampala_buildings")
    tile = truncated_tile(root, "val")
    args = world.train_args(*shards_args(root, "kampala_buildings"), "--eval-every", "2")
    return args, ["periodic evaluation at step 2", str(tile), "steps 1-2 are saved", "--eval-every 0"]


def steps_before_the_bad_val_tile_are_saved(world: World) -> None:
    assert load_checkpoint(world.out / LAST_NAME)["step"] == 2
    assert (world.out / step_checkpoint_name(2)).read_bytes() == (world.out / LAST_NAME).read_bytes()


def all_checkpoints_damaged(world: World) -> tuple[list, list[str]]:
    damaged = world.tmp / "damaged"
    shutil.copytree(world.base.checkpoint_dir, damaged)
    for checkpoint in damaged.glob("*.pt"):
        checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
    world.inputs.append(damaged)
    return ["--config", world.base.config, "--checkpoint_dir", damaged, "--resume"], ["no intact checkpoint"]


def full_disk_at_a_checkpoint(world: World) -> tuple[list, list[str]]:
    """Steps 1-3 checkpointed; the resumed run's checkpoint at step 4 (79 kB) meets a 40 kB file limit."""
    train(load_config(world.base.config).model_copy(update={"steps": 3}), world.out, resume=False)
    world.inputs += [world.out / LAST_NAME, world.out / step_checkpoint_name(3)]
    args = world.train_args("--resume", "--steps", "6", "--checkpoint-every", "2")
    return args, [str(world.out / step_checkpoint_name(4)), "cannot write the checkpoint", "training stopped at step 4"]


def last_is_never_older_than_a_step_file(world: World) -> None:
    assert sorted(p.name for p in world.out.glob("*.pt")) == [LAST_NAME, step_checkpoint_name(3)]
    assert load_checkpoint(world.out / LAST_NAME)["step"] == 3


def evaluate(world: World, *args: str | Path) -> list[str | Path]:
    return [*args, "--output", world.out]


def eval_shards(world: World, root: Path, dataset_id: str, checkpoint: Path, *args: str) -> list[str | Path]:
    return evaluate(world, *shards_args(root, dataset_id), "--checkpoint", checkpoint, *args)


def eval_damaged_checkpoint(world: World) -> tuple[list, list[str]]:
    checkpoint = world.write("damaged.pt", "")
    checkpoint.write_bytes((world.base.checkpoint_dir / LAST_NAME).read_bytes()[:2000])
    args = eval_shards(world, world.base.processed, "quebec_buildings", checkpoint)
    return args, [str(checkpoint), "unreadable"]


def eval_damaged_val_tile(world: World) -> tuple[list, list[str]]:
    root = world.shards("quebec_buildings")
    tile = truncated_tile(root, "val")
    args = eval_shards(world, root, "quebec_buildings", world.base.checkpoint_dir / LAST_NAME)
    return args, [str(tile), "cannot read"]


def checkpoint(world: World) -> Path:
    return world.base.checkpoint_dir / LAST_NAME


CASES = [
    # python -m training_core.train: the command line and the config file
    Case(
        "flag-out-of-range", TRAIN, flags("--steps", "-3", fragments=("--steps", "greater than or equal to 1 (got -3)"))
    ),
    Case("config-yaml-syntax", TRAIN, bad_config("model: {embed_dim: 8\n", "line 2", "not valid YAML")),
    Case("config-unknown-key", TRAIN, bad_config("stepz: 3\n", "stepz", "Extra inputs are not permitted")),
    Case("config-wrong-type", TRAIN, bad_config("model: {max_k: many}\n", "model.max_k", "valid integer")),
    # ... the data
    Case(
        "missing-processed-root",
        TRAIN,
        lambda w: (
            w.train_args("--data-source", "shards", "--processed-root", w.tmp / "nope"),
            [str(w.tmp / "nope"), "processed_root is not a directory"],
        ),
    ),
    Case(
        "missing-dataset",
        TRAIN,
        lambda w: (w.train_args(*shards_args(w.base.processed, "nope")), ["nope/manifest.json", "no manifest"]),
    ),
    Case(
        "labeled-only-dataset",
        TRAIN,
        lambda w: (w.train_args(*shards_args(w.base.processed, "quebec_buildings")), ["'train'", "no items"]),
    ),
    Case("corrupt-manifest", TRAIN, corrupt_manifest),
    Case("truncated-train-tile", TRAIN, truncated_train_tile, writes=True),
    Case(
        "damaged-val-tile-at-periodic-evaluation",
        TRAIN,
        damaged_val_tile_at_periodic_evaluation,
        writes=True,
        then=steps_before_the_bad_val_tile_are_saved,
    ),
    # ... the checkpoint folder
    Case(
        "checkpoint-dir-already-used",
        TRAIN,
        lambda w: (
            ["--config", w.base.config, "--checkpoint_dir", w.base.checkpoint_dir],
            ["already holds", "(--resume)"],
        ),
    ),
    Case(
        "resume-under-another-config",
        TRAIN,
        lambda w: (
            ["--config", w.base.config, "--checkpoint_dir", w.base.checkpoint_dir, "--resume", "--seed", "5"],
            ["seed (42 in the checkpoint, 5 now)", "--override-config"],
        ),
    ),
    Case("resume-with-every-checkpoint-damaged", TRAIN, all_checkpoints_damaged),
    Case(
        "full-disk-at-a-checkpoint",
        TRAIN,
        full_disk_at_a_checkpoint,
        writes=True,
        then=last_is_never_older_than_a_step_file,
        file_limit=40_000,
    ),
    # python -m training_core.eval
    Case(
        "eval-k-above-the-models-max-k",
        EVAL,
        lambda w: (evaluate(w, "--synthetic", "--k", "100", "--n-tiles", "1", "--tile-size", "32"), ["k=100", "16"]),
    ),
    Case(
        "eval-k-above-the-checkpoints-max-k",
        EVAL,
        lambda w: (eval_shards(w, w.base.processed, "quebec_buildings", checkpoint(w), "--k", "9"), ["k=9", "[2, 4]"]),
    ),
    Case(
        "eval-missing-checkpoint",
        EVAL,
        lambda w: (
            eval_shards(w, w.base.processed, "quebec_buildings", w.tmp / "nope.pt"),
            [str(w.tmp / "nope.pt"), "does not exist"],
        ),
    ),
    Case("eval-damaged-checkpoint", EVAL, eval_damaged_checkpoint),
    Case(
        "eval-missing-dataset",
        EVAL,
        lambda w: (eval_shards(w, w.base.processed, "nope", checkpoint(w)), ["nope/dataset_header.yaml"]),
    ),
    Case(
        "eval-dataset-without-val-tiles",
        EVAL,
        lambda w: (eval_shards(w, w.base.processed, "unlabeled_scenes", checkpoint(w)), ["no `val` tiles"]),
    ),
    Case("eval-damaged-val-tile", EVAL, eval_damaged_val_tile),
    Case(
        "eval-output-is-a-folder",
        EVAL,
        lambda w: (["--synthetic", "--output", w.base.processed], ["--output", "is a folder"]),
    ),
]


def run_with_file_limit(module: str, args: list[str | Path], limit: int) -> Outcome:
    """``run_module`` with every file the process writes capped at ``limit`` bytes (SIGXFSZ ignored, so a
    write past it fails with EFBIG as a write to a full disk fails with ENOSPC)."""

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # kept across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # No bytecode: CPython writes a .pyc with unchecked short writes, which the limit would leave truncated.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_files,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_refused_in_one_line_with_nothing_lost(case: Case, base: Base, tmp_path: Path) -> None:
    world = World(base, tmp_path)
    args, fragments = case.setup(world)
    watched = Untouched(*world.inputs)
    hidden_before = hidden_entries(tmp_path)
    if case.file_limit is None:
        outcome = run_module(case.module, *args)
    else:
        outcome = run_with_file_limit(case.module, args, case.file_limit)
    line = assert_refused(outcome, *fragments)
    assert line.startswith(f"python -m {case.module}: error: "), line
    watched.assert_unchanged()
    assert hidden_entries(tmp_path) == hidden_before, "a temp file was left behind"
    if not case.writes:
        assert not world.out.exists(), f"a refused run wrote {world.out}"
    if case.then is not None:
        case.then(world)
