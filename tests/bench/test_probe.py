"""bench/probe.py: the cell targets and the linear probe behind its figures."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from training_core.eval.tiles import LabeledTile

_SPEC = importlib.util.spec_from_file_location("bench_probe", Path(__file__).parents[2] / "bench" / "probe.py")
probe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(probe)


def test_cell_targets_take_each_cells_majority_and_its_labeled_share() -> None:
    label = np.zeros((8, 8), np.uint8)  # 0: ignored
    label[:4, :4] = 2  # cell (0, 0): all class 2
    label[:4, 4:] = 1
    label[0, 4:7] = 2  # cell (0, 1): 13 of 16 pixels class 1
    label[4:, :4] = 0  # cell (1, 0): unlabeled
    label[4:6, 4:] = 1  # cell (1, 1): half labeled
    classes, share = probe.cell_targets(label, n_classes=2, ignore_leq=0)
    assert classes[0, 0] == 1 and classes[0, 1] == 0 and classes[1, 1] == 0
    assert share.tolist() == [[1.0, 1.0], [0.0, 0.5]]


def test_a_probe_on_a_separating_channel_scores_one_and_on_noise_about_chance() -> None:
    rng = np.random.default_rng(0)
    label = np.ones((64, 64), np.uint8)
    label[:, 32:] = 2
    class_of_cell = torch.from_numpy(label[::4, ::4].astype(np.int64) - 1)
    # 4 feature channels of noise, then 3 colour channels: the first says the class, with noise.
    features = torch.from_numpy(rng.normal(size=(4, 16, 16)))
    colour = torch.from_numpy(rng.normal(scale=0.1, size=(3, 16, 16)))
    colour[0] += class_of_cell
    embedding = torch.cat([features, colour]).float()
    tile = LabeledTile("t", np.zeros((3, 64, 64), np.uint8), label)
    scores = {}
    for part in ("colour", "features", "both"):
        cells = probe.probe_inputs(embedding, part).flatten(1).T
        linear = probe.fit_probe(cells, class_of_cell.flatten(), n_classes=2)
        scores[part] = probe.score_probe(linear, [embedding], [tile], part, n_classes=2, ignore_leq=0)
    # Bilinear upsampling of the cell logits may move the class boundary by a pixel.
    assert scores["colour"] == pytest.approx(1.0, abs=2e-3)
    assert scores["both"] == pytest.approx(1.0, abs=2e-3)
    assert scores["features"] < 0.75  # noise fitted on the same cells: near chance (1/3 mIoU), never separable


def test_probe_inputs_refuse_an_unknown_part() -> None:
    with pytest.raises(ValueError, match="texture"):
        probe.probe_inputs(torch.zeros(99, 2, 2), "texture")
