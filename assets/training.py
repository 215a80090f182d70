"""The ``trained_model`` asset: trains the segmentation model on the processed shards.

Its run config is ``training_core.config.TrainConfig`` itself (schema derived in ``pydantic_config``),
so the launchpad, the CLI config file and ``python -m training_core.train --config`` share one model.
The jobs ``train_cpu`` and ``train_gpu`` materialize this same asset with different devices.
"""

import base64
import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import torch

from assets.datasets import DATASETS, processed_shards
from assets.lineage import content_version, file_sha256, partition_records
from assets.pydantic_config import dagster_config
from assets.resources import ProjectPaths, TrainingDevice, exclusive_lock
from assets.retries import fails_once_on_user_error
from runtime_export.errors import DatasetError
from training_core.checkpoint import load_checkpoint, load_latest_checkpoint, step_checkpoint_name
from training_core.config import TrainConfig
from training_core.shards.index import read_manifest
from training_core.train import LOSS_PARTS, progress_line, train, weight_shaping_config

TRAINING_GROUP = "training"
TrainRunConfig = dagster_config(TrainConfig)
# Pixel entropy is in units of log K, so 1 is a uniform assignment over the clusters.
UNIFORM_PIXEL_ENTROPY = 0.99
UNIFORM_CHECK = "assignments_not_uniform"
# Bump when the same config and data would train other weights (the UI then shows trained_model stale).
CODE_VERSION = "train-v1"


@dg.asset(
    deps=[processed_shards],
    group_name=TRAINING_GROUP,
    kinds={"pytorch"},
    code_version=CODE_VERSION,
    pool="gpu",
    # A retry (like a re-execution from failure) finds the checkpoints of the same config and resumes; a bad
    # config or bad data is not retried (fails_once_on_user_error).
    retry_policy=dg.RetryPolicy(max_retries=2, delay=2),
    description="Unsupervised segmentation model trained on the unlabeled `train` split of the selected datasets. "
    "Data version: the checkpoint's config, the shards' data versions and the step.",
    check_specs=[
        dg.AssetCheckSpec(
            UNIFORM_CHECK,
            asset="trained_model",
            description="At the last step pixels commit to clusters (the losses have not collapsed to uniform).",
        )
    ],
)
@fails_once_on_user_error
def trained_model(
    context: dg.AssetExecutionContext, config: TrainRunConfig, paths: ProjectPaths, training_device: TrainingDevice
) -> dg.MaterializeResult:
    config = training_config(TrainConfig.model_validate(config.model_dump()), context.instance, paths, training_device)
    data_versions = {
        dataset_id: read_manifest(paths.processed_root, dataset_id)["data_version"]
        for dataset_id in config.data.dataset_ids
    }
    key = training_key(config, data_versions)
    checkpoint_dir = paths.checkpoint_dir(context.asset_key.to_python_identifier(), key)
    context.log.info(
        f"training on {config.data.dataset_ids} with device={config.device}, {config.steps} steps, "
        f"checkpoints in {checkpoint_dir}"
    )
    # One run at a time trains a folder; a second run of the same training waits, then finds it done.
    with exclusive_lock(checkpoint_dir):
        resumed_from = checkpoint_step(checkpoint_dir, context.log.warning)
        if resumed_from:
            context.log.info(f"resuming from the checkpoint at step {resumed_from} in {checkpoint_dir}")
        if training_device.torch_threads:
            torch.set_num_threads(training_device.torch_threads)
        # Progress goes to the run log, one line per log_every steps.
        result = train(
            config, checkpoint_dir, resume=True, progress=lambda row: context.log.info(progress_line(row, config.steps))
        )
        if result.interrupted:  # SIGTERM (e.g. the run was terminated): a checkpoint was saved, nothing is done
            raise dg.Failure(f"training stopped at step {result.steps}/{config.steps}; re-execute to resume from it")
        loss_curve = write_loss_curve(Path(result.log_path), checkpoint_dir / "loss_curve.png")
    # The last step's own file: a run that finds the training done resumes from last.pt, a copy of it, so
    # naming the step file makes every run of one training report the same checkpoint.
    checkpoint = checkpoint_dir / step_checkpoint_name(result.steps)
    upstream = partition_records(context.instance, processed_shards.key, config.data.dataset_ids)
    return dg.MaterializeResult(
        metadata={
            "device": result.device,
            "amp": result.amp,
            "steps": result.steps,
            "resumed_from_step": resumed_from,
            "wall_s": round(result.wall_s, 2),
            "images_per_s": round(result.images_per_s, 2),
            "final_losses": {name: round(float(value), 4) for name, value in result.final_losses.items()},
            "loss_curve": dg.MetadataValue.md(png_markdown("loss curve", loss_curve)),
            "loss_curve_path": dg.MetadataValue.path(str(loss_curve)),
            "checkpoint_path": dg.MetadataValue.path(str(checkpoint)),
            "checkpoint_sha256": file_sha256(checkpoint),
            "training_log": dg.MetadataValue.path(str(result.log_path)),
            "training_key": key,
            "datasets": list(config.data.dataset_ids),
            "data_versions": data_versions,
            "upstream": {dataset_id: asdict(record) if record else None for dataset_id, record in upstream.items()},
            "config": config.model_dump(mode="json"),
        },
        data_version=training_data_version(checkpoint, data_versions),
        check_results=[assignments_not_uniform(result.final_losses)],
    )


def assignments_not_uniform(final_losses: dict[str, float]) -> dg.AssetCheckResult:
    """A warning when the last step's assignments are (nearly) uniform over K.

    Uniform assignments are a fixed point of the clustering losses: no gradient reaches the encoder, so
    the exported weights are the initialisation plus optimiser drift, however good a score looks
    (strong photometric augmentation got there within 50 steps).
    """
    entropy = float(final_losses["pixel_entropy"])
    return dg.AssetCheckResult(
        check_name=UNIFORM_CHECK,
        passed=entropy < UNIFORM_PIXEL_ENTROPY,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"last-step pixel entropy {entropy:.3f} (1 = uniform over K; warns at {UNIFORM_PIXEL_ENTROPY})",
        metadata={"pixel_entropy": round(entropy, 4)},
    )


def training_config(
    requested: TrainConfig, instance: dg.DagsterInstance, paths: ProjectPaths, device: TrainingDevice
) -> TrainConfig:
    """The run config made concrete: shards of this deployment, the selected datasets, a real device.

    Datasets default to every registered dataset partition whose shards hold unlabeled `train` items;
    labeled items never reach training (they are for evaluation only).
    """
    dataset_ids = requested.data.dataset_ids or [
        dataset_id
        for dataset_id in sorted(instance.get_dynamic_partitions(DATASETS.name))
        if has_train_items(paths.processed_root, dataset_id, requested.data.split)
    ]
    if not dataset_ids:
        raise ValueError(f"no dataset under {paths.processed_root} has `{requested.data.split}` items to train on")
    raw = requested.model_dump(mode="json")
    raw["device"] = device.resolve(requested.device)
    raw["data"].update(source="shards", processed_root=paths.processed_root, dataset_ids=dataset_ids)
    return TrainConfig.model_validate(raw)


def has_train_items(processed_root: str, dataset_id: str, split: str) -> bool:
    """Whether the dataset's shards are built and hold items of ``split`` (unbuilt datasets are skipped)."""
    try:
        return read_manifest(processed_root, dataset_id)["counts"].get(split, 0) > 0
    except DatasetError:
        return False


def checkpoint_step(checkpoint_dir: Path, warn: Callable[[str], None]) -> int:
    """Optimizer steps already done by the checkpoint ``train`` resumes from (0 when none): the newest intact
    one, as the CLI picks it (``load_latest_checkpoint``), so a damaged ``last.pt`` falls back to the newest
    intact step file instead of failing every retry. Each damaged file skipped goes to ``warn``."""
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always", RuntimeWarning)
        loaded = load_latest_checkpoint(checkpoint_dir)
    for warning in skipped:
        warn(str(warning.message))
    return 0 if loaded is None else int(loaded[1]["step"])


def training_data_version(checkpoint: Path, data_versions: dict[str, str]) -> dg.DataVersion:
    """What the weights are a function of: the checkpoint's config, the shards' data versions, its step."""
    saved = load_checkpoint(checkpoint)
    return content_version({"config": saved["config"], "data_versions": data_versions, "step": saved["step"]})


def training_key(config: TrainConfig, data_versions: dict[str, str]) -> str:
    """Hash of what determines the weights: the config without ``training_core.train.NOT_WEIGHT_SHAPING`` (the
    fields a CLI resume may change too), plus the shards' data versions. The checkpoint folder depends on what
    shapes the weights, not on where or how fast they are computed: a run moved from CPU to GPU, or given
    more loader workers, resumes the same training."""
    shaping = weight_shaping_config(config)
    canonical = json.dumps({"config": shaping, "data_versions": data_versions}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def write_loss_curve(log_path: Path, out_path: Path) -> Path:
    """Plot every logged loss part against the step from the training JSONL log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    names = [name for name in LOSS_PARTS if any(name in row for row in rows)]
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name in names:
        points = [(row["step"], row[name]) for row in rows if name in row]
        axis.plot([step for step, _ in points], [value for _, value in points], label=name)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend(fontsize="small")
    figure.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(out_path)
    return out_path


def png_markdown(title: str, png_path: Path) -> str:
    """Markdown showing a PNG inline in the Dagster UI (data URI), with its path below."""
    encoded = base64.b64encode(png_path.read_bytes()).decode()
    return f"![{title}](data:image/png;base64,{encoded})\n\n`{png_path}`"
