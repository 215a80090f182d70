"""Torch -> numpy export: a checkpoint becomes an artifact directory the numpy runtime loads.

Artifact directory: ``model.npz`` (plain float32 arrays, batch norm folded into the convs),
``meta.json`` (runtime version, the model fields, the input pixel rules, what the training data was, lineage)
and ``metrics.json``. Directories are written aside (with ordinary permissions: the plugin and other
users read them) and renamed into place, so a reader never sees half an artifact. ``model/best`` is
a symlink swapped with one ``os.replace``, so promotion is atomic too.

An existing output folder is replaced only when it is an artifact (``is_artifact_dir``) or empty: any other
folder is refused, nothing touched. What is written aside is named after the exporting process
(``.<out>.export-staging-<pid>-...``, ``.<out>.export-aside-<pid>-...``): the next export to the same folder
removes what a killed one left, and puts back a previous artifact it had moved aside.

CLI (any training checkpoint, e.g. one trained with ``torchrun`` outside Dagster)::

    python -m runtime_export.export --checkpoint CKPT --out DIR [--processed-root P --dataset-id ID ...]

writes the artifact with the lineage the checkpoint records and the datasets' pixel rules, published only
when the numpy runtime matches torch on their tiles (``runtime_export.parity``, as the Dagster asset checks).
A user error (a missing or damaged checkpoint, weights holding NaN, an --out that is not an artifact) is one
line on stderr and exit status 2 (``runtime_export.cli``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.windows import Window
from torch import nn

from runtime_export.atomic import make_staging_dir
from runtime_export.cli import run_cli
from runtime_export.errors import DatasetError
from runtime_export.numpy_runtime.runtime import (
    META_FILENAME,
    METRICS_FILENAME,
    MODEL_FILENAME,
    RUNTIME_VERSION,
    STRIDE,
    expected_array_shapes,
    load_runtime_model,
)
from runtime_export.numpy_runtime.whole_raster import dead_leftovers, owned_prefix
from runtime_export.parity import runtime_parity
from runtime_export.rasters import open_raster, read_item
from training_core.checkpoint import load_checkpoint, model_from_checkpoint
from training_core.config import TrainConfig
from training_core.data.sharded import processed_dataset_ids
from training_core.data.synthetic import synthetic_tile
from training_core.datasets.schema import HEADER_FILENAME, load_header
from training_core.model import SegmentationModel, smoothing_kernel
from training_core.shards import iter_split_items
from training_core.splits import SPLITS

PROMOTION_METRIC = "val_miou"  # key of metrics.json compared by promote_if_better
PARITY_KS = (2, 8, 16)
PARITY_TILES = 2
PARITY_TILE_SIZE = 256  # a crop keeps the check to seconds on big tiles
PROG = "python -m runtime_export.export"
ARTIFACT_FILES = frozenset({MODEL_FILENAME, META_FILENAME, METRICS_FILENAME})
RUNTIME_FAMILY = RUNTIME_VERSION.rsplit("/", 1)[0] + "/"  # meta.json's marker, whatever the runtime version


def runtime_arrays(model: SegmentationModel) -> dict[str, np.ndarray]:
    """The arrays of ``model.npz``: eval-mode batch norm folded into each conv's weight and bias."""
    encoder = model.encoder
    pairs = {
        "encoder.conv1": (encoder.conv1, encoder.bn1),
        "encoder.conv2": (encoder.conv2, encoder.bn2),
        "encoder.res1.conv1": (encoder.res1.conv1, encoder.res1.bn1),
        "encoder.res1.conv2": (encoder.res1.conv2, encoder.res1.bn2),
        "encoder.res2.conv1": (encoder.res2.conv1, encoder.res2.bn1),
        "encoder.res2.conv2": (encoder.res2.conv2, encoder.res2.bn2),
    }
    arrays: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, (conv, bn) in pairs.items():
            weight, bias = _fold_batch_norm(conv, bn)
            arrays[f"{name}.weight"] = weight
            arrays[f"{name}.bias"] = bias
        arrays["seed_proj.weight"] = _f32(model.seed_proj.weight[:, :, 0, 0])
        arrays["seed_proj.bias"] = _f32(model.seed_proj.bias)
        arrays["smooth_kernel"] = _f32(smoothing_kernel(model.smooth_logits)[0, 0])
        arrays["input_mean"] = _f32(model.input_mean.flatten())
        arrays["input_std"] = _f32(model.input_std.flatten())
    expected = expected_array_shapes(model.config.embed_dim, model.config.max_k)
    assert {key: a.shape for key, a in arrays.items()} == expected, "export and runtime disagree on the layout"
    return arrays


def _fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    # Folded in float64 so the only float32 rounding is the final cast.
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale[:, None, None, None]
    bias = bn.bias.double() - bn.running_mean.double() * scale
    return _f32(weight), _f32(bias)


def _f32(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy().astype(np.float32))


def runtime_meta(
    config: TrainConfig,
    lineage: dict[str, Any],
    metrics: dict[str, Any],
    input_rules: Mapping[str, Mapping[str, Any]],
    training_data: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """``meta.json``: what the runtime needs to run the arrays, plus what the model was trained for and where it
    came from. ``k_range``, ``ground_resolution_m`` and ``training_data`` (``training_data_of``) are for the user
    (a QGIS plugin can show them); the runtime ignores them, so they need no new runtime version."""
    model = config.model
    training_data = {dataset_id: dict(entry) for dataset_id, entry in sorted((training_data or {}).items())}
    return {
        "runtime_version": RUNTIME_VERSION,
        "max_k": model.max_k,
        "embed_dim": model.embed_dim,
        "temperature": model.temperature,
        "cluster_iters": model.eval_cluster_iters,
        "smooth_iters": model.smooth_iters,
        "smoothing": model.smoothing,
        "luminance_weight": model.luminance_weight,
        "chroma_weight": model.chroma_weight,
        "input_mean": list(model.input_mean),
        "input_std": list(model.input_std),
        "input_scale": 1.0 / 255.0,  # pixel values times this are the model's [0, 1] input
        "stride": STRIDE,
        "supports_learned_refine": model.smoothing == "learned",
        "input_rules": {dataset_id: dict(rule) for dataset_id, rule in sorted(input_rules.items())},
        "k_range": [config.k_min, model.max_k],  # K drawn per training step; the runtime runs 2..max_k
        "ground_resolution_m": _overall_range(entry["ground_resolution_m"] for entry in training_data.values()),
        "training_data": training_data,
        "lineage": {
            **lineage,
            "config_hash": config_hash(config),
            "code_version": code_version(),
        },
        "metrics": metrics,
    }


def _overall_range(ranges: Iterable[Sequence[float] | None]) -> list[float] | None:
    """[min, max] over the known [min, max] ranges; None when none is known."""
    known = [bounds for bounds in ranges if bounds is not None]
    return [min(lo for lo, _ in known), max(hi for _, hi in known)] if known else None


def config_hash(config: TrainConfig) -> str:
    """sha256 of the canonical JSON of the training config."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def code_version() -> str:
    """The git commit of this checkout (``+dirty`` when it has changes), else the package version."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"segpipe {version('segpipe')}"
        except PackageNotFoundError:
            return "unknown"
    return f"{sha}+dirty" if dirty else sha


def input_rules_of(processed_root: str | Path, dataset_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``meta.json``'s ``input_rules`` for built datasets: ``{id: {"dtype": ..., **PixelRule.to_dict()}}``.

    Each rule is the one the shards were built and read with (``<processed_root>/<id>/dataset_header.yaml``);
    a header that does not declare its input dtype takes it from the first built input tile.
    """
    rules: dict[str, dict[str, Any]] = {}
    for dataset_id in sorted(set(dataset_ids)):
        header = load_header(Path(processed_root) / dataset_id / HEADER_FILENAME)
        dtype = header.input.dtype or _built_input_dtype(processed_root, dataset_id)
        rules[dataset_id] = {"dtype": dtype, **header.pixel_rule.to_dict()}
    return rules


def training_data_of(processed_root: str | Path, dataset_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``meta.json``'s ``training_data`` for built datasets: ``{id: {"licence", "ground_resolution_m", "crs"}}``
    from each dataset's header (``<processed_root>/<id>/dataset_header.yaml``); null where the header has none.

    What a user needs to judge whether their imagery is like the training data and how they may use the model;
    the same dataset's bands and scaling are its ``input_rules`` entry.
    """
    data: dict[str, dict[str, Any]] = {}
    for dataset_id in sorted(set(dataset_ids)):
        header = load_header(Path(processed_root) / dataset_id / HEADER_FILENAME)
        resolution = header.input.ground_resolution_m
        data[dataset_id] = {
            "licence": header.licence,
            "ground_resolution_m": None if resolution is None else list(resolution),
            "crs": header.input.crs,
        }
    return data


def _built_input_dtype(processed_root: str | Path, dataset_id: str) -> str:
    for split in SPLITS:
        for shard_dir, entry in iter_split_items(processed_root, dataset_id, split):
            with open_raster(shard_dir / entry.input) as src:
                return src.dtypes[0]
    raise DatasetError(f"{Path(processed_root) / dataset_id}: no built input tile to read the input dtype from")


def export_model(
    model: SegmentationModel,
    config: TrainConfig,
    out_dir: str | Path,
    lineage: dict[str, Any],
    metrics: dict[str, Any],
    input_rules: Mapping[str, Mapping[str, Any]] | None = None,
    training_data: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write the artifact for ``model`` to ``out_dir`` atomically (replacing an artifact or empty folder there,
    refusing anything else: ``check_out_dir``); returns ``out_dir``.

    ``input_rules`` (``input_rules_of``) are the pixel rules of the datasets the model was trained and
    evaluated on; none (synthetic training) leaves segmentation to the files' own band layout.
    ``training_data`` (``training_data_of``) describes the same datasets: licence, ground resolution, CRSs.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    reclaim_leftovers(out_dir)
    arrays = runtime_arrays(model.eval())
    meta = runtime_meta(config, lineage, metrics, input_rules or {}, training_data)
    staging = make_staging_dir(out_dir.parent, prefix=owned_prefix(_staging_prefix(out_dir)))
    try:
        with open(staging / MODEL_FILENAME, "wb") as handle:
            np.savez(handle, **arrays)
        _write_json(staging / META_FILENAME, meta)
        _write_json(staging / METRICS_FILENAME, metrics)
        load_runtime_model(staging)  # never publish an artifact the runtime would reject
        _swap_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def export_artifact(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    lineage: dict[str, Any],
    metrics: dict[str, Any],
    input_rules: Mapping[str, Mapping[str, Any]] | None = None,
    training_data: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Export a training checkpoint; lineage gains the checkpoint's step besides config hash and code version.
    Weights holding NaN or infinity (a diverged training) are refused, naming the checkpoint and the weight."""
    model, config = model_from_checkpoint(checkpoint_path)
    check_finite_weights(model, checkpoint_path)
    step = int(load_checkpoint(checkpoint_path)["step"])
    lineage = {**lineage, "checkpoint_step": step}
    return export_model(model, config, out_dir, lineage, metrics, input_rules, training_data)


def check_finite_weights(model: SegmentationModel, checkpoint_path: str | Path) -> None:
    """A ValueError naming the checkpoint and its first weights that hold NaN or infinity: such a model labels every
    pixel 0, and NaN outputs would compare as agreeing."""
    bad = [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ValueError(
            f"checkpoint {checkpoint_path}: weight {bad[0]!r}{more} holds NaN or infinity (did training diverge?): "
            "nothing exported"
        )


def parity_tiles(processed_root: str | Path, dataset_ids: Iterable[str]) -> list[np.ndarray]:
    """Up to ``PARITY_TILES`` model-pixel tiles (cropped to ``PARITY_TILE_SIZE``) from the datasets' shards,
    read under each dataset's pixel rule as training and segmentation read them."""

    def crop(height: int, width: int) -> Window:
        return Window(0, 0, min(width, PARITY_TILE_SIZE), min(height, PARITY_TILE_SIZE))

    tiles: list[np.ndarray] = []
    for dataset_id in sorted(dataset_ids):
        rule = load_header(Path(processed_root) / dataset_id / HEADER_FILENAME).pixel_rule
        for split in ("val", "metrics_train", "train"):
            for shard_dir, entry in iter_split_items(processed_root, dataset_id, split):
                tiles.append(read_item(shard_dir / entry.input, None, rule, crop).image)
                if len(tiles) == PARITY_TILES:
                    return tiles
    if not tiles:
        raise DatasetError(f"no tile in the shards of {sorted(dataset_ids)} under {processed_root} to test parity on")
    return tiles


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    processed_root: str | Path | None = None,
    dataset_ids: Sequence[str] = (),
) -> dict[str, Any]:
    """Export a training checkpoint made anywhere (the CLI, ``torchrun``) to ``out_dir``; returns a summary.

    Lineage: what the checkpoint records (step, config hash, the shards' data versions). Input rules: of
    ``dataset_ids`` under ``processed_root``, each defaulting to what the checkpoint's config trained on.
    The artifact is staged beside ``out_dir`` and moved there only when the numpy runtime matches torch on
    those datasets' tiles (synthetic tiles without datasets); otherwise ``out_dir`` is left as it was.
    ``out_dir`` is checked (``check_out_dir``) before anything else is done.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    check_out_dir(out_dir, checkpoint)
    reclaim_leftovers(out_dir)
    state = load_checkpoint(checkpoint)
    _, config = model_from_checkpoint(checkpoint)
    versions: dict[str, str] = state.get("data_versions") or {}
    on_shards = config.data.source == "shards"
    trained_on = sorted(versions) or (list(config.data.dataset_ids) if on_shards else [])
    root = processed_root or (config.data.processed_root if on_shards else None)
    if root is None:
        if dataset_ids:
            raise ValueError("--dataset-id needs --processed-root (the checkpoint's config names none)")
    elif not Path(root).is_dir():
        raise ValueError(f"processed root {root} does not exist here: pass --processed-root where the shards are")
    rule_ids = list(dataset_ids) or trained_on or (processed_dataset_ids(root) if root is not None else [])
    rules = input_rules_of(root, rule_ids) if rule_ids else {}
    training_data = training_data_of(root, rule_ids) if rule_ids else {}
    tiles = (
        parity_tiles(root, rule_ids)
        if rules
        else [synthetic_tile(config.seed, i, PARITY_TILE_SIZE)[0] for i in range(PARITY_TILES)]
    )
    lineage = {"checkpoint": str(checkpoint.resolve()), "dataset_ids": trained_on, "data_versions": versions}
    metrics = {PROMOTION_METRIC: None, "train_final_losses": state["losses"]}
    staging = make_staging_dir(out_dir.parent, prefix=owned_prefix(_staging_prefix(out_dir)))
    try:
        candidate = export_artifact(checkpoint, staging / out_dir.name, lineage, metrics, rules, training_data)
        parity = runtime_parity(candidate, checkpoint, tiles, PARITY_KS)
        if not parity["passed"]:
            raise ValueError(
                f"parity check failed (label agreement {parity['min_label_agreement']:.5f}, max prob diff "
                f"{parity['max_prob_diff']:.2e}, thresholds {parity['thresholds']}): {out_dir} left as it was"
            )
        _swap_directory(candidate, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "artifact": str(out_dir),
        "checkpoint_step": int(state["step"]),
        "input_rules": sorted(rules),
        "parity": {key: parity[key] for key in ("passed", "min_label_agreement", "max_prob_diff", "n_tiles")},
    }


def promote_if_better(candidate_dir: str | Path, best_dir: str | Path) -> bool:
    """Point ``best_dir`` (a symlink) at a copy of the candidate when its val mIoU is not worse than the best's.

    A candidate without a val mIoU (no labels) is promoted only when there is no best yet. Returns
    whether it was promoted. The swap is one ``os.replace`` of the symlink: readers see the old or
    the new artifact, never a mix.
    """
    candidate_dir, best_dir = Path(candidate_dir), Path(best_dir)
    load_runtime_model(candidate_dir)  # refuse to promote something the runtime cannot run
    candidate_score = _promotion_score(candidate_dir)
    if best_dir.exists() or best_dir.is_symlink():
        if not best_dir.is_symlink():
            raise ValueError(f"{best_dir}: expected a symlink to the best artifact, found a real directory or file")
        best_score = _promotion_score(best_dir) if best_dir.exists() else None
        if best_score is not None and (candidate_score is None or candidate_score < best_score):
            return False
    previous = best_dir.resolve() if best_dir.is_symlink() else None
    versions = best_dir.parent / f".{best_dir.name}-versions"
    staging = make_staging_dir(versions, prefix=".staging-")
    target = versions / staging.name.removeprefix(".staging-")
    try:
        for name in (MODEL_FILENAME, META_FILENAME, METRICS_FILENAME):
            shutil.copy2(candidate_dir / name, staging / name)
        os.rename(staging, target)
        link = best_dir.parent / f".{best_dir.name}.link-{target.name}"
        os.symlink(os.path.relpath(target, best_dir.parent), link)
        os.replace(link, best_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None and previous != target.resolve() and previous.parent == versions.resolve():
        shutil.rmtree(previous, ignore_errors=True)
    return True


def _promotion_score(artifact_dir: Path) -> float | None:
    path = artifact_dir / METRICS_FILENAME
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the metrics promotion compares ({exc})") from exc
    score = metrics.get(PROMOTION_METRIC)
    if score is not None and not isinstance(score, int | float):
        raise ValueError(f"{path}: {PROMOTION_METRIC} must be a number or null, got {score!r}")
    return None if score is None else float(score)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def is_artifact_dir(path: Path) -> bool:
    """Whether ``path`` is a folder an export wrote: nothing but artifact files (``model.npz``, ``meta.json``,
    ``metrics.json``), and a ``meta.json`` that names this runtime (any version)."""
    try:
        names = set(os.listdir(path))
        meta = json.loads((path / META_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not a folder, no or unreadable meta.json, not JSON
        return False
    runtime = meta.get("runtime_version") if isinstance(meta, dict) else None
    return (
        names <= ARTIFACT_FILES
        and all((path / name).is_file() for name in names)
        and isinstance(runtime, str)
        and runtime.startswith(RUNTIME_FAMILY)
    )


def check_out_dir(out_dir: Path, checkpoint: Path | None = None) -> None:
    """Refuse an output folder whose replacement would lose something: an existing path that is not a folder, a
    symbolic link (its target would stay, the link would go), a folder holding the current folder or the checkpoint,
    or a non-empty folder that is not an artifact (``is_artifact_dir``). A ValueError names the folder."""
    if out_dir.is_symlink():
        raise ValueError(f"output folder {out_dir}: is a symbolic link; pass the folder it points to")
    resolved = out_dir.resolve()
    if Path.cwd().resolve().is_relative_to(resolved):
        raise ValueError(f"output folder {out_dir}: holds the current folder; choose another folder")
    if checkpoint is not None and checkpoint.resolve().is_relative_to(resolved):
        raise ValueError(f"output folder {out_dir}: holds the checkpoint {checkpoint}; choose a folder of its own")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir}: exists and is not a folder; the artifact is a folder")
    entries = sorted(os.listdir(out_dir))
    if entries and not is_artifact_dir(out_dir):
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ValueError(
            f"output folder {out_dir}: not an artifact folder (it holds {shown}); only an artifact or an empty "
            "folder is replaced: choose a new folder"
        )


def _staging_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.export-staging-"


def _aside_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.export-aside-"


def reclaim_leftovers(out_dir: Path) -> None:
    """Undo what a killed export of ``out_dir`` left beside it: the previous artifact it had moved aside goes back
    when ``out_dir`` is missing (else it is removed), its staged candidates are removed. Only what dead processes
    left (``dead_leftovers``): a running export's folders stay."""
    asides = sorted(dead_leftovers(out_dir.parent, _aside_prefix(out_dir)), key=lambda path: path.stat().st_mtime)
    if asides and not out_dir.exists() and not out_dir.is_symlink():
        os.rename(asides.pop(), out_dir)
    for leftover in [*asides, *dead_leftovers(out_dir.parent, _staging_prefix(out_dir))]:
        shutil.rmtree(leftover, ignore_errors=True)


def _swap_directory(staging: Path, out_dir: Path) -> None:
    """Move a finished directory into place; an existing ``out_dir`` is renamed aside first, then removed. It is
    checked again here: the folder may have changed since the export began."""
    check_out_dir(out_dir)
    if out_dir.exists():
        aside = out_dir.parent / f"{owned_prefix(_aside_prefix(out_dir))}{secrets.token_hex(4)}"
        os.rename(out_dir, aside)
        os.rename(staging, out_dir)
        shutil.rmtree(aside, ignore_errors=True)  # what stays (a failure) is a dead run's for the next export
    else:
        os.rename(staging, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: the JSON summary on stdout, exit 0; a user error is one line on stderr, exit 2."""
    return run_cli(PROG, _export_cli, argv)


def _export_cli(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a training checkpoint to a numpy runtime artifact (model.npz + meta.json), parity-checked.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="training checkpoint (e.g. CKPT_DIR/last.pt)")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="artifact directory to write; an existing artifact (or empty folder) is replaced atomically",
    )
    parser.add_argument("--processed-root", type=Path, help="processed shards root (default: the checkpoint's)")
    parser.add_argument(
        "--dataset-id",
        action="append",
        default=[],
        help="dataset whose pixel rule to ship; repeatable (default: the datasets the checkpoint trained on)",
    )
    args = parser.parse_args(argv)
    summary = export_checkpoint(args.checkpoint, args.out, args.processed_root, args.dataset_id)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
