"""Variant: colour weighted 2 (colour dominates the unit-norm CNN features) and 4 smoothing rounds."""

from training_core.config import ModelConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(model=ModelConfig(colour_weight=2.0, smooth_iters=4))
