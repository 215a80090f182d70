"""Numerical contracts that hold on any CPU.

Float32 results differ in the last bits between CPUs and BLAS kernels (OpenBLAS picks its kernels per CPU, and
a kernel may round a row differently depending on the matrix it sits in). So only code that runs the same
operations on the same shapes in one process is compared bit for bit; everything else is compared as below,
and the numerical tests run a second time under another OpenBLAS kernel (``bin/test``) to prove it.
"""

from __future__ import annotations

import numpy as np

# Embeddings of one cell computed through differently shaped matrix products: float32 rounding of sums over
# a few hundred products of O(1) values stays far below this (measured: under 2e-6).
EMBEDDING_ATOL = 1e-5
# A label may flip between two computations only where the best cluster's probability leads the second by
# less than this: rounding moves them by ~1e-6 (the largest gap of a flipped pixel measured: 6e-6), so flips at
# larger gaps are real differences.
LABEL_TIE_MARGIN = 1e-4


def top2_gap(probs: np.ndarray) -> np.ndarray:
    """[H, W]: the best cluster's probability minus the second best's, for probabilities [K, H, W]."""
    top2 = np.partition(probs, -2, axis=0)[-2:]
    return top2[1] - top2[0]


def assert_labels_equal_off_near_ties(
    labels: np.ndarray, expected: np.ndarray, gap: np.ndarray, margin: float = LABEL_TIE_MARGIN
) -> None:
    """``labels`` equal ``expected`` wherever the expected arg-max leads by at least ``margin`` (``gap``: see
    ``top2_gap`` of the probabilities ``expected`` was taken from)."""
    assert labels.shape == expected.shape == gap.shape
    differ = labels != expected
    decided = differ & (gap >= margin)
    assert not decided.any(), (
        f"{int(decided.sum())} of {int(differ.sum())} differing pixels are not near-ties (gap >= {margin}); "
        f"first at {np.argwhere(decided)[:5].tolist()}, gaps {gap[decided][:5].tolist()}"
    )


def other_openblas_kernel() -> str:
    """An OpenBLAS kernel (``OPENBLAS_CORETYPE``) this CPU runs that rounds differently from the one numpy picks
    here: Haswell's where the default is another family (it splits products differently from SkylakeX's, as
    Zen's do), else Sandybridge's (AVX without FMA, any x86-64 CPU from 2011 on)."""
    from threadpoolctl import threadpool_info

    default = next(
        (pool.get("architecture") or "" for pool in threadpool_info() if pool["internal_api"] == "openblas"), ""
    )
    with open("/proc/cpuinfo") as cpuinfo:
        has_avx2 = " avx2" in cpuinfo.read()
    return "Haswell" if has_avx2 and default.lower() not in ("haswell", "zen") else "Sandybridge"


if __name__ == "__main__":
    print(other_openblas_kernel())
