"""The device / AMP policy (``training_core/device.py``'s docstring) as a table of every case, checked on any
machine through the availability overrides."""

from __future__ import annotations

import pytest
import torch

from training_core.device import device_policy

# requested, --amp, cuda?, mps?, cuda bf16?  ->  device, amp, dtype, grad scaler
POLICY_TABLE = [
    ("cpu", False, False, False, False, "cpu", False, None, False),
    ("cpu", True, False, False, False, "cpu", True, torch.bfloat16, False),
    ("cpu", False, True, True, True, "cpu", False, None, False),
    ("cuda", False, True, False, True, "cuda:0", True, torch.bfloat16, False),
    ("cuda", False, True, False, False, "cuda:0", True, torch.float16, True),
    ("cuda", True, True, False, True, "cuda:0", True, torch.bfloat16, False),
    ("mps", True, False, True, False, "mps", False, None, False),
    ("mps", False, False, True, False, "mps", False, None, False),
    ("auto", False, True, True, True, "cuda:0", True, torch.bfloat16, False),
    ("auto", True, False, True, False, "mps", False, None, False),
    ("auto", True, False, False, False, "cpu", True, torch.bfloat16, False),
    ("auto", False, False, False, False, "cpu", False, None, False),
]


@pytest.mark.parametrize(
    ("requested", "amp_flag", "cuda", "mps", "bf16", "device", "amp", "dtype", "scaler"), POLICY_TABLE
)
def test_policy_table(
    requested: str,
    amp_flag: bool,
    cuda: bool,
    mps: bool,
    bf16: bool,
    device: str,
    amp: bool,
    dtype: torch.dtype | None,
    scaler: bool,
) -> None:
    policy = device_policy(requested, amp_flag, cuda_available=cuda, mps_available=mps, cuda_bf16=bf16)
    assert (str(policy.device), policy.amp, policy.amp_dtype, policy.grad_scaler) == (device, amp, dtype, scaler)


def test_local_rank_picks_the_gpu() -> None:
    policy = device_policy("cuda", False, local_rank=3, cuda_available=True, mps_available=False, cuda_bf16=True)
    assert policy.device == torch.device("cuda", 3)


@pytest.mark.parametrize("requested", ["cuda", "mps"])
def test_unavailable_device_is_a_clear_error(requested: str) -> None:
    with pytest.raises(RuntimeError, match=f"device={requested} requested"):
        device_policy(requested, False, cuda_available=False, mps_available=False)


def test_cpu_autocast_runs_matmul_in_bf16() -> None:
    policy = device_policy("cpu", True, cuda_available=False, mps_available=False)
    with policy.autocast():
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == torch.bfloat16
    with device_policy("cpu", False, cuda_available=False, mps_available=False).autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
