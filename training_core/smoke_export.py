"""Smoke export: train a tiny model for a few seeded steps on synthetic tiles and export it.

::

    python -m training_core.smoke_export --smoke-out DIR --seed 7 --steps 1 --embed-dim 8 --max-k 4 --patch-size 32

writes ``model.npz`` + ``meta.json`` (+ ``metrics.json``) to ``--smoke-out``; the same flags give the
same arrays on every run (CPU training is seeded end to end). To export a real training checkpoint:
``python -m training_core.export --checkpoint CKPT --out DIR`` (``training_core.export.main``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from runtime_export.artifact import PROMOTION_METRIC, check_out_dir
from runtime_export.cli import run_cli
from training_core.config import DataConfig, ModelConfig, TrainConfig
from training_core.export import export_artifact
from training_core.train import train


def smoke_config(seed: int, steps: int, embed_dim: int, max_k: int, patch_size: int) -> TrainConfig:
    """A CPU training config on synthetic tiles, small enough to run in seconds."""
    return TrainConfig(
        model=ModelConfig(embed_dim=embed_dim, max_k=max_k),
        data=DataConfig(source="synthetic", patch_size=patch_size, synthetic_items=8),
        steps=steps,
        seed=seed,
        device="cpu",
        checkpoint_every=steps,
        log_every=steps,
    )


def smoke_export(out_dir: Path, config: TrainConfig) -> Path:
    """Train ``config`` from scratch in a scratch directory and export the final checkpoint to ``out_dir``."""
    check_out_dir(out_dir)  # before the training, which an out_dir the export refuses would waste
    with tempfile.TemporaryDirectory(prefix="runtime-smoke-") as scratch:
        result = train(config, Path(scratch), resume=False)
        if result.checkpoint_path is None:
            raise RuntimeError(f"training wrote no checkpoint in {scratch}")
        lineage = {"dataset_ids": ["synthetic"], "data_versions": {"synthetic": f"seed-{config.seed}"}}
        metrics = {PROMOTION_METRIC: None, "train_final_losses": result.final_losses}
        return export_artifact(result.checkpoint_path, out_dir, lineage, metrics)


PROG = "python -m training_core.smoke_export"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a user error (an ``--smoke-out`` that is not an artifact...) is one line on stderr, exit 2."""
    return run_cli(PROG, _smoke_cli, argv)


def _smoke_cli(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke-out", type=Path, required=True, help="artifact directory to write")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--embed-dim", type=int, default=8)
    parser.add_argument("--max-k", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=32)
    args = parser.parse_args(argv)
    config = smoke_config(args.seed, args.steps, args.embed_dim, args.max_k, args.patch_size)
    out = smoke_export(args.smoke_out, config)
    sys.stdout.write(json.dumps({"artifact": str(out), "files": sorted(p.name for p in out.iterdir())}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
