"""Configuration models. The same pydantic models are the Dagster run config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    colour_weight: float = Field(0.0, ge=0, description="weight of the stride-4 input colour in the embedding")
    input_mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5], min_length=3, max_length=3)
    input_std: list[float] = Field(default_factory=lambda: [0.25, 0.25, 0.25], min_length=3, max_length=3)


class DataConfig(StrictModel):
    source: Literal["synthetic", "shards", "geo"] = "synthetic"
    processed_root: str | None = Field(None, description="processed shards root (source=shards)")
    dataset_ids: list[str] = Field(default_factory=list, description="datasets to draw from; empty = all")
    split: str = Field("train", description="shard split to train on; labeled splits are never trained on")
    geo_paths: list[str] = Field(default_factory=list, description="GeoTIFFs or folders (source=geo)")
    patch_size: int = Field(512, ge=16)
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


class TrainConfig(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    steps: int = Field(100, ge=1)
    batch_size: int = Field(2, ge=1)
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
