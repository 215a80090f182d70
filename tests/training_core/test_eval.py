"""Evaluation end to end: mapping fitted on metrics_train only, baseline beside the model, CLI and picture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from runtime_export.numpy_runtime.pixels import PixelRule
from training_core.checkpoint import save_checkpoint
from training_core.config import ModelConfig, TrainConfig
from training_core.eval.__main__ import main
from training_core.eval.methods import KMeansRGB, RuntimeMethod, runtime_of
from training_core.eval.picture import render_comparison
from training_core.eval.report import BASELINE, CONSTANT, DECISION_MARGIN, MODEL, UNTRAINED, verdicts
from training_core.eval.scoring import evaluate_checkpoint, evaluate_model, evaluate_synthetic, evaluate_tiles
from training_core.eval.tiles import LabeledTile, SplitTiles, read_tile
from training_core.model import SegmentationModel
from training_core.shards.write import build_shards

SAMPLE_ROOT = Path(__file__).resolve().parents[2] / "sample_data" / "extracted"


def _tile(index: int, label: np.ndarray) -> LabeledTile:
    """A tile whose red channel carries its index, so a fake predictor can look its answer up."""
    rgb = np.full((3, *label.shape), index, np.uint8)
    return LabeledTile(f"t{index}", rgb, label)


class _lookup_predictor:  # noqa: N801 (a test double used like a function)
    """A method whose fit learns nothing and whose prediction is looked up by tile (at every K)."""

    def __init__(self, predictions: dict[int, np.ndarray]) -> None:
        self.predictions = predictions

    def observe(self, tile: LabeledTile, index: int) -> None:
        pass

    def fit(self, ks: list[int]) -> None:
        self.ks = ks

    def predict(self, rgb: np.ndarray, valid: np.ndarray | None) -> dict[int, np.ndarray]:
        return dict.fromkeys(self.ks, self.predictions[int(rgb[0, 0, 0])])


def test_mapping_is_fitted_on_metrics_train_never_on_val() -> None:
    label = np.array([[1, 1, 2, 2]], np.uint8)
    fit = [_tile(0, label)]
    val = [_tile(1, label)]
    # metrics_train says cluster 0 = class 1; on val the clusters are swapped.
    predictor = _lookup_predictor({0: np.array([[0, 0, 1, 1]]), 1: np.array([[1, 1, 0, 0]])})
    report = evaluate_tiles({MODEL: predictor}, fit, val, k=2, n_classes=2)
    assert report.mapping_fitted_on == "metrics_train"
    assert report.methods[MODEL].hungarian.cluster_to_class == [1, 2]
    assert report.val_miou == 0.0 and report.methods[MODEL].majority.miou == 0.0
    # The fallback: nothing labeled in metrics_train -> fit on val, and say so.
    unlabeled_fit = [_tile(0, np.zeros_like(label))]
    fallback = evaluate_tiles({MODEL: predictor}, unlabeled_fit, val, k=2, n_classes=2)
    assert fallback.mapping_fitted_on == "val" and fallback.val_miou == 1.0


def test_all_ignored_val_tiles_give_no_scores_but_proxies() -> None:
    zeros = np.zeros((4, 4), np.uint8)
    predictor = _lookup_predictor({0: np.zeros((4, 4), np.uint8), 1: np.eye(4, dtype=np.uint8)})
    report = evaluate_tiles({MODEL: predictor}, [_tile(0, zeros + 1)], [_tile(1, zeros)], k=2, n_classes=1)
    assert report.mapping_fitted_on is None and report.val_miou is None
    assert report.methods[MODEL].proxies["utilisation"] == 1.0
    assert report.to_dict()["model_beats_baseline"] is None


def _small_model(seed: int = 0) -> tuple[SegmentationModel, TrainConfig]:
    torch.manual_seed(seed)
    config = TrainConfig(model=ModelConfig(embed_dim=16, max_k=8), seed=seed)
    return SegmentationModel(config.model).eval(), config


def test_real_tiles_model_and_baseline_side_by_side(tmp_path: Path) -> None:
    names = ["OAM-1238448-1046532-21", "OAM-1238449-1046533-21", "OAM-1238450-1046534-21"]
    tiles = [
        read_tile(
            n,
            SAMPLE_ROOT / f"kampala_buildings/images/{n}.tif",
            SAMPLE_ROOT / f"kampala_buildings/masks/{n}.tif",
            PixelRule(),
        )
        for n in names
    ]
    model, config = _small_model()
    methods = {MODEL: RuntimeMethod(runtime_of(model, config), step=1), BASELINE: KMeansRGB(step=1, seed=0)}
    report = evaluate_tiles(methods, tiles[:1], tiles[1:], k=2, n_classes=2)
    labeled_val_pixels = sum(int((t.label > 0).sum()) for t in tiles[1:])
    for name in (MODEL, BASELINE):
        hungarian = report.methods[name].hungarian
        assert hungarian.n_pixels == labeled_val_pixels
        assert 0.0 <= hungarian.miou <= 1.0 and set(hungarian.per_class_iou) == {"1", "2"}
        assert report.methods[name].majority.k == 2 and report.methods[name].majority_k8.k == 8
        assert set(report.methods[name].proxies) == {
            "utilisation",
            "usage_entropy",
            "speckle",
            "boundary_density",
            "view_consistency",
        }
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["val_miou"] == report.val_miou and payload["baseline_miou"] == report.miou(BASELINE)
    assert (report.n_fit_tiles, report.n_eval_tiles, len(report.samples)) == (1, 2, 2)
    picture = render_comparison(report, tmp_path / "pics" / "val.png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in picture.parent.iterdir()] == ["val.png"]


def test_read_tile_ignores_labels_under_input_nodata(tmp_path: Path) -> None:
    profile = {
        "driver": "GTiff",
        "height": 4,
        "width": 4,
        "dtype": "uint8",
        "crs": "EPSG:3857",
        "transform": Affine(1, 0, 0, 0, -1, 4),
    }
    rgb = np.full((3, 4, 4), 50, np.uint8)
    rgb[:, 0, :] = 0  # the first row is nodata
    with rasterio.open(tmp_path / "in.tif", "w", count=3, nodata=0, **profile) as dst:
        dst.write(rgb)
    with rasterio.open(tmp_path / "mask.tif", "w", count=1, **profile) as dst:
        dst.write(np.full((1, 4, 4), 2, np.uint8))
    tile = read_tile("x", tmp_path / "in.tif", tmp_path / "mask.tif", PixelRule())
    assert (tile.label[0] == 0).all() and (tile.label[1:] == 2).all()


@pytest.fixture(scope="module")
def quebec_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    processed = tmp_path_factory.mktemp("processed")
    build_shards(SAMPLE_ROOT, processed, "quebec_buildings")
    return processed


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, config = _small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    return save_checkpoint(path, model=model, optimizer=optimizer, step=3, config=config)


def test_evaluate_checkpoint_on_shards_scores_the_model_beside_its_controls(
    quebec_shards: Path, checkpoint: Path
) -> None:
    report = evaluate_checkpoint(checkpoint, quebec_shards, "quebec_buildings")
    assert report.k == 2 and report.k_majority == 8 and report.mapping_fitted_on == "metrics_train"
    assert (report.n_fit_tiles, report.n_eval_tiles) == (1, 1)
    assert report.checkpoint_step == 3 and report.data_version
    assert set(report.methods) == {MODEL, UNTRAINED, BASELINE, CONSTANT}
    for method in report.methods.values():
        assert method.hungarian.n_pixels == 512 * 512 and method.majority_k8.k == 8
    # The checkpoint holds the seed-0 initial weights: training changed nothing, so the untrained twin
    # (same architecture, same seed, same inference) scores exactly the same.
    assert report.miou(UNTRAINED) == report.miou(MODEL)
    # The constant predictor is the most frequent class everywhere: IoU of one class, 0 for the other.
    constant = report.methods[CONSTANT].hungarian
    assert sorted(v for v in constant.per_class_iou.values())[0] == 0.0
    scores = report.to_dict()["scores"]
    assert set(scores) == set(report.methods) and all(
        set(row) == {"hungarian_miou", "majority_k8_miou"} for row in scores.values()
    )
    with pytest.raises(ValueError, match="max_k"):
        evaluate_checkpoint(checkpoint, quebec_shards, "quebec_buildings", k=9)


def test_evaluate_fits_the_mapping_on_the_metrics_train_shards(quebec_shards: Path) -> None:
    """A predictor right on metrics_train and swapped on val scores 0: the mapping came from metrics_train."""
    answers: dict[bytes, np.ndarray] = {}
    for split, swap in (("metrics_train", False), ("val", True)):
        for tile in SplitTiles(quebec_shards, "quebec_buildings", split):
            cluster = np.clip(tile.label.astype(np.int64) - 1, 0, 1)
            answer = (1 - cluster if swap else cluster).astype(np.uint8)
            answers[tile.rgb.tobytes()] = answer
            answers[np.ascontiguousarray(tile.rgb[:, :, ::-1]).tobytes()] = answer[:, ::-1]  # the flipped view

    class Answers(_lookup_predictor):
        def predict(self, rgb: np.ndarray, valid: np.ndarray | None) -> dict[int, np.ndarray]:
            return dict.fromkeys(self.ks, answers[rgb.tobytes()])

    fit, val = (SplitTiles(quebec_shards, "quebec_buildings", split) for split in ("metrics_train", "val"))
    report = evaluate_tiles({MODEL: Answers({})}, fit, val, k=2, n_classes=2)
    assert report.mapping_fitted_on == "metrics_train" and report.val_miou == 0.0


def test_streaming_evaluation_equals_fitting_on_all_tiles_in_memory(quebec_shards: Path) -> None:
    """The streamed lattice sample gives the prototypes and labels of one soft k-means over every tile's cells
    held in memory at once (raster order), so the same confusion matrices."""
    from runtime_export.numpy_runtime.runtime import soft_kmeans
    from training_core.metrics import confusion_matrix, hungarian_scores

    model, config = _small_model()
    runtime = runtime_of(model, config)
    tiles = [t for split in ("metrics_train", "val") for t in SplitTiles(quebec_shards, "quebec_buildings", split)]
    streamed = evaluate_tiles({MODEL: RuntimeMethod(runtime, step=1)}, tiles[:1], tiles[1:], k=2, n_classes=2)

    embeddings = [runtime.embed(t.rgb) for t in tiles]  # 512 x 512 tiles, all valid: nothing to fill or pad
    cells = np.concatenate([e.embeddings for e in embeddings])
    seeds = np.concatenate([e.seed_logits[:, :2] for e in embeddings])
    _, prototypes = soft_kmeans(cells, seeds, runtime.cluster_iters, runtime.temperature)
    conf = [
        confusion_matrix(runtime.labels_from_assignment(runtime.assign(e, prototypes), e), t.label, 2, 2)
        for e, t in zip(embeddings, tiles, strict=True)
    ]
    expected = hungarian_scores(conf[0], conf[1])
    assert streamed.methods[MODEL].hungarian == expected


def test_evaluation_and_segment_give_the_same_labels(tmp_path: Path) -> None:
    """One raster, one prototype procedure: evaluation's labels are segment's labels."""
    from runtime_export.numpy_runtime.runtime import load_runtime_model
    from runtime_export.segment import segment_raster
    from training_core.export import export_model

    model, config = _small_model()
    artifact = export_model(model, config, tmp_path / "artifact", {}, {})
    runtime = load_runtime_model(artifact)
    raster = SAMPLE_ROOT / "quebec_buildings/images/tile_1.tif"
    tile = read_tile("tile_1", raster, None, PixelRule())
    method = RuntimeMethod(runtime, step=1)
    method.observe(tile, 0)
    method.fit([4])
    segment_raster(runtime, raster, tmp_path / "labels.tif", 4)
    with rasterio.open(tmp_path / "labels.tif") as src:
        np.testing.assert_array_equal(src.read(1), method.predict(tile.rgb, tile.valid)[4])


def test_evaluate_model_streams_a_whole_dataset(quebec_shards: Path) -> None:
    model, config = _small_model()
    report = evaluate_model(model, config, quebec_shards, "quebec_buildings", k=3)
    assert report.k == 3 and report.miou(MODEL) is not None and report.miou(CONSTANT) is not None


def test_cli_shards_report_to_stdout_and_file(quebec_shards: Path, checkpoint: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "report.json"
    argv = ["--data-source", "shards", "--processed-root", str(quebec_shards), "--dataset-id", "quebec_buildings"]
    assert main([*argv, "--checkpoint", str(checkpoint), "--k", "3", "--output", str(output)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(output.read_text())
    assert printed["k"] == 3 and printed["dataset_id"] == "quebec_buildings"
    assert printed["val_miou"] is not None and printed["baseline_miou"] is not None


def test_cli_requires_shard_arguments(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--data-source", "shards", "--dataset-id", "x"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m training_core.eval: error: --data-source shards needs --processed-root, --checkpoint"
    )


def test_cli_synthetic_proxies(tmp_path: Path, capsys) -> None:
    output = tmp_path / "synthetic.json"
    argv = ["--synthetic", "--seed", "7", "--n-tiles", "2", "--tile-size", "64", "--output", str(output)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(output.read_text())
    assert report["mapping_fitted_on"] is None and report["n_eval_tiles"] == 2
    assert report["methods"][MODEL]["proxies"]["utilisation"] > 0
    assert report["methods"][BASELINE]["proxies"]["view_consistency"] > 0


def test_label_outside_the_class_range_names_the_tile() -> None:
    predictor = _lookup_predictor({0: np.zeros((1, 2), np.uint8), 1: np.zeros((1, 2), np.uint8)})
    bad = [_tile(1, np.array([[1, 3]], np.uint8))]
    with pytest.raises(ValueError, match="tile t1: label value 3"):
        evaluate_tiles({MODEL: predictor}, [], bad, k=2, n_classes=2)


def test_baseline_fits_one_set_of_centres_for_the_dataset() -> None:
    """k-means on RGB over all labeled kampala tiles reproduces the reference 0.465 (sample_data/README.md)."""
    names = sorted(p.stem for p in (SAMPLE_ROOT / "kampala_buildings/masks").glob("*.tif"))
    tiles = [
        read_tile(
            n,
            SAMPLE_ROOT / f"kampala_buildings/images/{n}.tif",
            SAMPLE_ROOT / f"kampala_buildings/masks/{n}.tif",
            PixelRule(),
        )
        for n in names
    ]
    baseline = KMeansRGB(step=1, seed=0)
    report = evaluate_tiles({BASELINE: baseline}, [], tiles, k=2, n_classes=2)
    assert report.mapping_fitted_on == "val"
    assert report.miou(BASELINE) == pytest.approx(0.465, abs=0.005)
    # One set of centres: the same colour gets the same cluster id in every tile.
    dark, bright = np.zeros((3, 1, 1), np.uint8), np.full((3, 1, 1), 255, np.uint8)
    assert baseline.predict(dark, None)[2][0, 0] == 0 and baseline.predict(bright, None)[2][0, 0] == 1


def test_a_near_tie_is_no_verdict_and_the_report_says_by_how_much() -> None:
    """kampala 0.4655 vs its untrained twin's 0.4653 reads as a tie, not as "training helped"."""
    tie = verdicts(model=0.4655, baseline=0.4420, untrained=0.4653)
    assert tie["training_helped"] is False and tie["model_minus_untrained"] == pytest.approx(0.0002)
    assert tie["model_beats_baseline"] is True and tie["model_minus_baseline"] == pytest.approx(0.0235)
    assert tie["decision_margin"] == DECISION_MARGIN == 0.02
    just_inside = verdicts(model=0.46, baseline=0.46 - DECISION_MARGIN / 2, untrained=0.46 - 2 * DECISION_MARGIN)
    assert (just_inside["model_beats_baseline"], just_inside["training_helped"]) == (False, True)
    assert verdicts(None, 0.4, 0.4) == {
        "decision_margin": DECISION_MARGIN,
        "model_minus_baseline": None,
        "model_beats_baseline": None,
        "model_minus_untrained": None,
        "training_helped": None,
    }


def test_report_json_carries_the_verdicts_with_margin_and_differences(quebec_shards: Path, checkpoint: Path) -> None:
    """The checkpoint holds the untrained weights: the model ties its untrained twin exactly, so no verdict."""
    report = evaluate_checkpoint(checkpoint, quebec_shards, "quebec_buildings").to_dict()
    assert report["model_minus_untrained"] == 0.0 and report["training_helped"] is False
    assert report["decision_margin"] == DECISION_MARGIN
    difference = report["val_miou"] - report["baseline_miou"]
    assert report["model_minus_baseline"] == difference
    assert report["model_beats_baseline"] == (difference > DECISION_MARGIN)


def test_k_outside_the_models_range_is_refused_before_any_tile_is_read() -> None:
    model, _ = _small_model()  # max_k 8
    for k in (1, 9, 100):
        with pytest.raises(ValueError, match=rf"k={k} is outside the model's k_range \[2, 8\]"):
            evaluate_synthetic(model, k, seed=0, n_tiles=1, tile_size=32)


def test_a_dataset_without_val_tiles_is_refused(tmp_path: Path) -> None:
    processed = tmp_path / "processed"
    build_shards(SAMPLE_ROOT, processed, "unlabeled_scenes")
    model, config = _small_model()
    with pytest.raises(ValueError, match=r"unlabeled_scenes: no `val` tiles to score"):
        evaluate_model(model, config, processed, "unlabeled_scenes")
