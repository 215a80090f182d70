"""Export writes a complete artifact atomically; promotion only moves model/best forward."""

from __future__ import annotations

import copy
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from runtime_export import artifact as artifact_module
from runtime_export.artifact import PROMOTION_METRIC, config_hash, promote_if_better
from runtime_export.errors import DatasetError
from runtime_export.numpy_runtime.runtime import RUNTIME_VERSION, RuntimeModel, load_runtime_model, select_input_rule
from training_core.checkpoint import save_checkpoint
from training_core.datasets.built import built_header
from training_core.datasets.schema import HEADER_FILENAME, dump_header, load_header
from training_core.export import export_artifact, export_model
from training_core.export_datasets import PARITY_TILE_SIZE, PARITY_TILES, input_rules_of, parity_tiles, training_data_of
from training_core.parity import model_parity, runtime_parity
from training_core.shards.write import build_shards

from ..runtime_export.conftest import QUEBEC_RULE


def test_artifact_contents(artifact_dir: Path, learned_config) -> None:
    assert sorted(p.name for p in artifact_dir.iterdir()) == ["meta.json", "metrics.json", "model.npz"]
    with np.load(artifact_dir / "model.npz", allow_pickle=False) as npz:
        assert all(npz[key].dtype == np.float32 for key in npz.files)
    meta = json.loads((artifact_dir / "meta.json").read_text())
    model = learned_config.model
    assert meta["runtime_version"] == RUNTIME_VERSION
    assert (meta["max_k"], meta["embed_dim"], meta["temperature"]) == (model.max_k, model.embed_dim, model.temperature)
    assert (meta["cluster_iters"], meta["smooth_iters"]) == (model.eval_cluster_iters, model.smooth_iters)
    assert meta["smoothing"] == "learned" and meta["supports_learned_refine"] is True
    assert (meta["luminance_weight"], meta["chroma_weight"]) == (0.5, 1.0)
    assert meta["stride"] == 4 and meta["input_scale"] == 1 / 255
    assert meta["input_mean"] == model.input_mean and meta["input_std"] == model.input_std
    assert meta["input_rules"] == {"quebec_buildings": QUEBEC_RULE}
    lineage = meta["lineage"]
    assert lineage["dataset_ids"] == ["quebec_buildings"] and lineage["data_versions"] == {"quebec_buildings": "abc"}
    assert lineage["config_hash"] == config_hash(learned_config) and len(lineage["config_hash"]) == 64
    assert lineage["code_version"]
    assert meta["metrics"] == json.loads((artifact_dir / "metrics.json").read_text()) == {"val_miou": 0.5}


def test_export_artifact_from_checkpoint_and_parity(tmp_path: Path, model, learned_config, sample_tiles) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint = save_checkpoint(
        tmp_path / "ckpt" / "last.pt", model=model, optimizer=optimizer, step=7, config=learned_config
    )
    artifact = export_artifact(checkpoint, tmp_path / "artifact", {"dataset_ids": ["x"]}, {PROMOTION_METRIC: 0.4})
    meta = json.loads((artifact / "meta.json").read_text())
    assert meta["lineage"]["checkpoint_step"] == 7 and meta["lineage"]["dataset_ids"] == ["x"]
    report = runtime_parity(artifact, checkpoint, sample_tiles[2:3], ks=(2, 16, 99))
    assert report["passed"] and sorted(report["per_k"]) == ["16", "2"], report


def test_failed_export_leaves_the_previous_artifact(tmp_path: Path, model, learned_config, monkeypatch) -> None:
    out = export_model(model, learned_config, tmp_path / "artifact", {}, {PROMOTION_METRIC: 0.1})
    before = (out / "model.npz").read_bytes()

    def refuse(path):
        raise RuntimeError("simulated crash after the arrays were written")

    monkeypatch.setattr(artifact_module, "load_runtime_model", refuse)
    with pytest.raises(RuntimeError, match="simulated"):
        export_model(model, learned_config, out, {}, {PROMOTION_METRIC: 0.9})
    assert (out / "model.npz").read_bytes() == before
    assert json.loads((out / "metrics.json").read_text()) == {PROMOTION_METRIC: 0.1}
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # no staging directory left behind


def test_export_replaces_an_existing_artifact(tmp_path: Path, model, learned_config) -> None:
    export_model(model, learned_config, tmp_path / "artifact", {}, {PROMOTION_METRIC: 0.1})
    export_model(model, learned_config, tmp_path / "artifact", {}, {PROMOTION_METRIC: 0.2})
    assert json.loads((tmp_path / "artifact" / "metrics.json").read_text()) == {PROMOTION_METRIC: 0.2}
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_export_replaces_an_empty_folder(tmp_path: Path, model, learned_config) -> None:
    (tmp_path / "artifact").mkdir()
    export_model(model, learned_config, tmp_path / "artifact", {}, {PROMOTION_METRIC: 0.1})
    assert sorted(p.name for p in (tmp_path / "artifact").iterdir()) == ["meta.json", "metrics.json", "model.npz"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


OURS = '{"runtime_version": "segpipe-numpy-runtime/3"}'  # the marker of an artifact's meta.json


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"notes.txt": "mine"}, r"not an artifact folder \(it holds notes.txt\)"),
        ({"meta.json": OURS, "plan.md": "mine"}, "it holds meta.json, plan.md"),  # an artifact plus the user's file
        ({"meta.json": '{"runtime_version": "other/1"}'}, "it holds meta.json"),  # someone else's meta.json
        ({"meta.json": OURS, "model.npz": None}, "it holds meta.json, model.npz"),  # None: a folder
        ({f"ckpt-{i:02}.pt": "weights" for i in range(75)}, "it holds ckpt-00.pt, ckpt-01.pt, ckpt-02.pt and 72 more"),
    ],
)
def test_export_refuses_a_folder_that_is_not_an_artifact(
    tmp_path: Path, model, learned_config, entries: dict[str, str | None], message: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name, text in entries.items():
        if text is None:
            (out / name).mkdir()
        else:
            (out / name).write_text(text)
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=f"output folder {out}: .*{message}"):
        export_model(model, learned_config, out, {}, {PROMOTION_METRIC: 0.1})
    assert _tree(tmp_path) == before  # nothing touched, nothing left


def test_export_refuses_a_file_or_a_link(tmp_path: Path, model, learned_config) -> None:
    (tmp_path / "file").write_text("mine")
    export_model(model, learned_config, tmp_path / "target", {}, {PROMOTION_METRIC: 0.1})
    (tmp_path / "link").symlink_to("target")
    before = _tree(tmp_path)
    for name, message in (("file", "exists and is not a folder"), ("link", "is a symbolic link")):
        with pytest.raises(ValueError, match=f"output folder {tmp_path / name}: {message}"):
            export_model(model, learned_config, tmp_path / name, {}, {PROMOTION_METRIC: 0.2})
    assert _tree(tmp_path) == before


def test_export_refuses_the_current_folder(tmp_path: Path, model, learned_config, monkeypatch) -> None:
    export_model(model, learned_config, tmp_path / "artifact", {}, {PROMOTION_METRIC: 0.1})
    before = _tree(tmp_path)
    for cwd, out in ((tmp_path / "artifact", "."), (tmp_path / "artifact", ".."), (tmp_path, str(tmp_path))):
        monkeypatch.chdir(cwd)
        with pytest.raises(ValueError, match=f"output folder {out}: holds the current folder"):
            export_model(model, learned_config, Path(out), {}, {PROMOTION_METRIC: 0.2})
    assert _tree(tmp_path) == before  # no hidden .old or staging folder either


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process now
    return child.pid


def test_next_export_removes_what_a_killed_one_left(tmp_path: Path, model, learned_config) -> None:
    out = export_model(model, learned_config, tmp_path / "artifact", {}, {PROMOTION_METRIC: 0.1})
    dead, alive = _dead_pid(), os.getpid()
    for leftover in (f".artifact.export-staging-{dead}-x1", f".artifact.export-aside-{dead}-x2"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.npz").write_bytes(b"half")
    running = tmp_path / f".artifact.export-staging-{alive}-x3"  # a live process's: not ours to remove
    running.mkdir()
    export_model(model, learned_config, out, {}, {PROMOTION_METRIC: 0.2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "artifact"]


def test_killed_swap_puts_the_previous_artifact_back(tmp_path: Path, model, learned_config, monkeypatch) -> None:
    """Killed between moving the old artifact aside and moving the new one in: the next export restores it first."""
    first = export_model(model, learned_config, tmp_path / "artifact", {}, {PROMOTION_METRIC: 0.1})
    before = _tree(first)
    os.rename(first, tmp_path / f".artifact.export-aside-{_dead_pid()}-abcd")

    def crash(path):
        raise RuntimeError("simulated crash after the restore")

    monkeypatch.setattr(artifact_module, "load_runtime_model", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        export_model(model, learned_config, first, {}, {PROMOTION_METRIC: 0.2})
    assert _tree(first) == before
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_non_finite_weights_are_refused_naming_the_checkpoint(tmp_path: Path, model, learned_config) -> None:
    diverged = copy.deepcopy(model)
    with torch.no_grad():
        diverged.encoder.conv2.weight[0, 0, 0, 0] = float("nan")
    optimizer = torch.optim.SGD(diverged.parameters(), lr=0.1)
    checkpoint = save_checkpoint(
        tmp_path / "ckpt" / "last.pt", model=diverged, optimizer=optimizer, step=7, config=learned_config
    )
    with pytest.raises(ValueError, match=f"checkpoint {checkpoint}: weight 'encoder.conv2.weight' holds NaN"):
        export_artifact(checkpoint, tmp_path / "artifact", {}, {PROMOTION_METRIC: None})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_parity_fails_on_non_finite_outputs(artifact_dir: Path, model, sample_tiles) -> None:
    """NaN probabilities on both sides arg-max to label 0 everywhere and differ by NaN: that must not pass."""
    runtime = load_runtime_model(artifact_dir)
    assert model_parity(runtime, model, sample_tiles[2:3], (2,))["passed"]
    with np.load(artifact_dir / "model.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["input_std"] = np.full(3, np.nan, np.float32)
    broken_runtime = RuntimeModel(runtime.meta, arrays)  # built directly: the artifact reader would refuse it
    broken_model = copy.deepcopy(model)
    broken_model.input_std.fill_(float("nan"))
    report = model_parity(broken_runtime, broken_model, sample_tiles[2:3], (2,))
    assert report["min_label_agreement"] == 1.0  # all label 0 on both sides
    assert not report["passed"] and report["max_prob_diff"] == math.inf


def _candidate(tmp_path: Path, model, config, name: str, score: float | None) -> Path:
    return export_model(model, config, tmp_path / "runs" / name, {}, {PROMOTION_METRIC: score})


def _best_score(best: Path) -> float | None:
    return json.loads((best / "metrics.json").read_text())[PROMOTION_METRIC]


def test_promotion_only_when_not_worse(tmp_path: Path, model, learned_config) -> None:
    best = tmp_path / "model" / "best"
    assert promote_if_better(_candidate(tmp_path, model, learned_config, "a", 0.5), best)
    assert best.is_symlink() and _best_score(best) == 0.5
    assert not promote_if_better(_candidate(tmp_path, model, learned_config, "b", 0.4), best)
    assert _best_score(best) == 0.5
    assert not promote_if_better(_candidate(tmp_path, model, learned_config, "c", None), best)
    assert promote_if_better(_candidate(tmp_path, model, learned_config, "d", 0.5), best)
    assert promote_if_better(_candidate(tmp_path, model, learned_config, "e", 0.6), best)
    assert _best_score(best) == 0.6
    load_runtime_model(best)
    versions = list((tmp_path / "model" / ".best-versions").iterdir())
    assert versions == [best.resolve()]  # superseded copies are removed
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [".best-versions", "best"]


def test_promotion_without_labels_needs_an_empty_slot(tmp_path: Path, model, learned_config) -> None:
    best = tmp_path / "model" / "best"
    assert promote_if_better(_candidate(tmp_path, model, learned_config, "a", None), best)
    assert promote_if_better(_candidate(tmp_path, model, learned_config, "b", 0.1), best)
    assert _best_score(best) == 0.1


def test_promotion_refuses_a_real_directory(tmp_path: Path, model, learned_config) -> None:
    best = tmp_path / "best"
    best.mkdir()
    with pytest.raises(ValueError, match="symlink"):
        promote_if_better(_candidate(tmp_path, model, learned_config, "a", 0.5), best)


def test_smoke_export_cli_is_reproducible(tmp_path: Path, capsys) -> None:
    from training_core.smoke_export import main

    argv = ["--seed", "7", "--steps", "1", "--embed-dim", "8", "--max-k", "4", "--patch-size", "32"]
    assert main(["--smoke-out", str(tmp_path / "a"), *argv]) == 0
    assert main(["--smoke-out", str(tmp_path / "b"), *argv]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["files"] == ["meta.json", "metrics.json", "model.npz"]
    with np.load(tmp_path / "a" / "model.npz") as a, np.load(tmp_path / "b" / "model.npz") as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert (meta["embed_dim"], meta["max_k"], meta["lineage"]["checkpoint_step"]) == (8, 4, 1)
    assert load_runtime_model(tmp_path / "a").predict_labels(np.zeros((3, 32, 32), np.uint8), 4).shape == (32, 32)


def test_input_rules_of_built_datasets(tmp_path: Path, model, learned_config) -> None:
    images = tmp_path / "extracted" / "naip" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    geo = {"crs": "EPSG:3857", "transform": Affine(1, 0, 500, 0, -1, 900), "width": 32, "height": 32}
    for name in ("a", "b"):
        with rasterio.open(
            images / f"{name}.tif", "w", driver="GTiff", count=4, dtype="uint16", nodata=0, **geo
        ) as dst:
            dst.write(rng.integers(300, 4000, (4, 32, 32), dtype=np.uint16))
    processed = tmp_path / "processed"
    build_shards(tmp_path / "extracted", processed, "naip", workers=1)
    header_path = processed / "naip" / HEADER_FILENAME
    header = load_header(header_path)
    expected = {"naip": {"dtype": "uint16", **header.pixel_rule.to_dict()}}
    assert header.pixel_rule.value_range is not None and header.pixel_rule.nodata == 0
    assert input_rules_of(processed, ["naip"]) == expected
    # A header that does not declare the input dtype (committed by hand): the built tiles tell it.
    undeclared = [modality.model_copy(update={"dtype": None}) for modality in header.modalities]
    dump_header(header.model_copy(update={"modalities": undeclared}), header_path)
    assert input_rules_of(processed, ["naip", "naip"]) == expected
    artifact = export_model(model, learned_config, tmp_path / "artifact", {}, {}, expected)
    assert select_input_rule(load_runtime_model(artifact).meta, "uint16") == header.pixel_rule


def test_parity_tiles_of_a_uint16_four_band_dataset(tmp_path: Path) -> None:
    """The tiles the export CLI and the asset check parity on are model pixels read under the built pixel rule."""
    images = tmp_path / "extracted" / "naip" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    geo = {"crs": "EPSG:3857", "transform": Affine(1, 0, 500, 0, -1, 900), "width": 280, "height": 300}
    raws = {}
    for name in ("a", "b", "c"):
        raws[name] = rng.integers(300, 4000, (4, 300, 280), dtype=np.uint16)
        with rasterio.open(images / f"{name}.tif", "w", driver="GTiff", count=4, dtype="uint16", **geo) as dst:
            dst.write(raws[name])
    processed = tmp_path / "processed"
    build_shards(tmp_path / "extracted", processed, "naip", workers=1)
    rule = built_header(processed, "naip").pixel_rule
    assert rule == load_header(processed / "naip" / HEADER_FILENAME).pixel_rule and rule.value_range is not None

    tiles = parity_tiles(str(processed), ["naip"])
    assert len(tiles) == PARITY_TILES
    expected = [rule.to_uint8(raw[:3, :PARITY_TILE_SIZE, :PARITY_TILE_SIZE]) for raw in raws.values()]
    for tile in tiles:
        assert tile.dtype == np.uint8 and tile.shape == (3, PARITY_TILE_SIZE, PARITY_TILE_SIZE)
        assert any(np.array_equal(tile, candidate) for candidate in expected)
    # No tile to check is a DatasetError (a user error: one line from the CLI, no retry in Dagster); the asset's
    # own copy raised dagster.Failure, which a library cannot.
    with pytest.raises(DatasetError, match="no tile in the shards"):
        parity_tiles(processed, [])


def test_meta_describes_the_training_data(tmp_path: Path, model, learned_config, write_tif) -> None:
    """Licence (from the dataset's LICENSE), ground resolution and CRSs of each dataset, their overall
    resolution range and the K range: extras the runtime loads past."""
    rng = np.random.default_rng(0)
    for dataset_id in ("ten", "plain"):
        for name in ("a", "b"):
            pixels = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
            write_tif(tmp_path / "extracted" / dataset_id / "images" / f"{name}.tif", pixels)
    (tmp_path / "extracted" / "ten" / "LICENSE").write_text("CC-BY 4.0, (c) the makers\n")
    processed = tmp_path / "processed"
    for dataset_id in ("ten", "plain"):
        build_shards(tmp_path / "extracted", processed, dataset_id, workers=1)
    # write_tif's 10 m EPSG:3857 pixels lie at 33.8 N, where a Web Mercator metre is cos(33.8) ground metres.
    ground = round(10 * math.cos(math.radians(33.7852)), 3)
    training_data = training_data_of(processed, ["ten", "plain"])
    assert training_data == {
        "plain": {"licence": None, "ground_resolution_m": [ground, ground], "crs": ["EPSG:3857"]},
        "ten": {"licence": "CC-BY 4.0, (c) the makers", "ground_resolution_m": [ground, ground], "crs": ["EPSG:3857"]},
    }
    rules = input_rules_of(processed, ["ten", "plain"])
    artifact = export_model(model, learned_config, tmp_path / "artifact", {}, {}, rules, training_data)
    meta = load_runtime_model(artifact).meta
    assert meta["training_data"] == training_data and meta["input_rules"] == rules
    assert meta["ground_resolution_m"] == [ground, ground]
    assert meta["k_range"] == [learned_config.k_min, learned_config.model.max_k] == [2, 16]
    # Without datasets (synthetic training) the extras are there, empty.
    bare = json.loads((export_model(model, learned_config, tmp_path / "bare", {}, {}) / "meta.json").read_text())
    assert (bare["training_data"], bare["ground_resolution_m"], bare["k_range"]) == ({}, None, [2, 16])


def test_artifacts_have_ordinary_permissions(tmp_path: Path, model, learned_config, umask_022) -> None:
    def modes(folder: Path) -> list[int]:
        return [stat.S_IMODE(folder.stat().st_mode), *(stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir())]

    candidate = export_model(model, learned_config, tmp_path / "artifact", {}, {PROMOTION_METRIC: 0.1})
    assert modes(candidate) == [0o755, 0o644, 0o644, 0o644]
    export_model(model, learned_config, candidate, {}, {PROMOTION_METRIC: 0.2})  # replacing one
    assert modes(candidate) == [0o755, 0o644, 0o644, 0o644]
    assert promote_if_better(candidate, tmp_path / "best")
    assert modes((tmp_path / "best").resolve()) == [0o755, 0o644, 0o644, 0o644]
    assert stat.S_IMODE((tmp_path / ".best-versions").stat().st_mode) == 0o755
