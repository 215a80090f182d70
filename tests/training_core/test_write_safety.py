"""Writes that fail (a full disk, simulated by a file-size limit) never replace a good output and say so in one
line; outputs get ordinary permissions; links inside the dataset folder are followed by the content hash, so
a data version covers the bytes the readers read, and a link leading out of it is refused, never read."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from runtime_export.atomic import atomic_write_text
from runtime_export.errors import DatasetError
from training_core.datasets.discovery import dataset_content_hash
from training_core.datasets.scan import extract_header
from training_core.datasets.schema import HEADER_FILENAME, dump_header
from training_core.shards.write import build_shards

REPO = Path(__file__).resolve().parents[2]
KAMPALA = "kampala_buildings"
# Run a snippet with every file it writes capped at `limit` bytes: a write past it fails with EFBIG, as a
# full disk fails with ENOSPC, inside GDAL's C code as much as in Python. SIGXFSZ is ignored so the
# process sees the error instead of dying.
LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = {argv!r}
{code}
"""


def run_limited(code: str, argv: list[str], limit: int) -> subprocess.CompletedProcess:
    script = LIMITED.format(limit=limit, argv=argv, code=code)
    # No bytecode written: under the limit Python would save truncated .pyc files into the checkout.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_shard_build_on_a_full_disk_keeps_the_previous_build(kampala_copy: Path, tmp_path: Path) -> None:
    processed = tmp_path / "processed"
    build_shards(kampala_copy, processed, KAMPALA, workers=1)
    before = tree(processed)
    argv = ["shards", "--extracted-root", str(kampala_copy), "--processed-root", str(processed)]
    argv += ["--seed", "7", "--overwrite", "--workers", "1"]
    # An uncompressed 256x256 RGB tile is 196 kB: the first tile write fails.
    result = run_limited("from training_core.shards.__main__ import main; sys.exit(main())", argv, limit=100_000)
    assert result.returncode == 2
    # libtiff prints its own "File too large" lines; the project's message is the one `error:` line.
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("segpipe-shards: error: ")]
    assert "cannot write the tile (disk full?)" in line and ".tif" in line and "Traceback" not in result.stderr
    assert tree(processed) == before
    assert sorted(p.name for p in processed.iterdir()) == [KAMPALA]  # no staging folder left


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    code = """
import torch
from training_core.checkpoint import save_checkpoint
from training_core.config import ModelConfig, TrainConfig
from training_core.model import SegmentationModel
config = TrainConfig(model=ModelConfig(embed_dim=8, max_k=4))
model = SegmentationModel(config.model)
optimizer = torch.optim.AdamW(model.parameters())
save_checkpoint(sys.argv[1], model=model, optimizer=optimizer, step=int(sys.argv[2]), config=config)
"""
    path = tmp_path / "last.pt"
    assert run_limited(code, ["x", str(path), "1"], limit=10_000_000).returncode == 0
    good = path.read_bytes()
    result = run_limited(code, ["x", str(path), "2"], limit=2_000)
    assert result.returncode != 0 and "File too large" in result.stderr
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_outputs_are_readable_by_others_under_the_umask(kampala_copy: Path, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        processed = tmp_path / "processed"
        build_shards(kampala_copy, processed, KAMPALA, workers=1)
        header = dump_header(extract_header(kampala_copy / KAMPALA), tmp_path / "headers" / HEADER_FILENAME)
        report = atomic_write_text(tmp_path / "report.json", "{}\n")
    finally:
        os.umask(previous)
    root = processed / KAMPALA
    modes = {p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")] if p.is_dir()}
    assert modes == {0o755}
    modes = {p.stat().st_mode & 0o777 for p in root.rglob("*") if p.is_file()}
    assert modes == {0o644}
    assert header.stat().st_mode & 0o777 == 0o644 and report.stat().st_mode & 0o777 == 0o644


def test_content_hash_follows_links_inside_the_dataset_folder(kampala_copy: Path, tmp_path: Path) -> None:
    """A dataset folder that is a link, a linked image folder and linked masks, all resolving inside it: changed
    pixels behind a link change the data version, so a rebuild is not reused with stale pixels."""
    storage = tmp_path / "storage" / KAMPALA
    shutil.move(kampala_copy / KAMPALA, storage / "raw")
    dataset = kampala_copy / KAMPALA
    dataset.symlink_to(storage, target_is_directory=True)
    (dataset / "images").symlink_to(storage / "raw" / "images", target_is_directory=True)
    (dataset / "masks").mkdir()
    for mask in sorted((storage / "raw" / "masks").iterdir()):
        (dataset / "masks" / mask.name).symlink_to(mask)
    processed = tmp_path / "processed"
    first = build_shards(kampala_copy, processed, KAMPALA, workers=1)
    assert first.n_items == 48 and first.n_labeled == 16
    version = dataset_content_hash(dataset)

    image = sorted((storage / "raw" / "images").iterdir())[0]
    with rasterio.open(image, "r+") as dst:
        dst.write(np.zeros((3, 4, 4), np.uint8), window=((0, 4), (0, 4)))
    assert dataset_content_hash(dataset) != version
    with pytest.raises(Exception, match="build_key differs"):
        build_shards(kampala_copy, processed, KAMPALA, workers=1)

    mask = sorted((storage / "raw" / "masks").iterdir())[0]
    version = dataset_content_hash(dataset)
    with rasterio.open(mask, "r+") as dst:
        dst.write(np.zeros((1, 4, 4), np.uint8), window=((0, 4), (0, 4)))
    assert dataset_content_hash(dataset) != version


def test_a_link_leading_out_of_the_dataset_is_refused_and_left_out_of_the_hash(
    kampala_copy: Path, tmp_path: Path
) -> None:
    dataset = kampala_copy / KAMPALA
    version = dataset_content_hash(dataset)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("not the dataset's")
    (dataset / "notes.txt").symlink_to(outside / "notes.txt")
    assert dataset_content_hash(dataset) == version  # not read
    leads_out = rf"{KAMPALA}/notes.txt: link: leads to {outside}/notes.txt, outside the dataset folder {dataset}"
    with pytest.raises(DatasetError, match=leads_out):
        extract_header(dataset, workers=1)


def test_a_link_cycle_is_walked_once(kampala_copy: Path) -> None:
    dataset = kampala_copy / KAMPALA
    (dataset / "loop").symlink_to(dataset, target_is_directory=True)
    assert len(extract_header(dataset).modalities) == 2
    dataset_content_hash(dataset)  # terminates
