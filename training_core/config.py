"""Configuration models. The same pydantic models are the Dagster run config."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

STRIDE = 4  # the encoder's output stride: the model and the patch-size checks share it


class StrictModel(BaseModel):
    """Unknown keys are an error that names the key."""

    model_config = ConfigDict(extra="forbid")


class ModelConfig(StrictModel):
    """The network: stride-4 CNN encoder, soft k-means head, smoothing and colour at inference."""

    embed_dim: int = Field(96, ge=1, description="channels of the encoder's stride-4 embedding")
    max_k: int = Field(
        16, ge=2, description="most clusters K the seed head offers; training and inference pick K <= this"
    )
    temperature: float = Field(
        0.1, gt=0, description="soft k-means temperature on squared embedding distances (lower: harder assignments)"
    )
    eval_cluster_iters: int = Field(4, ge=0, description="soft k-means rounds (assign + update) at inference")
    smoothing: Literal["fast", "learned", "none"] = Field(
        "fast",
        description="3x3 smoothing of the stride-4 assignments: fast (box filter), learned (trained kernel), none",
    )
    smooth_iters: int = Field(2, ge=0, description="passes of the 3x3 smoothing over the stride-4 assignments")
    # The stride-4 colour is appended at inference only (in training too: ruled out), in the opponent basis
    # with the chroma weighted above the luminance: on the same 16 checkpoints, luminance 2 / chroma 5 beat RGB
    # at weight 2 on every sample dataset (margin over the floor: kampala +0.025 against +0.013, new_brunswick
    # +0.035 against +0.022, quebec +0.033 against +0.019). Evidence: docs/MODEL_NOTES.md.
    luminance_weight: float = Field(2.0, ge=0, description="weight of the stride-4 input luminance in the embedding")
    chroma_weight: float = Field(5.0, ge=0, description="weight of the stride-4 input chroma (two opponent channels)")
    colour_in_training: bool = Field(
        False, description="the training losses cluster the colour too (off: only inference appends it)"
    )
    input_mean: list[float] = Field(
        default_factory=lambda: [0.5, 0.5, 0.5],
        min_length=3,
        max_length=3,
        description="R, G, B means subtracted from the input (pixels scaled to [0, 1])",
    )
    input_std: list[float] = Field(
        default_factory=lambda: [0.25, 0.25, 0.25],
        min_length=3,
        max_length=3,
        description="R, G, B standard deviations the centred input is divided by",
    )


class DataConfig(StrictModel):
    """Where the training patches come from and how they are loaded."""

    source: Literal["synthetic", "shards", "geo"] = Field(
        "synthetic",
        description="synthetic (seeded generated tiles), shards (processed shards) or geo (GeoTIFF patches)",
    )
    processed_root: str | None = Field(None, description="processed shards root (source=shards)")
    dataset_ids: list[str] = Field(default_factory=list, description="datasets to draw from; empty = all")
    split: str = Field("train", description="shard split to train on; labeled splits are never trained on")
    geo_paths: list[str] = Field(default_factory=list, description="GeoTIFFs or folders (source=geo)")
    # 256: the size of a typical labelled aerial tile; 512 patches of such tiles are mostly padding.
    patch_size: int = Field(
        256, ge=16, description="side of a training patch in pixels (a multiple of 4 x each downsample)"
    )
    downsample: list[int] = Field(
        default_factory=lambda: [1, 2],
        min_length=1,
        description="input scale-down factors, one drawn per step (1: full)",
    )
    synthetic_items: int = Field(64, ge=1, description="tiles per epoch of the synthetic source")
    max_samples: int | None = Field(None, ge=1, description="cap on items per epoch (one seeded subset); null = no cap")
    num_workers: int = Field(0, ge=0, description="data loader worker processes; 0 = load in the training process")
    prefetch_factor: int | None = Field(
        None, ge=1, description="batches each worker loads ahead (num_workers > 0); null = torch's default"
    )
    persistent_workers: bool = Field(False, description="keep the worker processes between epochs (num_workers > 0)")
    pin_memory: bool = Field(False, description="page-locked batches, for faster copies to a GPU")
    cache_mode: Literal["none", "lru"] = Field("none", description="decoded-tile cache per worker: none or lru")
    cache_max_items: int = Field(0, ge=0, description="per-worker LRU size in tiles; 0 = unbounded")


class AugmentConfig(StrictModel):
    """What differs at random between the two views of a patch."""

    flip: bool = Field(True, description="a view may be mirrored")
    rot90: bool = Field(True, description="a view may be turned by a multiple of 90 degrees")
    noise_std: float = Field(0.02, ge=0, description="std of the Gaussian noise added to a view (pixels in [0, 1])")
    colour_jitter: float = Field(0.0, ge=0, lt=1, description="brightness/contrast/saturation factors in 1 +- this")


class LossConfig(StrictModel):
    """Weights of the unsupervised loss terms (each a mean over pixels; entropies in units of log K)."""

    consistency: float = Field(1.0, ge=0, description="weight of the symmetric KL between the two views' assignments")
    pixel_entropy: float = Field(0.1, ge=0, description="weight of the per-pixel entropy (minimised: pixels commit)")
    marginal_entropy: float = Field(
        1.0, ge=0, description="weight of the batch's cluster-usage entropy (maximised: every cluster used)"
    )
    smoothness: float = Field(0.1, ge=0, description="weight of the edge-aware smoothness (neighbours agree)")
    edge_sharpness: float = Field(10.0, ge=0, description="smoothness weight is exp(-this * colour step)")
    # Weight 3: over 8 seeds it lifted kampala and quebec above their floors; weights 1 and 2 scored lower
    # on both (docs/MODEL_NOTES.md).
    cross_view_mi: float = Field(3.0, ge=0, description="weight of the seed head's cross-view mutual information")


class TrainConfig(StrictModel):
    """One training run: the model, its data, augmentation, losses and the optimisation."""

    model: ModelConfig = Field(default_factory=ModelConfig, description=ModelConfig.__doc__)
    data: DataConfig = Field(default_factory=DataConfig, description=DataConfig.__doc__)
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description=AugmentConfig.__doc__)
    loss: LossConfig = Field(default_factory=LossConfig, description=LossConfig.__doc__)
    # The quality defaults (docs/MODEL_NOTES.md): longer runs scored worse on held-out tiles.
    steps: int = Field(400, ge=1, description="optimizer steps to train for")
    batch_size: int = Field(4, ge=1, description="patches per micro-batch, per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated into one optimizer step")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    k_min: int = Field(2, ge=2, description="K is drawn per step uniformly from [k_min, model.max_k]")
    cluster_iters: list[int] = Field(
        default_factory=lambda: [2, 6],
        min_length=2,
        max_length=2,
        description="[min, max] soft k-means rounds in training, drawn per step",
    )
    seed: int = Field(42, description="seed of the initial weights, the per-step draws and the views")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="where to train; auto: CUDA, else MPS, else the CPU"
    )
    amp: bool = Field(False, description="AMP on CPU (always on for CUDA, off for MPS)")
    # Off by default: the eager step is the reference (bitwise reproducible on the CPU) and compiling costs
    # minutes before the first step; the GPU recipe (configs/gpu.yaml) and train_gpu turn it on. docs/GPU.md.
    compile: bool = Field(
        False,
        description="torch.compile the training step (encoder, soft k-means rounds, losses): fused kernels, "
        "same values to float round-off",
    )
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (and one at the last step)")
    log_every: int = Field(10, ge=1, description="steps between progress lines (and one at the last step)")
    eval_every: int = Field(
        0, ge=0, description="score the labeled datasets of data.processed_root every this many steps (0: off)"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> TrainConfig:
        if not self.k_min <= self.model.max_k:
            raise ValueError(f"k_min={self.k_min} exceeds model.max_k={self.model.max_k}")
        low, high = self.cluster_iters
        if not 0 <= low <= high:
            raise ValueError(f"cluster_iters={self.cluster_iters} must be [min, max] with 0 <= min <= max")
        for factor in self.data.downsample:
            # The warp grid at stride 4 is exact only when the (downsampled) patch side is a multiple of 4.
            if factor < 1 or self.data.patch_size % (factor * STRIDE):
                raise ValueError(
                    f"data.downsample factor {factor}: data.patch_size={self.data.patch_size} must be divisible "
                    f"by {STRIDE} * factor"
                )
        return self


def validation_message(error: ValidationError, names: Mapping[str, str] | None = None) -> str:
    """pydantic's errors on one line: ``field.path: problem (got value)`` each, ``; ``-separated.

    ``names`` renames a dotted field path (e.g. to the command-line flag that set it)."""
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"])
        problem = item["msg"].removeprefix("Value error, ")  # our own validators' messages name their fields
        if where and not isinstance(item["input"], Mapping):  # a whole section's value would be noise
            problem += f" (got {item['input']!r:.60})"
        where = (names or {}).get(where, where)
        parts.append(f"{where}: {problem}" if where else problem)
    return "; ".join(parts)


def load_config(path: str | Path | None) -> TrainConfig:
    """The training config in ``path``: a Python module exposing ``get_config()`` or ``CONFIG`` (a
    TrainConfig or a dict), or a YAML file of TrainConfig fields. ``None`` gives the defaults."""
    if path is None:
        return TrainConfig()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not a UTF-8 text file ({error.reason} at byte {error.start})") from None
        except yaml.YAMLError as error:  # not a ValueError: a syntax error would otherwise be a traceback
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise ValueError(f"{path}: {where}not valid YAML: {getattr(error, 'problem', None) or error}") from None
    elif path.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"_train_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except SyntaxError as error:  # the .py counterpart of a YAML syntax error
            raise ValueError(f"{path}: line {error.lineno}: Python syntax error: {error.msg}") from None
        if hasattr(module, "get_config"):
            raw = module.get_config()
        elif hasattr(module, "CONFIG"):
            raw = module.CONFIG
        else:
            raise ValueError(f"config module {path} defines neither get_config() nor CONFIG")
    else:
        raise ValueError(f"config file {path}: expected .py, .yaml or .yml, got {path.suffix!r}")
    if isinstance(raw, TrainConfig):
        return raw
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise ValueError(f"{path}: {validation_message(error)}") from None
