"""The numpy runtime reproduces the torch model on real tiles and refuses broken artifacts clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime_export.numpy_runtime.pixels import PixelRule
from runtime_export.numpy_runtime.prototypes import PrototypeSample
from runtime_export.numpy_runtime.runtime import (
    RUNTIME_VERSION,
    ArtifactError,
    check_k_range,
    load_runtime_model,
    select_input_rule,
    upsample_argmax,
)
from training_core.config import ModelConfig, TrainConfig
from training_core.parity import MAX_PROB_DIFF, MIN_LABEL_AGREEMENT, model_parity

from .conftest import calibrated_model


def test_import_pulls_neither_torch_nor_rasterio() -> None:
    code = (
        "import sys, runtime_export.numpy_runtime.runtime; "
        "assert not {'torch', 'rasterio'} & {name.split('.')[0] for name in sys.modules}, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("k", [2, 8, 16])
def test_parity_on_sample_tiles(artifact_dir: Path, model, sample_tiles, k: int) -> None:
    report = model_parity(load_runtime_model(artifact_dir), model, sample_tiles, [k])
    assert report["min_label_agreement"] >= MIN_LABEL_AGREEMENT, report
    assert report["max_prob_diff"] <= MAX_PROB_DIFF, report
    assert report["passed"]


@pytest.mark.parametrize("smoothing", ["fast", "none"])
@pytest.mark.parametrize(
    ("luminance_weight", "chroma_weight"), [(0.0, 0.0), (ModelConfig().luminance_weight, ModelConfig().chroma_weight)]
)
def test_parity_other_lanes(
    tmp_path: Path, sample_tiles, smoothing: str, luminance_weight: float, chroma_weight: float
) -> None:
    from training_core.export import export_model

    config = TrainConfig(
        model=ModelConfig(
            smoothing=smoothing,
            embed_dim=16,
            max_k=8,
            eval_cluster_iters=6,
            luminance_weight=luminance_weight,
            chroma_weight=chroma_weight,
        )
    )
    model = calibrated_model(config, sample_tiles, seed=3)
    artifact = export_model(model, config, tmp_path / "a", {}, {})
    report = model_parity(load_runtime_model(artifact), model, sample_tiles[2:], [2, 8])
    assert report["passed"], report


def test_forward_outputs_match_torch_shapes(artifact_dir: Path, model, sample_tiles) -> None:
    rgb = sample_tiles[3]  # 341 x 280: not a multiple of the stride
    out = load_runtime_model(artifact_dir).forward(rgb, 5)
    with torch.inference_mode():
        ref = model(torch.from_numpy(rgb).float()[None] / 255.0, 5)
    assert out.probs.shape == tuple(ref.probs.shape[1:])
    assert out.low_res_probs.shape == tuple(ref.low_res_probs.shape[1:])
    assert out.embeddings.shape == tuple(ref.embeddings.shape[1:])
    np.testing.assert_allclose(out.prototypes, ref.prototypes[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(out.probs.sum(axis=0), 1.0, atol=1e-5)


def test_predict_labels_is_the_argmax_of_forward(artifact_dir: Path, sample_tiles) -> None:
    runtime = load_runtime_model(artifact_dir)
    rgb = sample_tiles[3]  # odd size: bands of the banded arg-max end mid-way
    labels = runtime.predict_labels(rgb, 4)
    assert labels.dtype == np.uint8 and labels.shape == rgb.shape[1:]
    np.testing.assert_array_equal(labels, runtime.forward(rgb, 4).probs.argmax(axis=0))
    low_res = runtime.forward(rgb, 4).low_res_probs
    np.testing.assert_array_equal(upsample_argmax(low_res, rgb.shape[1:], band_rows=7), labels)


def test_bad_inputs_are_clear_errors(artifact_dir: Path, sample_tiles) -> None:
    runtime = load_runtime_model(artifact_dir)
    with pytest.raises(ValueError, match="uint8"):
        runtime.forward(sample_tiles[2].astype(np.float32), 4)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        runtime.forward(sample_tiles[2][:2], 4)
    for k in (17, 1, 2.0):
        with pytest.raises(ValueError, match=rf"k={k} is outside the model's k_range \[2, 16\]"):
            runtime.forward(sample_tiles[2], k)
        with pytest.raises(ValueError, match=rf"k={k} is outside the model's k_range \[2, 16\]"):
            runtime.predict_labels(sample_tiles[2], k)


def test_one_k_range_rule() -> None:
    """2 to max_k, ints only (numpy's too): the rule the runtime, segment, whole_raster and eval apply."""
    for k in (2, 16, np.int64(5)):
        check_k_range(k, 16)
    for k in (1, 17, 0, -3, 2.0, True, "4", None):
        with pytest.raises(ValueError, match=r"is outside the model's k_range \[2, 16\]") as refused:
            check_k_range(k, 16)
        assert str(refused.value).startswith(f"k={k!r} ")


def test_prototypes_refuse_k_beyond_the_models_range(artifact_dir: Path, sample_tiles) -> None:
    runtime = load_runtime_model(artifact_dir)
    embedding = runtime.embed(sample_tiles[2][:, :64, :64])
    sample = PrototypeSample(step=1)
    sample.add(embedding, slice(None), slice(None), (0, 0), None)
    assert sample.fit(16, 2, runtime.temperature).shape[0] == 16
    for k in (17, 1):
        with pytest.raises(ValueError, match=rf"k={k} is outside the model's k_range \[2, 16\]"):
            sample.fit(k, 2, runtime.temperature)


def _copy(artifact_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact_dir, tmp_path / "copy"))


def _rewrite_meta(artifact: Path, **changes) -> None:
    meta = json.loads((artifact / "meta.json").read_text())
    meta.update(changes)
    (artifact / "meta.json").write_text(json.dumps(meta))


def _rewrite_arrays(artifact: Path, **changes) -> None:
    with np.load(artifact / "model.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays.update(changes)
    for key in [key for key, value in changes.items() if value is None]:
        del arrays[key]
    np.savez(artifact / "model.npz", **arrays)


def test_version_mismatch(artifact_dir: Path, tmp_path: Path) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    _rewrite_meta(artifact, runtime_version="segpipe-numpy-runtime/0")
    with pytest.raises(ArtifactError, match=f"meta.json.*runtime_version.*{RUNTIME_VERSION}"):
        load_runtime_model(artifact)


@pytest.mark.parametrize(
    ("key", "value"), [("chroma_weight", -1.0), ("luminance_weight", "2"), ("chroma_weight", True)]
)
def test_bad_colour_weight(artifact_dir: Path, tmp_path: Path, key: str, value: object) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    _rewrite_meta(artifact, **{key: value})
    with pytest.raises(ArtifactError, match=rf"meta.json: {key} must be a non-negative number, got {value!r}"):
        load_runtime_model(artifact)


def test_missing_meta_key(artifact_dir: Path, tmp_path: Path) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    meta = json.loads((artifact / "meta.json").read_text())
    del meta["temperature"]
    (artifact / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="meta.json.*temperature"):
        load_runtime_model(artifact)


def test_missing_array(artifact_dir: Path, tmp_path: Path) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    _rewrite_arrays(artifact, **{"seed_proj.bias": None})
    with pytest.raises(ArtifactError, match=r"model.npz.*missing keys \['seed_proj.bias'\]"):
        load_runtime_model(artifact)


def test_wrong_shape(artifact_dir: Path, tmp_path: Path) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    _rewrite_arrays(artifact, smooth_kernel=np.ones((5, 5), np.float32))
    with pytest.raises(ArtifactError, match=r"model.npz.*smooth_kernel.*\(5, 5\).*\(3, 3\)"):
        load_runtime_model(artifact)


def test_wrong_dtype(artifact_dir: Path, tmp_path: Path) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    _rewrite_arrays(artifact, input_std=np.ones(3, np.float64))
    with pytest.raises(ArtifactError, match="input_std.*float64"):
        load_runtime_model(artifact)


def test_object_array(artifact_dir: Path, tmp_path: Path) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    _rewrite_arrays(artifact, input_mean=np.array([{"evil": 1}, None, 3], dtype=object))
    with pytest.raises(ArtifactError, match="input_mean.*pickle"):
        load_runtime_model(artifact)


def test_not_an_archive(artifact_dir: Path, tmp_path: Path) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    (artifact / "model.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="model.npz.*npz"):
        load_runtime_model(artifact)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="meta.json.*missing"):
        load_runtime_model(tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_k", "16", "max_k must be an integer >= 2, got '16'"),
        ("max_k", 1, "max_k must be an integer >= 2, got 1"),
        ("max_k", True, "max_k must be an integer >= 2, got True"),
        ("embed_dim", 8.0, "embed_dim must be an integer >= 1, got 8.0"),
        ("temperature", 0, "temperature must be a positive number"),
        ("temperature", True, "temperature must be a positive number, got True"),
        ("input_scale", "0.0039", "input_scale must be a positive number"),
        ("chroma_weight", [1.0], r"chroma_weight must be a non-negative number, got \[1.0\]"),
        ("input_mean", [0.5, 0.5], r"input_mean must be a list of 3 numbers"),
        ("input_std", [0.2, 0.0, 0.2], r"input_std must be positive"),
        ("input_std", {"r": 1}, r"input_std must be a list of 3 numbers"),
        ("stride", "4", "stride '4' is not supported"),
        ("smoothing", ["fast"], "smoothing \\['fast'\\] is not one of"),
        ("supports_learned_refine", 1, "supports_learned_refine must be true or false, got 1"),
        ("lineage", ["a"], "lineage must be an object, got list"),
        ("input_rules", {"a": {"dtype": "uint8", "nodata": "zero"}}, "input_rules.a: not a pixel rule .*nodata"),
    ],
)
def test_bad_meta_values(artifact_dir: Path, tmp_path: Path, key: str, value, message: str) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    _rewrite_meta(artifact, **{key: value})
    with pytest.raises(ArtifactError, match=f"meta.json: {message}"):
        load_runtime_model(artifact)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("temperature", float("nan"), "temperature is NaN, not a finite number"),
        ("chroma_weight", float("inf"), "chroma_weight is Infinity, not a finite number"),
        ("input_mean", [0.5, float("-inf"), 0.5], r"input_mean\[1\] is -Infinity, not a finite number"),
        ("metrics", {"val_miou": float("nan")}, "metrics.val_miou is NaN"),  # not read by the runtime: still refused
    ],
)
def test_non_finite_meta_values_name_the_key(
    artifact_dir: Path, tmp_path: Path, key: str, value: object, message: str
) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    _rewrite_meta(artifact, **{key: value})  # json.dumps writes NaN / Infinity, which json.loads reads by default
    with pytest.raises(ArtifactError, match=f"meta.json: {message}"):
        load_runtime_model(artifact)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("encoder.conv1.weight", np.nan, "array 'encoder.conv1.weight' holds NaN or infinity"),
        ("seed_proj.bias", np.inf, "array 'seed_proj.bias' holds NaN or infinity"),
        ("input_std", 0.0, "array 'input_std' must be positive"),
        ("input_std", -1.0, "array 'input_std' must be positive"),
    ],
)
def test_bad_array_values_name_the_array(
    artifact_dir: Path, tmp_path: Path, key: str, value: float, message: str
) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    with np.load(artifact / "model.npz") as npz:
        array = npz[key].copy()
    array.flat[1] = value
    _rewrite_arrays(artifact, **{key: array})
    with pytest.raises(ArtifactError, match=f"model.npz: {message}"):
        load_runtime_model(artifact)


def test_truncated_archive(artifact_dir: Path, tmp_path: Path) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    data = (artifact / "model.npz").read_bytes()
    for size in (len(data) // 2, len(data) - 30):  # no central directory; a cut end record
        (artifact / "model.npz").write_bytes(data[:size])
        with pytest.raises(ArtifactError, match="model.npz: not a readable npz archive"):
            load_runtime_model(artifact)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="nowhere: no such folder"):
        load_runtime_model(tmp_path / "nowhere")


def test_meta_records_the_input_rules(artifact_dir: Path) -> None:
    meta = load_runtime_model(artifact_dir).meta
    assert meta["runtime_version"] == "segpipe-numpy-runtime/3"
    assert meta["input_rules"] == {"quebec_buildings": {"dtype": "uint8", **PixelRule().to_dict()}}


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([], "input_rules must be an object"),
        ({"a": [1, 2, 3]}, "input_rules.a must be an object"),
        ({"a": PixelRule().to_dict()}, "input_rules.a.dtype must be the input's dtype name"),
        ({"a": {"dtype": "uint8", "bands": [1, 2]}}, r"input_rules.a: not a pixel rule \(bands"),
        ({"a": {"dtype": "uint8", "value_range": 7}}, "input_rules.a: not a pixel rule"),
        ({"a": {"dtype": "uint16", **PixelRule().to_dict()}}, "input_rules.a: not a pixel rule.*value_range"),
    ],
)
def test_bad_input_rules(artifact_dir: Path, tmp_path: Path, rules: object, message: str) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    _rewrite_meta(artifact, input_rules=rules)
    with pytest.raises(ArtifactError, match=f"meta.json: {message}"):
        load_runtime_model(artifact)


def test_meta_without_input_rules_is_refused(artifact_dir: Path, tmp_path: Path) -> None:
    artifact = _copy(artifact_dir, tmp_path)
    meta = json.loads((artifact / "meta.json").read_text())
    del meta["input_rules"]
    (artifact / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"meta.json: missing keys \['input_rules'\]"):
        load_runtime_model(artifact)


NAIP = PixelRule(bands=(1, 2, 3), nodata=0, value_range=(0, 4095))
S2_L1C = PixelRule(bands=(4, 3, 2), value_range=(0, 3000))
S2_L2A = PixelRule(bands=(4, 3, 2), value_range=(1000, 4000))
RULES_META = {
    "input_rules": {
        "quebec": {"dtype": "uint8", **PixelRule().to_dict()},
        "naip_2020": {"dtype": "uint16", **NAIP.to_dict()},
        "naip_2022": {"dtype": "uint16", **NAIP.to_dict()},
        "s2_l1c": {"dtype": "int16", **S2_L1C.to_dict()},
        "s2_l2a": {"dtype": "int16", **S2_L2A.to_dict()},
    }
}


def test_select_input_rule_by_dataset_id() -> None:
    assert select_input_rule(RULES_META, "int16", "s2_l2a") == S2_L2A  # the id wins over the dtype's two rules
    # Another dtype's scaling would read a uint8 file as near black: refused, naming both dtypes.
    with pytest.raises(ValueError, match="dataset 'naip_2020': its input rule is for uint16 data, the raster is uint8"):
        select_input_rule(RULES_META, "uint8", "naip_2020")
    with pytest.raises(
        ArtifactError, match=r"'nope'.*known: \['naip_2020', 'naip_2022', 'quebec', 's2_l1c', 's2_l2a'\]"
    ):
        select_input_rule(RULES_META, "uint16", "nope")


def test_select_input_rule_by_dtype() -> None:
    assert select_input_rule(RULES_META, "uint8") == PixelRule()
    assert select_input_rule(RULES_META, "uint16") == NAIP  # two datasets, one distinct rule
    with pytest.raises(ValueError, match=r"different pixel rules: pass --dataset, one of \['s2_l1c', 's2_l2a'\]"):
        select_input_rule(RULES_META, "int16")


def test_select_input_rule_for_data_the_model_never_saw() -> None:
    assert select_input_rule({"input_rules": {}}, "uint8") is None  # the file's own band layout
    assert select_input_rule({"input_rules": {"n": RULES_META["input_rules"]["naip_2020"]}}, "uint8") is None
    with pytest.raises(ValueError, match=r"no float32 data \(its inputs: int16, uint16, uint8\).*--value-range"):
        select_input_rule(RULES_META, "float32")
    assert select_input_rule(RULES_META, "float32", own_value_range=True) is None
    with pytest.raises(ValueError, match="no uint16 data .*synthetic"):
        select_input_rule({"input_rules": {}}, "uint16")
