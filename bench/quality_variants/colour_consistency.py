"""Variant: colour in the embedding; consistency and smoothness up, pixel entropy down (softer, smoother maps)."""

from training_core.config import LossConfig, ModelConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(colour_weight=1.0),
        loss=LossConfig(consistency=2.0, pixel_entropy=0.02, marginal_entropy=1.0, smoothness=0.3),
    )
