"""Variant: colour in the embedding, but views with colour jitter so the CNN features must carry texture."""

from training_core.config import AugmentConfig, ModelConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(model=ModelConfig(colour_weight=1.0), augment=AugmentConfig(colour_jitter=0.3))
