"""CutMix box paste (Yun et al., "CutMix: Regularization Strategy to Train
Strong Classifiers with Localizable Features", ICCV 2019).

For every selected sample i with partner j = pair[i] and box
``(y0, y1, x0, x1)`` = box[i] (half-open, in pixels):

    out[i][y, x] = x[j][y, x]   if y0 <= y < y1 and x0 <= x < x1
                   x[i][y, x]   otherwise

Pure selection: no arithmetic, so any dtype works (images, and the integer
segmentation maps that must be pasted, never blended) and every backend is
bit-exact. Arrays are the (B, R, L) row views of gpumix.kernels._launch: the image
row of row r is ``r % height``, the pixel of column k is ``k // cstride``, so
the box's columns are ``[x0 * cstride, x1 * cstride)`` in row-view units.

Three versions: :func:`reference` (NumPy, on 4-D/3-D arrays with explicit
layout), :func:`cpu` (Numba, parallel over samples), :func:`cuda`.
"""

from __future__ import annotations

import numpy as np
from numba import cuda as _cuda_api, njit

from gpumix.kernels._element import element_functions
from gpumix.kernels._launch import LazyCudaKernel, as_index_array, copy_bytes, run_parallel

_box_contains_cpu = element_functions("cpu").box_contains


def reference(x: np.ndarray, pair, box, layout: str, samples=None) -> np.ndarray:
    """NumPy CutMix of the listed samples of a batch in ``layout``."""
    samples = range(len(x)) if samples is None else samples
    out = x.copy()
    for i in samples:
        y0, y1, x0, x1 = (int(v) for v in box[i])
        j = int(pair[i])
        if layout == "NCHW":
            out[i, :, y0:y1, x0:x1] = x[j, :, y0:y1, x0:x1]
        else:  # NHWC and NHW: spatial axes first
            out[i, y0:y1, x0:x1] = x[j, y0:y1, x0:x1]
    return out


@njit(cache=True, nogil=True)
def paste_sample_cpu(a, b, y0, y1, x0, x1, height, cstride, out):
    """One sample's C-contiguous rows (R, L): ``out`` is ``a`` with the box
    rows [y0, y1) x pixels [x0, x1) taken from ``b``. The batch kernel and
    the per-sample DALI applier (gpumix/dali_cpu.py) both run it."""
    # Byte copies (LLVM's memcpy): the sample, then the partner's segment of
    # every row the box covers (same predicate as the CUDA kernel). Numba
    # cannot tell LLVM that out and x do not overlap, so plain copy loops
    # would stay scalar.
    n_rows = a.shape[0]
    item = a.itemsize
    row_bytes = a.shape[1] * item
    c0 = x0 * cstride
    c1 = x1 * cstride
    copy_bytes(out.ctypes.data, a.ctypes.data, n_rows * row_bytes)
    if not _box_contains_cpu(y0, c0, y0, y1, c0, c1):
        return  # an empty box
    # The box's rows of every plane (image rows repeat every ``height``
    # rows: channels of CHW, frames of a clip), not a test of every row.
    for plane in range(0, n_rows, height):
        for r in range(plane + max(y0, 0), plane + min(y1, height)):
            offset = r * row_bytes + c0 * item
            copy_bytes(out.ctypes.data + offset, b.ctypes.data + offset, (c1 - c0) * item)


@njit(cache=True, nogil=True)
def _paste_rows_cpu(x, pair, box, samples, height, cstride, out, lo, hi):
    for s in range(lo, hi):
        i = samples[s]
        paste_sample_cpu(x[i], x[pair[i]], box[i, 0], box[i, 1], box[i, 2], box[i, 3], height,
                         cstride, out[i])


def cpu(x, pair, box, samples, height: int, cstride: int, *, out):
    """Paste the listed samples' boxes from their partners, on the CPU."""
    if not (x.flags.c_contiguous and out.flags.c_contiguous and x.dtype == out.dtype):
        raise ValueError("x and out must be C-contiguous row views of one dtype")
    samples = as_index_array(samples)
    # Numba's CPU target has no float16: bytes are bytes, so move them as uint16.
    x_bits, out_bits = (x.view(np.uint16), out.view(np.uint16)) if x.dtype == np.float16 \
        else (x, out)
    run_parallel(_paste_rows_cpu, samples.size, x_bits, pair, box, samples, height, cstride,
                 out_bits, item_bytes=x_bits[0].nbytes)
    return out


_box_contains_gpu = element_functions("cuda").box_contains


def _paste_rows_cuda(x, pair, box, samples, height, cstride, out):
    n_rows = x.shape[1]
    n_cols = x.shape[2]
    total_rows = samples.size * n_rows
    col_start = _cuda_api.blockIdx.x * _cuda_api.blockDim.x + _cuda_api.threadIdx.x
    col_step = _cuda_api.blockDim.x * _cuda_api.gridDim.x
    for row in range(_cuda_api.blockIdx.y, total_rows, _cuda_api.gridDim.y):
        s = row // n_rows
        r = row - s * n_rows
        i = samples[s]
        j = pair[i]
        y = r % height
        y0 = box[i, 0]
        y1 = box[i, 1]
        c0 = box[i, 2] * cstride
        c1 = box[i, 3] * cstride
        for k in range(col_start, n_cols, col_step):
            if _box_contains_gpu(y, k, y0, y1, c0, c1):
                out[i, r, k] = x[j, r, k]
            else:
                out[i, r, k] = x[i, r, k]


cuda_kernel = LazyCudaKernel(_paste_rows_cuda)


def cuda(x, pair, box, samples, height: int, cstride: int, *, out, stream=None):
    """Paste on the GPU: device arrays (B, R, L), int64 pair/samples, int64 box (B, 4)."""
    cuda_kernel.launch_rows(
        samples.shape[0] * x.shape[1], x.shape[2], stream,
        x, pair, box, samples, height, cstride, out,
    )
    return out
