"""Configuration models. The same pydantic models are the Dagster run config."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

STRIDE = 4  # the encoder's output stride: the model and the patch-size checks share it


class StrictModel(BaseModel):
    """Unknown keys are an error that names the key."""

    model_config = ConfigDict(extra="forbid")


class ModelConfig(StrictModel):
    embed_dim: int = Field(96, ge=1)
    max_k: int = Field(16, ge=2)
    temperature: float = Field(0.1, gt=0)
    eval_cluster_iters: int = Field(4, ge=0, description="soft k-means rounds at inference")
    smoothing: Literal["fast", "learned", "none"] = "fast"
    smooth_iters: int = Field(2, ge=0)
    # Colour at inference only since quality sweep 4; in the opponent basis since sweep 6, the chroma
    # weighted above the luminance (docs/MODEL_NOTES.md): on the same 16 checkpoints luminance 2 / chroma 5
    # beat RGB at weight 2 (luminance and chroma 2) on every dataset: kampala +0.025 over k-means on RGB
    # (+0.013), new_brunswick +0.035 (+0.022), quebec +0.033 over the constant predictor (+0.019).
    luminance_weight: float = Field(2.0, ge=0, description="weight of the stride-4 input luminance in the embedding")
    chroma_weight: float = Field(5.0, ge=0, description="weight of the stride-4 input chroma (two opponent channels)")
    colour_in_training: bool = Field(
        False, description="the training losses cluster the colour too (off: only inference appends it)"
    )
    input_mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5], min_length=3, max_length=3)
    input_std: list[float] = Field(default_factory=lambda: [0.25, 0.25, 0.25], min_length=3, max_length=3)


class DataConfig(StrictModel):
    source: Literal["synthetic", "shards", "geo"] = "synthetic"
    processed_root: str | None = Field(None, description="processed shards root (source=shards)")
    dataset_ids: list[str] = Field(default_factory=list, description="datasets to draw from; empty = all")
    split: str = Field("train", description="shard split to train on; labeled splits are never trained on")
    geo_paths: list[str] = Field(default_factory=list, description="GeoTIFFs or folders (source=geo)")
    # 256: the size of a typical labelled aerial tile; 512 patches of such tiles are mostly padding.
    patch_size: int = Field(256, ge=16)
    downsample: list[int] = Field(default_factory=lambda: [1, 2], min_length=1, description="scales per step")
    synthetic_items: int = Field(64, ge=1)
    max_samples: int | None = Field(None, ge=1, description="cap on items per epoch")
    num_workers: int = Field(0, ge=0)
    prefetch_factor: int | None = Field(None, ge=1)
    persistent_workers: bool = False
    pin_memory: bool = False
    cache_mode: Literal["none", "lru"] = "none"
    cache_max_items: int = Field(0, ge=0, description="per-worker LRU size; 0 = unbounded")


class AugmentConfig(StrictModel):
    flip: bool = True
    rot90: bool = True
    noise_std: float = Field(0.02, ge=0)
    colour_jitter: float = Field(0.0, ge=0, lt=1, description="brightness/contrast/saturation factors in 1 +- this")


class LossConfig(StrictModel):
    consistency: float = Field(1.0, ge=0)
    pixel_entropy: float = Field(0.1, ge=0)
    marginal_entropy: float = Field(1.0, ge=0)
    smoothness: float = Field(0.1, ge=0)
    edge_sharpness: float = Field(10.0, ge=0, description="smoothness weight is exp(-this * colour step)")
    # Weight 3 since quality sweep 3 (docs/MODEL_NOTES.md): over 8 seeds it lifted kampala and quebec
    # above their floors; weight 1 and 2 scored lower on both.
    cross_view_mi: float = Field(3.0, ge=0, description="weight of the seed head's cross-view mutual information")


class TrainConfig(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    # The quality defaults (docs/MODEL_NOTES.md): longer runs scored worse on held-out tiles.
    steps: int = Field(400, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    k_min: int = Field(2, ge=2, description="K is drawn per step uniformly from [k_min, model.max_k]")
    cluster_iters: list[int] = Field(
        default_factory=lambda: [2, 6], min_length=2, max_length=2, description="[min, max] soft k-means rounds"
    )
    seed: int = 42
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: bool = Field(False, description="AMP on CPU (always on for CUDA, off for MPS)")
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)

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


def load_config(path: str | Path | None) -> TrainConfig:
    """The training config in ``path``: a Python module exposing ``get_config()`` or ``CONFIG`` (a
    TrainConfig or a dict), or a YAML file of TrainConfig fields. ``None`` gives the defaults."""
    if path is None:
        return TrainConfig()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        raw = yaml.safe_load(path.read_text()) or {}
    elif path.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"_train_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
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
        raise ValueError(f"config file {path}: {error}") from error
