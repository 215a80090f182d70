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
