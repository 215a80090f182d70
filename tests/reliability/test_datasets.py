"""Issue 24, "nothing lost, nothing silent": every bad dataset input found on a user's machine, through the
command lines a user runs (``headers``, ``shards``, and ``train`` for a shard index).

Each case breaks a small dataset, runs the command in a child process and asserts the harness's promise: a
non-zero exit, exactly one error line naming the file, the field and the problem, no traceback, every file
under the test's folder (inputs, outside files, earlier builds) byte-identical, no hidden leftovers, and no
byte of a file outside the dataset in the output. After the table, what must keep working: links that stay
inside the dataset folder, and a processed dataset folder that is a link.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.enums import ColorInterp

from tests.reliability.harness import Untouched, assert_refused, run_module
from training_core.datasets.scan import extract_header
from training_core.datasets.schema import HEADER_FILENAME
from training_core.shards.index import INDEX_FILENAME, MANIFEST_FILENAME, shard_dirs
from training_core.shards.verify import verify_shards
from training_core.shards.write import build_shards

HEADERS, SHARDS, TRAIN = "training_core.headers", "training_core.shards", "training_core.train"
SECRET = "top-secret-line: not the dataset's"  # what every file outside the dataset holds
NOT_UTF8 = os.fsdecode(b"\xff")  # a name byte that is not UTF-8, as Python spells it


class Env:
    """A good toy dataset ``<tmp>/extracted/toy`` (3 unlabeled, 2 labeled, 16x16 uint8 RGB) and what a case
    changes: the command's arguments and files outside the dataset."""

    def __init__(
        self,
        tmp_path: Path,
        make_dataset: Callable[..., Path],
        write_tif: Callable[..., Path],
        sample: Path,
        module: str,
    ) -> None:
        self.module = module
        self.write_tif = write_tif
        self.sample = sample
        self.tmp = tmp_path
        self.dataset = make_dataset("toy", n_unlabeled=3, n_labeled=2)
        self.root = self.dataset.parent
        self.processed = tmp_path / "processed"
        self.workers = "1"
        self.args: list[str | Path] | None = None  # a case's own command line instead of the default

    def outside(self, name: str, data: bytes | None = None, mode: int = 0o644) -> Path:
        path = self.tmp / "elsewhere" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data if data is not None else SECRET.encode() + b"\n")
        path.chmod(mode)
        return path

    def commit_header(self, edit: Callable[[dict], None]) -> Path:
        data = extract_header(self.dataset, workers=1).model_dump(mode="json")
        edit(data)
        path = self.dataset / HEADER_FILENAME
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def command(self) -> list[str | Path]:
        if self.args is not None:
            return self.args
        if self.module == HEADERS:
            return ["--extracted-root", self.root, "--dry-run", "--workers", self.workers]
        return ["--extracted-root", self.root, "--processed-root", self.processed, "--workers", self.workers]


def write_rgba(env: Env, path: Path, alpha: int) -> None:
    """A 16x16 RGBA input whose fourth band GDAL calls alpha, so inference reads it as the alpha band."""
    pixels = np.full((4, 16, 16), 120, np.uint8)
    pixels[3] = alpha
    env.write_tif(path, pixels)
    with rasterio.open(path, "r+") as dst:
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]


# ------------------------------------------------------------------------------ 1. files leading outside


def licence_linked_to_a_secret(env: Env) -> tuple[str, ...]:
    secret = env.outside("secret.txt", mode=0o600)
    (env.dataset / "LICENSE").symlink_to(secret)
    return f"{env.dataset}/LICENSE", f"leads to {secret}", "outside the dataset folder"


def manifest_linked_outside(env: Env) -> tuple[str, ...]:
    env.commit_header(lambda data: data["splits"].update(manifest_files={"val": "lists/val.txt"}))
    (env.dataset / "lists").mkdir()
    (env.dataset / "lists" / "val.txt").symlink_to(env.outside("val.txt"))
    return "lists/val.txt", "leads to", "elsewhere/val.txt", "outside the dataset folder"


def committed_header_linked_outside(env: Env) -> tuple[str, ...]:
    header = env.commit_header(lambda data: None)
    moved = env.outside("header.yaml", header.read_bytes())
    header.unlink()
    header.symlink_to(moved)
    return f"{HEADER_FILENAME}: committed header: leads to {moved}", "outside the dataset folder"


def raster_linked_outside(env: Env) -> tuple[str, ...]:
    stray = env.write_tif(env.tmp / "elsewhere" / "scene.tif", np.full((3, 16, 16), 7, np.uint8))
    (env.dataset / "images" / "u9.tif").symlink_to(stray)
    return "images/u9.tif: link: leads to", str(stray), "outside the dataset folder"


def mask_linked_outside(env: Env) -> tuple[str, ...]:
    stray = env.write_tif(env.tmp / "elsewhere" / "labels.tif", np.ones((1, 16, 16), np.uint8))
    (env.dataset / "masks" / "l1.tif").unlink()
    (env.dataset / "masks" / "l1.tif").symlink_to(stray)
    return "masks/l1.tif: link: leads to", str(stray), "outside the dataset folder"


def image_folder_linked_outside(env: Env) -> tuple[str, ...]:
    (env.dataset / "images").rename(env.tmp / "elsewhere")
    (env.dataset / "images").symlink_to(env.tmp / "elsewhere", target_is_directory=True)
    return f"{env.dataset}/images: folder: leads to {env.tmp / 'elsewhere'}", "outside the dataset folder"


# -------------------------------------------------------------------------------- 2. no valid pixel


def every_pixel_nodata(env: Env) -> tuple[str, ...]:
    for path in (env.dataset / "images").iterdir():
        env.write_tif(path, np.zeros((3, 16, 16), np.uint8), nodata=0)
    return "dataset 'toy': no valid input pixel in any of its 5 files", "nodata, masked or alpha 0"


def one_file_all_masked(env: Env) -> tuple[str, ...]:
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(env.dataset / "images" / "u1.tif", "r+") as dst:
        dst.write_mask(np.zeros((16, 16), np.uint8))
    return f"{env.dataset}/images/u1.tif: no valid pixel", "1 of the 5 input files have none", "mask"


def one_file_alpha_zero(env: Env) -> tuple[str, ...]:
    for path in (env.dataset / "images").iterdir():
        write_rgba(env, path, alpha=0 if path.stem == "l0" else 255)
    return f"{env.dataset}/images/l0.tif: no valid pixel", "alpha 0", "1 of the 5 input files have none"


# --------------------------------------------------------------------------- 3. an item listed twice


def index_line_duplicated(env: Env) -> tuple[str, ...]:
    build_shards(env.root, env.processed, "toy", workers=1)
    (shard,) = shard_dirs(env.processed, "toy", "train")
    lines = (shard / INDEX_FILENAME).read_text().splitlines()
    (shard / INDEX_FILENAME).write_text("\n".join([*lines, lines[1]]) + "\n")
    item = json.loads(lines[1])["item_id"]
    env.args = ["--data-source", "shards", "--processed-root", env.processed, "--dataset-id", "toy"]
    env.args += ["--steps", "1", "--device", "cpu", "--checkpoint-dir", env.tmp / "checkpoints"]
    return f"{shard / INDEX_FILENAME}:4: item {item!r} is listed again, first at {shard / INDEX_FILENAME}:2", "once"


# ----------------------------------------------------------------------------- 4. value_range bounds


def value_range_infinite(env: Env) -> tuple[str, ...]:
    env.commit_header(lambda data: data["modalities"][0].update(value_range=[0.0, float("inf")]))
    return f"{HEADER_FILENAME}: invalid dataset header: modalities.0.value_range", "[0.0, inf]", "two finite numbers"


# ----------------------------------------------------------- 5. replacing what is not a shard build


def overwrite_onto_a_folder_that_is_no_build(env: Env) -> tuple[str, ...]:
    (env.processed / "toy").mkdir(parents=True)
    (env.processed / "toy" / "notes.txt").write_text("the user's\n")
    env.args = [*env.command(), "--overwrite"]
    return f"{env.processed / 'toy'}: exists and is not a shard build (no {MANIFEST_FILENAME})"


def processed_root_is_the_extracted_root(env: Env) -> tuple[str, ...]:
    env.processed = env.root
    env.args = [*env.command(), "--overwrite"]
    return f"{env.root / 'toy'}: processed dataset folder overlaps the raw dataset folder {env.dataset}"


# ------------------------------------------------------------------------ 6. a traceback no longer


def missing_root(env: Env) -> tuple[str, ...]:
    env.root = env.tmp / "no-such-root"
    return f"{env.root}: extracted root is not a directory"


def missing_dataset(env: Env) -> tuple[str, ...]:
    env.args = [*env.command(), "--dataset-id", "absent"]
    return f"{env.root / 'absent'}: no such dataset folder"


def dataset_id_is_a_path(env: Env) -> tuple[str, ...]:
    env.args = [*env.command(), "--dataset-id", "../extracted/toy"]
    return "../extracted/toy: dataset id: must be a folder name in", "not a path"


def pin_list_not_text(env: Env) -> tuple[str, ...]:
    env.commit_header(lambda data: data["splits"].update(manifest_files={"val": "val.txt"}))
    (env.dataset / "val.txt").write_bytes(b"\xff\xfe\x00\x81 garbage\n")
    return f"{env.dataset}/val.txt: splits.manifest_files.val: not a UTF-8 text file"


def shard_manifest_corrupt(env: Env) -> tuple[str, ...]:
    build_shards(env.root, env.processed, "toy", workers=1)
    (env.processed / "toy" / MANIFEST_FILENAME).write_bytes(b"\x00\xff\x13 not json")
    return f"{env.processed / 'toy' / MANIFEST_FILENAME}: manifest is not UTF-8 text"


def truncated_tile(env: Env) -> tuple[str, ...]:
    real_tile = next((env.sample / "kampala_buildings" / "images").glob("*.tif")).read_bytes()
    (env.dataset / "images" / "u1.tif").write_bytes(real_tile[: len(real_tile) // 2])
    env.workers = "2"  # GDAL's own error lines must stay off stderr in worker processes too
    return f"{env.dataset}/images/u1.tif: cannot read pixels (truncated or corrupt TIFF?)"


def file_name_not_utf8(env: Env) -> tuple[str, ...]:
    (env.dataset / "images" / "u1.tif").rename(env.dataset / "images" / f"u{NOT_UTF8}.tif")
    return "images/u\\xff.tif: file name: the path is not valid UTF-8", "rename it"


def root_path_not_utf8(env: Env) -> tuple[str, ...]:
    env.root = env.root.rename(env.tmp / f"extracted{NOT_UTF8}")
    return f"{env.tmp}/extracted\\xff/toy: dataset folder: the path is not valid UTF-8"


CASES: list[tuple[str, Callable[[Env], tuple[str, ...]]]] = [
    (HEADERS, licence_linked_to_a_secret),
    (SHARDS, licence_linked_to_a_secret),
    (HEADERS, manifest_linked_outside),
    (HEADERS, committed_header_linked_outside),
    (HEADERS, raster_linked_outside),
    (SHARDS, mask_linked_outside),
    (SHARDS, image_folder_linked_outside),
    (HEADERS, every_pixel_nodata),
    (SHARDS, every_pixel_nodata),
    (HEADERS, one_file_all_masked),
    (SHARDS, one_file_alpha_zero),
    (TRAIN, index_line_duplicated),
    (HEADERS, value_range_infinite),
    (SHARDS, value_range_infinite),
    (SHARDS, overwrite_onto_a_folder_that_is_no_build),
    (SHARDS, processed_root_is_the_extracted_root),
    (HEADERS, missing_root),
    (SHARDS, missing_root),
    (HEADERS, missing_dataset),
    (SHARDS, missing_dataset),
    (HEADERS, dataset_id_is_a_path),
    (HEADERS, pin_list_not_text),
    (SHARDS, shard_manifest_corrupt),
    (HEADERS, truncated_tile),
    (SHARDS, truncated_tile),
    (HEADERS, file_name_not_utf8),
    (SHARDS, file_name_not_utf8),
    (HEADERS, root_path_not_utf8),
    (SHARDS, root_path_not_utf8),
]


@pytest.mark.parametrize(
    ("module", "case"), CASES, ids=[f"{module.rsplit('.', 1)[1]}-{case.__name__}" for module, case in CASES]
)
def test_bad_dataset_input_is_one_line_and_loses_nothing(
    tmp_path: Path,
    make_dataset: Callable[..., Path],
    write_tif: Callable[..., Path],
    sample_extracted: Path,
    module: str,
    case: Callable[[Env], tuple[str, ...]],
) -> None:
    env = Env(tmp_path, make_dataset, write_tif, sample_extracted, module)
    fragments = case(env)
    untouched = Untouched(tmp_path)
    outcome = run_module(module, *env.command())
    assert_refused(outcome, *fragments)
    untouched.assert_unchanged()
    assert SECRET not in outcome.stdout + outcome.stderr


# ------------------------------------------------------------------------------------ what keeps working


def test_links_inside_the_dataset_folder_keep_working(tmp_path: Path, make_dataset: Callable[..., Path]) -> None:
    """A dataset folder that is a link, and a licence file linked to a file inside it: read as before."""
    stored = make_dataset("stored")
    (stored / "docs").mkdir()
    (stored / "docs" / "LICENSE.md").write_text("CC-BY 4.0, the makers\n")
    (stored / "LICENSE").symlink_to(Path("docs") / "LICENSE.md")
    root = tmp_path / "linked"
    root.mkdir()
    (root / "stored").symlink_to(stored, target_is_directory=True)
    outcome = run_module(HEADERS, "--extracted-root", root, "--dry-run", "--workers", "1")
    assert outcome.returncode == 0, outcome.stderr
    assert '"licence": "CC-BY 4.0, the makers"' in outcome.stdout


def test_a_linked_processed_folder_is_rebuilt_behind_its_link(
    tmp_path: Path, make_dataset: Callable[..., Path]
) -> None:
    """``shards --overwrite`` on a processed dataset folder that is a link: the link stays, its target gets the
    new build, and nothing is left beside either."""
    dataset = make_dataset("toy")
    processed, disk = tmp_path / "processed", tmp_path / "disk"
    build_shards(dataset.parent, disk, "toy", workers=1)
    processed.mkdir()
    (processed / "toy").symlink_to(disk / "toy", target_is_directory=True)
    args = ["--extracted-root", dataset.parent, "--processed-root", processed, "--workers", "1"]
    outcome = run_module(SHARDS, *args, "--seed", "9", "--overwrite")
    assert outcome.returncode == 0, outcome.stderr
    assert (processed / "toy").is_symlink() and os.readlink(processed / "toy") == str(disk / "toy")
    assert yaml.safe_load((disk / "toy" / MANIFEST_FILENAME).read_text())["seed"] == 9
    assert sorted(os.listdir(processed)) == ["toy"] and sorted(os.listdir(disk)) == ["toy"]
    assert verify_shards(processed, "toy") == []
    again = run_module(SHARDS, *args, "--seed", "9")  # the build behind the link is found and reused
    assert again.returncode == 0 and '"reused": true' in again.stdout
