"""Device and mixed-precision policy.

``--device auto`` picks CUDA, then MPS, then the CPU. AMP is forced on for CUDA (bfloat16 where the
card supports it, else float16 with a GradScaler), forced off for MPS (its autocast kernels are
incomplete), and on the CPU follows ``--amp`` (bfloat16 autocast; no scaler, bf16 has float32's range).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

DeviceName = Literal["auto", "cpu", "cuda", "mps"]


@dataclass(frozen=True)
class DevicePolicy:
    device: torch.device
    amp: bool
    amp_dtype: torch.dtype | None  # None when AMP is off
    grad_scaler: bool  # float16 needs loss scaling; bfloat16 and float32 do not

    @property
    def memory_format(self) -> torch.memory_format:
        """channels_last where its convolutions are faster (oneDNN on the CPU, cuDNN), else contiguous."""
        return torch.channels_last if self.device.type in ("cpu", "cuda") else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of this policy (a no-op when AMP is off)."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def device_policy(
    requested: DeviceName,
    amp: bool,
    *,
    local_rank: int = 0,
    cuda_available: bool | None = None,
    mps_available: bool | None = None,
    cuda_bf16: bool | None = None,
) -> DevicePolicy:
    """Resolve ``requested`` to a device and its AMP settings.

    The ``*_available`` / ``cuda_bf16`` overrides describe the machine (detected when None), so the
    policy table can be tested anywhere. ``local_rank`` picks the GPU of a torchrun worker.
    """
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    has_mps = _mps_available() if mps_available is None else mps_available
    if requested == "auto":
        requested = "cuda" if has_cuda else "mps" if has_mps else "cpu"
    if requested == "cuda":
        if not has_cuda:
            raise RuntimeError("device=cuda requested but torch.cuda.is_available() is False")
        bf16 = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        dtype = torch.bfloat16 if bf16 else torch.float16
        return DevicePolicy(torch.device("cuda", local_rank), True, dtype, grad_scaler=not bf16)
    if requested == "mps":
        if not has_mps:
            raise RuntimeError("device=mps requested but torch.backends.mps.is_available() is False")
        return DevicePolicy(torch.device("mps"), False, None, grad_scaler=False)
    if requested == "cpu":
        return DevicePolicy(torch.device("cpu"), amp, torch.bfloat16 if amp else None, grad_scaler=False)
    raise ValueError(f"device must be one of auto|cpu|cuda|mps, got {requested!r}")
