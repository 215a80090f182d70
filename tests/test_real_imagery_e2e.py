"""Acceptance: 4-band uint16 B, G, R, NIR Cloud-Optimized GeoTIFFs with a nodata border go through header
inference, shards, training, evaluation, export and whole-raster segmentation, and the numpy runtime labels
an original uint16 file as it labels the same pixels scaled by hand to a uint8 RGBA file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.enums import ColorInterp

from tests.imagery import BORDER, GAIN, OFFSET, STORED_ORDER, border_mask, make_rgbn_uint16_cog, scale_by_hand
from training_core.config import DataConfig, ModelConfig, TrainConfig
from training_core.datasets.scan import extract_header
from training_core.datasets.schema import dump_header, header_from_dict, header_to_yaml, load_header
from training_core.eval.scoring import evaluate_checkpoint
from training_core.export import export_artifact
from training_core.export_datasets import input_rules_of
from training_core.shards.index import iter_split_items
from training_core.shards.verify import verify_shards
from training_core.shards.write import build_shards
from training_core.splits import SPLITS
from training_core.train import train

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = "rgbn_uint16_cog"
K = 3
NODATA_LABEL = 255  # runtime_export.segment's default


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def segment(model: Path, image: Path, out: Path) -> tuple[dict, np.ndarray]:
    """``python -m runtime_export.segment`` as a user runs it: (its JSON report, the labels it wrote)."""
    command = [sys.executable, "-m", "runtime_export.segment", "--model", str(model), "--input", str(image)]
    result = subprocess.run(
        [*command, "--output", str(out), "--k", str(K)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with rasterio.open(out) as dst:
        assert (dst.nodata, dst.dtypes[0]) == (NODATA_LABEL, "uint8")
        labels = dst.read(1)
    return json.loads(result.stdout.strip().splitlines()[-1]), labels


def write_rgba_by_hand(original: Path, out: Path, lo: float, hi: float, bands: list[int]) -> np.ndarray:
    """The original uint16 file scaled by hand to uint8 R, G, B plus an alpha band (255 valid, 0 nodata);
    returns the validity the alpha band encodes."""
    with rasterio.open(original) as src:
        raw, crs, transform, nodata = src.read(), src.crs, src.transform, src.nodata
    rgb = scale_by_hand(raw, lo, hi, bands)
    valid = ~(np.stack([raw[band - 1] for band in bands]) == nodata).all(axis=0)
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    profile = {
        "driver": "GTiff",
        "width": raw.shape[2],
        "height": raw.shape[1],
        "count": 4,
        "dtype": "uint8",
        "crs": crs,
        "transform": transform,
        "photometric": "RGB",
        "alpha": "YES",  # GTiff: the 4th sample is alpha (setting colorinterp alone leaves it undefined)
    }
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(np.concatenate([rgb, alpha[None]]))
    with rasterio.open(out) as check:
        assert check.colorinterp == (ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha)
    return valid


@pytest.mark.timeout(180)
def test_rgbn_uint16_cog_dataset_trains_exports_and_segments_like_its_uint8_rendering(tmp_path: Path) -> None:
    extracted, processed = tmp_path / "extracted", tmp_path / "processed"
    dataset = make_rgbn_uint16_cog(extracted, DATASET_ID)

    # Header inference: dtype, band selection from the colour interpretation, nodata, value range.
    header = extract_header(dataset, DATASET_ID)
    rule = header.input
    assert (rule.dtype, rule.channels, rule.bands, rule.alpha_band, rule.nodata) == ("uint16", 4, [3, 2, 1], None, 0)
    lo, hi = rule.value_range
    # Percentiles of valid values only: the nodata border (0) would pull lo below the smallest real value.
    assert OFFSET <= lo < hi <= 255 * GAIN + OFFSET
    assert header.target.label_values == [0, 1, 2]
    assert header_from_dict(yaml.safe_load(header_to_yaml(header)), "round trip") == header
    assert load_header(dump_header(header, tmp_path / "header.yaml")) == header

    # Shards: tiles keep the source dtype and every band (and the colour interpretation the header read).
    report = build_shards(extracted, processed, DATASET_ID)
    assert (report.n_items, report.n_labeled, report.label_values) == (20, 16, [0, 1, 2])
    assert report.counts == {"train": 4, "metrics_train": 4, "val": 12}
    assert verify_shards(processed, DATASET_ID) == []
    assert load_header(report.header_path) == header
    tiles = [
        shard_dir / entry.input
        for split in SPLITS
        for shard_dir, entry in iter_split_items(processed, DATASET_ID, split)
    ]
    assert len(tiles) == 20
    for tile in tiles:
        with rasterio.open(tile) as src:
            assert (src.dtypes, src.count, src.nodata) == (("uint16",) * 4, 4, 0)
            assert src.colorinterp == STORED_ORDER

    # Train 2 steps on the unlabeled train split, evaluate on val, export with the datasets' input rules.
    config = TrainConfig(
        model=ModelConfig(embed_dim=8, max_k=4),
        data=DataConfig(source="shards", processed_root=str(processed), dataset_ids=[DATASET_ID], patch_size=32),
        steps=2,
        batch_size=2,
        device="cpu",
        checkpoint_every=2,
        log_every=1,
    )
    trained = train(config, tmp_path / "checkpoints", resume=False)
    assert trained.steps == 2 and trained.checkpoint_path is not None
    assert all(np.isfinite(value) for value in trained.final_losses.values())
    evaluation = evaluate_checkpoint(trained.checkpoint_path, processed, DATASET_ID)
    assert evaluation.mapping_fitted_on == "metrics_train" and evaluation.n_eval_tiles == 12
    assert isinstance(evaluation.val_miou, float) and 0.0 <= evaluation.val_miou <= 1.0
    rules = input_rules_of(processed, [DATASET_ID])
    expected_rule = {"dtype": "uint16", "bands": [3, 2, 1], "alpha_band": None, "nodata": 0.0, "value_range": [lo, hi]}
    assert rules == {DATASET_ID: expected_rule}
    artifact = export_artifact(
        trained.checkpoint_path,
        tmp_path / "artifact",
        {"datasets": [DATASET_ID]},
        {"val_miou": evaluation.val_miou},
        input_rules=rules,
    )
    meta = json.loads((artifact / "meta.json").read_text())
    assert meta["input_rules"] == {DATASET_ID: expected_rule}

    # Segment an original uint16 COG, and the same pixels scaled by hand into a uint8 RGBA GeoTIFF.
    original = dataset / "images" / sorted(p.name for p in (dataset / "images").glob("*.tif"))[0]
    valid = write_rgba_by_hand(original, tmp_path / "by_hand_rgba.tif", lo, hi, rule.bands)
    assert (~valid == border_mask(*valid.shape)).all()
    raw_report, raw_labels = segment(artifact, original, tmp_path / "labels_uint16.tif")
    rgba_report, rgba_labels = segment(artifact, tmp_path / "by_hand_rgba.tif", tmp_path / "labels_rgba.tif")
    assert raw_report["rule"] == {key: value for key, value in expected_rule.items() if key != "dtype"}
    assert raw_report["rule_source"] == "model input_rules for uint16"
    assert rgba_report["rule"] == {"bands": [1, 2, 3], "alpha_band": 4, "nodata": None, "value_range": None}
    assert rgba_report["rule_source"] == "file colour interpretation"
    n_border = BORDER * (2 * valid.shape[1] - BORDER)  # a square tile: 16 rows plus 16 columns
    assert raw_report["nodata_pixels"] == rgba_report["nodata_pixels"] == n_border == int((~valid).sum())

    assert (raw_labels[~valid] == NODATA_LABEL).all() and (rgba_labels[~valid] == NODATA_LABEL).all()
    assert (raw_labels[valid] < K).all() and (rgba_labels[valid] < K).all()
    assert len(np.unique(raw_labels[valid])) >= 2
    agreement = float((raw_labels[valid] == rgba_labels[valid]).mean())
    assert agreement >= 0.999, f"labels agree on {agreement:.5f} of the valid pixels"
    with rasterio.open(original) as src, rasterio.open(tmp_path / "labels_uint16.tif") as dst:
        assert (dst.crs, dst.transform, dst.shape) == (src.crs, src.transform, src.shape)
