"""``torchrun --nproc_per_node=2`` on the CPU (gloo): the ranks train in lockstep and end with identical weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from training_core.checkpoint import LAST_NAME, load_checkpoint
from training_core.config import ModelConfig
from training_core.model import SegmentationModel

REPO = Path(__file__).resolve().parents[2]

# Runs on every rank: train a few steps, then save this rank's final parameters for the test to compare.
RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path

    import torch

    import training_core.train as train_module
    from training_core.config import DataConfig, ModelConfig, TrainConfig

    models = []

    class RecordedModel(train_module.SegmentationModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            models.append(self)

    train_module.SegmentationModel = RecordedModel
    out = Path(sys.argv[1])
    config = TrainConfig(
        model=ModelConfig(embed_dim=8, max_k=4),
        data=DataConfig(source="synthetic", patch_size=32, synthetic_items=8),
        steps=4, batch_size=2, grad_accum=2, device="cpu", checkpoint_every=2, seed=7,
    )
    result = train_module.train(config, out / "ckpt", resume=False)
    rank = int(os.environ["RANK"])
    torch.save({name: p.detach() for name, p in models[0].named_parameters()}, out / f"rank{rank}.pt")
    print("rank", rank, "steps", result.steps)
    """
)


def test_two_cpu_ranks_end_with_identical_weights(tmp_path: Path) -> None:
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*torchrun, str(script), str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=REPO, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # Rank 0 alone wrote the checkpoints, and they hold those same weights.
    checkpoint = load_checkpoint(tmp_path / "ckpt" / LAST_NAME)
    assert checkpoint["step"] == 4
    for name, tensor in rank0.items():
        assert torch.equal(checkpoint["model"][name], tensor), name
    torch.manual_seed(7)
    initial = SegmentationModel(ModelConfig(embed_dim=8, max_k=4)).state_dict()
    assert not torch.equal(initial["encoder.conv1.weight"], rank0["encoder.conv1.weight"]), "training moved the weights"
    log_lines = (tmp_path / "ckpt" / "train_log.jsonl").read_text().splitlines()
    assert len(log_lines) == 4, "only rank 0 logs"
