"""numpy's matrix products at full speed inside QGIS on Linux.

QGIS on Debian links GSL's ``libgslcblas`` into its executables, ahead of the BLAS numpy is built against.
The dynamic linker then binds numpy's ``cblas_sgemm`` calls to GSL's reference CBLAS, and every ``a @ b``
in QGIS's Python runs 4x slower (measured on the runtime's encoder). ``install`` detects that and routes the
runtime's products (``runtime.use_matmul``) through OpenBLAS's own ``cblas_sgemm``, called exactly as numpy
calls it (the same layout flags and leading dimensions), so the numbers are those numpy gives outside QGIS.
Where the global ``cblas_sgemm`` is not GSL's, or no OpenBLAS is found, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

import numpy as np

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
FLOAT32 = np.dtype(np.float32)


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def global_sgemm_library() -> str | None:
    """The file of the shared library that defines the process's global ``cblas_sgemm`` (None: none, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    process = ctypes.CDLL(None)
    try:
        address = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p)
    except AttributeError:
        return None
    info = _DlInfo()
    dladdr = process.dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    if not dladdr(address, ctypes.byref(info)) or info.dli_fname is None:
        return None
    return info.dli_fname.decode(errors="replace")


def openblas_sgemm() -> Callable[..., None] | None:
    """OpenBLAS's own ``cblas_sgemm`` (32-bit integers, as Linux distributions build it); None when not found."""
    name = ctypes.util.find_library("openblas")
    if name is None:
        return None
    try:
        sgemm = ctypes.CDLL(name).cblas_sgemm
    except (OSError, AttributeError):
        return None
    integer, real, pointer = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    # order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc
    sgemm.argtypes = [integer] * 6 + [real, pointer, integer, pointer, integer, real, pointer, integer]
    sgemm.restype = None
    return sgemm


def _layout(matrix: np.ndarray) -> tuple[int, int] | None:
    """(transpose flag, leading dimension) numpy passes for a 2-D operand, or None when numpy would not call BLAS."""
    rows, cols = matrix.shape
    row_stride, col_stride = matrix.strides
    item = FLOAT32.itemsize
    if col_stride == item and row_stride % item == 0 and row_stride // item >= max(cols, 1):
        return NO_TRANS, row_stride // item
    if row_stride == item and col_stride % item == 0 and col_stride // item >= max(rows, 1):
        return TRANS, col_stride // item
    return None


def sgemm_matmul(sgemm: Callable[..., None]) -> Callable[..., np.ndarray]:
    """``np.matmul(a, b, out=None)`` that calls ``sgemm`` for float32 matrices where numpy would, else numpy."""

    def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        plain = a.ndim == 2 and b.ndim == 2 and a.dtype == FLOAT32 and b.dtype == FLOAT32
        # numpy calls gemv for a single row or column, and its own loop for empty or odd-strided operands.
        if not plain or min(*a.shape, *b.shape) <= 1 or a.shape[1] != b.shape[0]:
            return np.matmul(a, b, out=out)
        layout_a, layout_b = _layout(a), _layout(b)
        m, n, k = a.shape[0], b.shape[1], a.shape[1]
        if out is None:
            out = np.empty((m, n), FLOAT32)
        elif out.shape != (m, n) or out.dtype != FLOAT32 or not out.flags.c_contiguous:
            return np.matmul(a, b, out=out)
        if layout_a is None or layout_b is None or max(m, n, k) >= 2**31:
            return np.matmul(a, b, out=out)
        (trans_a, lda), (trans_b, ldb) = layout_a, layout_b
        a_data, b_data, out_data = a.ctypes.data, b.ctypes.data, out.ctypes.data
        sgemm(ROW_MAJOR, trans_a, trans_b, m, n, k, 1.0, a_data, lda, b_data, ldb, 0.0, out_data, n)
        return out

    return matmul


def install(use_matmul: Callable[[Callable[..., np.ndarray]], None]) -> str:
    """Swap in OpenBLAS where GSL's CBLAS has taken numpy's place; returns what was done, for the log."""
    library = global_sgemm_library()
    if library is None or "gslcblas" not in library:
        return f"matrix products: numpy's BLAS ({library or 'default'})"
    sgemm = openblas_sgemm()
    if sgemm is None:
        return f"matrix products: {library} (slow reference CBLAS; install OpenBLAS for 4x speed)"
    use_matmul(sgemm_matmul(sgemm))
    return f"matrix products: OpenBLAS called directly (the process binds cblas_sgemm to {library})"
