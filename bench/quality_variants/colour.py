"""Variant: the stride-4 input colour carried into the clustered embedding (colour_weight 1)."""

from training_core.config import ModelConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(model=ModelConfig(colour_weight=1.0))
