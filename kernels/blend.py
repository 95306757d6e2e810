"""MixUp blend (Zhang et al., "mixup: Beyond Empirical Risk Minimization", 2018).

For every selected sample i with partner j = pair[i]:

    out[i] = lam[i] * x[i] + (1 - lam[i]) * x[j]        in float32

then stored in the image dtype: uint8 is rounded to nearest, ties to even;
float16 is rounded to nearest even from float32. Where x[i] and x[j] are
equal the primary value is returned unchanged, so a sample mixed with
itself, and lam == 1, are exact identities. The uint8 loop needs neither a
clamp nor that equality test (gpumix.kernels._element.blend_uint8): lam in
[0, 1], which MixParams.check enforces, keeps a blend of uint8 values inside
[0, 255], and where x[i] == x[j] the rounding already returns x[i].

Arrays are the (B, R, L) row views of gpumix.kernels._launch (any layout): the blend
is elementwise, so rows and columns need no interpretation here. Samples not
listed in ``samples`` are left untouched in ``out``; ``out`` must not alias
``x`` (partners are read while primaries are written).

Three versions of one computation:
* :func:`reference` - NumPy, the oracle the tests compare against;
* :func:`cpu` - Numba, parallel over samples (gpumix.kernels._launch.run_parallel);
* :data:`cuda_kernel` / :func:`cuda` - Numba CUDA, grid-stride over rows
  (grid.y) and columns (grid.x).
"""

from __future__ import annotations

import numpy as np
from numba import cuda as _cuda_api, njit

from gpumix.kernels._element import element_functions
from gpumix.kernels._launch import LazyCudaKernel, as_index_array, float16_via_float32, run_parallel

_cpu = element_functions("cpu")
_blend_value_cpu = _cpu.blend_value
_blend_byte_cpu = _cpu.blend_byte


def reference(x: np.ndarray, pair: np.ndarray, lam: np.ndarray, samples=None) -> np.ndarray:
    """NumPy MixUp of the listed samples (all by default); others copied from x."""
    samples = np.arange(len(x)) if samples is None else np.asarray(samples)
    out = x.copy()
    a = x[samples].astype(np.float32)
    b = x[np.asarray(pair)[samples]].astype(np.float32)
    w = np.asarray(lam, np.float32)[samples].reshape((-1,) + (1,) * (x.ndim - 1))
    mixed = np.where(a == b, a, w * a + (np.float32(1) - w) * b).astype(np.float32)
    if x.dtype == np.uint8:
        mixed = np.rint(np.clip(mixed, 0, 255))
    out[samples] = mixed.astype(x.dtype)
    return out


@njit(cache=True, nogil=True)
def blend_sample_cpu(a, b, w, quantize, out):
    """One sample's rows (R, L): ``out = w * a + (1 - w) * b`` (``out`` must
    not alias ``b``). The batch kernel and the per-sample DALI applier
    (gpumix/dali_cpu.py) both run it."""
    # One pass over the whole sample (its rows are contiguous): short rows
    # would pay the vector loop's set-up once per row.
    a, b, out = a.reshape(-1), b.reshape(-1), out.reshape(-1)
    if quantize:
        for k in range(a.shape[0]):
            out[k] = _blend_byte_cpu(a[k], b[k], w)
    else:
        for k in range(a.shape[0]):
            out[k] = _blend_value_cpu(a[k], b[k], w)


@njit(cache=True, nogil=True)
def _blend_rows_cpu(x, pair, lam, samples, quantize, out, lo, hi):
    for s in range(lo, hi):
        i = samples[s]
        blend_sample_cpu(x[i], x[pair[i]], lam[i], quantize, out[i])


@float16_via_float32
def cpu(x, pair, lam, samples, *, out):
    """Blend the listed samples of the (B, R, L) array ``x`` into ``out`` on the CPU."""
    samples = as_index_array(samples)
    run_parallel(_blend_rows_cpu, samples.size, x, pair, lam, samples, x.dtype == np.uint8, out,
                 item_bytes=x[0].nbytes)
    return out


_gpu = element_functions("cuda")
_blend_value_gpu = _gpu.blend_value
_blend_uint8_gpu = _gpu.blend_uint8


def _blend_rows_cuda(x, pair, lam, samples, quantize, out):
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
        w = lam[i]
        for k in range(col_start, n_cols, col_step):
            if quantize:
                out[i, r, k] = _blend_uint8_gpu(x[i, r, k], x[j, r, k], w)
            else:
                out[i, r, k] = _blend_value_gpu(x[i, r, k], x[j, r, k], w)


cuda_kernel = LazyCudaKernel(_blend_rows_cuda)


def cuda(x, pair, lam, samples, *, out, stream=None):
    """Blend on the GPU: device arrays (B, R, L), int64 pair/samples, float32 lam."""
    cuda_kernel.launch_rows(
        samples.shape[0] * x.shape[1], x.shape[2], stream,
        x, pair, lam, samples, x.dtype == np.uint8, out,
    )
    return out
