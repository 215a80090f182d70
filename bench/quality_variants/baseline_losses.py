"""Variant: the shipped defaults before any quality work (no colour in the embedding)."""

from training_core.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig()
