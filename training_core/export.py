"""Torch -> numpy export: a checkpoint becomes an artifact directory the numpy runtime loads.

The torch side of the artifact: a trained model's arrays (batch norm folded into the convs), the checkpoint's
lineage, the datasets' input rules, and the parity check that gates publishing. What is read of the built
datasets (input rules, training data, parity tiles) is ``training_core.export_datasets``. The format,
``meta.json`` and the atomic writer (written aside, swapped into place, what a killed export left reclaimed)
are ``runtime_export.artifact``, which needs no torch.

CLI (any training checkpoint, e.g. one trained with ``torchrun`` outside Dagster)::

    python -m training_core.export --checkpoint CKPT --out DIR [--processed-root P --dataset-id ID ...]

writes the artifact with the lineage the checkpoint records and the datasets' pixel rules, published only
when the numpy runtime matches torch on their tiles (``training_core.parity``, as the Dagster asset checks).
A user error (a missing or damaged checkpoint, weights holding NaN, an --out that is not an artifact) is one
line on stderr and exit status 2 (``runtime_export.cli``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runtime_export.artifact import (
    PROMOTION_METRIC,
    check_out_dir,
    reclaim_leftovers,
    runtime_meta,
    stage_beside,
    swap_directory,
    write_artifact,
)
from runtime_export.cli import run_cli
from runtime_export.numpy_runtime.runtime import expected_array_shapes
from training_core.checkpoint import load_checkpoint, model_from_checkpoint
from training_core.config import TrainConfig
from training_core.data.sharded import processed_dataset_ids
from training_core.data.synthetic import synthetic_tile
from training_core.export_datasets import PARITY_TILE_SIZE, PARITY_TILES, input_rules_of, parity_tiles, training_data_of
from training_core.model import SegmentationModel, smoothing_kernel
from training_core.parity import runtime_parity

PARITY_KS = (2, 8, 16)
PROG = "python -m training_core.export"


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
    refusing anything else: ``runtime_export.artifact.write_artifact``); returns ``out_dir``.

    ``input_rules`` (``input_rules_of``) are the pixel rules of the datasets the model was trained and
    evaluated on; none (synthetic training) leaves segmentation to the files' own band layout.
    ``training_data`` (``training_data_of``) describes the same datasets: licence, ground resolution, CRSs.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)  # before the arrays and meta.json are made for a folder that would be refused
    arrays = runtime_arrays(model.eval())
    meta = runtime_meta(config, lineage, metrics, input_rules or {}, training_data)
    return write_artifact(out_dir, arrays, meta, metrics)


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
    staging = stage_beside(out_dir)
    try:
        candidate = export_artifact(checkpoint, staging / out_dir.name, lineage, metrics, rules, training_data)
        parity = runtime_parity(candidate, checkpoint, tiles, PARITY_KS)
        if not parity["passed"]:
            raise ValueError(
                f"parity check failed (label agreement {parity['min_label_agreement']:.5f}, max prob diff "
                f"{parity['max_prob_diff']:.2e}, thresholds {parity['thresholds']}): {out_dir} left as it was"
            )
        swap_directory(candidate, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "artifact": str(out_dir),
        "checkpoint_step": int(state["step"]),
        "input_rules": sorted(rules),
        "parity": {key: parity[key] for key in ("passed", "min_label_agreement", "max_prob_diff", "n_tiles")},
    }


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
