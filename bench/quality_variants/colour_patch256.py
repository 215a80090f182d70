"""Variant: colour in the embedding, 256-pixel patches (most sample tiles are 256: no mirrored padding)."""

from training_core.config import DataConfig, ModelConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(model=ModelConfig(colour_weight=1.0), data=DataConfig(patch_size=256), batch_size=4)
