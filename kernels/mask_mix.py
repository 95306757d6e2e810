"""FMix mask mixing (Harris et al., "FMix: Enhancing Mixed Sample Data
Augmentation", 2020; anchor: ecs-vlc/FMix).

For every selected sample i with partner j = pair[i] and mask m = mask[i]
of shape (H, W), values in [0, 1], 1 meaning "primary":

    images:  out[i][y, x] = x[i][y, x]                             where m == 1
                            x[j][y, x]                             where m == 0
                            m * x[i][y, x] + (1 - m) * x[j][y, x]  otherwise (float32)
    paste:   out[i][y, x] = x[i][y, x] if m >= 0.5 else x[j][y, x]

Images use the MixUp blend of gpumix.kernels._element, so a hard (0/1) mask takes
every pixel exactly from one of the two inputs and a soft mask blends the
ramp; uint8 rounds ties to even. ``paste=True`` is for dense targets
(segmentation maps): pure selection, any dtype, never blended.

Arrays are the (B, R, L) row views of gpumix.kernels._launch (image row r % height,
pixel k // cstride). Three versions: :func:`reference`, :func:`cpu`,
:func:`cuda`.
"""

from __future__ import annotations

import numpy as np
from numba import cuda as _cuda_api, njit

from gpumix.kernels._element import element_functions
from gpumix.kernels._launch import LazyCudaKernel, as_index_array, float16_via_float32, run_parallel

_cpu = element_functions("cpu")
_mixed_value_cpu = _cpu.mixed_value
# For uint8 and m in [0, 1], blend_uint8 equals mixed_value: m == 1 gives
# round(1 * a + 0 * b) = a and m == 0 gives b exactly, no blend of two values
# in [0, 255] needs the clamp, and where a == b the sum rounds back to a
# (gpumix.kernels._element.blend_uint8). Without the selection branches the
# loop vectorises; the CUDA kernels keep mixed_value (same values).
_blend_byte_cpu = _cpu.blend_byte


def reference(x: np.ndarray, pair, mask: np.ndarray, layout: str, samples=None,
              paste: bool = False) -> np.ndarray:
    """NumPy mask mix of the listed samples of a batch in ``layout``."""
    samples = np.arange(len(x)) if samples is None else np.asarray(samples)
    out = x.copy()
    m = np.asarray(mask, np.float32)[samples]
    m = m[:, None] if layout == "NCHW" else (m[..., None] if layout == "NHWC" else m)
    a = x[samples]
    b = x[np.asarray(pair)[samples]]
    if paste:
        out[samples] = np.where(m >= 0.5, a, b)
        return out
    af = a.astype(np.float32)
    bf = b.astype(np.float32)
    blended = np.where(af == bf, af, m * af + (np.float32(1) - m) * bf).astype(np.float32)
    mixed = np.where(m >= 1, af, np.where(m <= 0, bf, blended))
    if x.dtype == np.uint8:
        mixed = np.rint(np.clip(mixed, 0, 255))
    out[samples] = mixed.astype(x.dtype)
    return out


@njit(inline="always")
def _mask_three_byte_planes(a, b, m, out, first):
    """Three consecutive uint8 planes from ``first`` (RGB of CHW) in one
    pass: each mask value is loaded, and its complement formed, once for
    the three. (Wider values stream nine arrays through memory this way,
    measured slower than a plane at a time: benchmarks/README.md.)"""
    plane = m.shape[0]
    a0, a1, a2 = a[first:first + plane], a[first + plane:first + 2 * plane], \
        a[first + 2 * plane:first + 3 * plane]
    b0, b1, b2 = b[first:first + plane], b[first + plane:first + 2 * plane], \
        b[first + 2 * plane:first + 3 * plane]
    o0, o1, o2 = out[first:first + plane], out[first + plane:first + 2 * plane], \
        out[first + 2 * plane:first + 3 * plane]
    for k in range(plane):
        w = m[k]
        o0[k] = _blend_byte_cpu(a0[k], b0[k], w)
        o1[k] = _blend_byte_cpu(a1[k], b1[k], w)
        o2[k] = _blend_byte_cpu(a2[k], b2[k], w)


@njit(cache=True, nogil=True)
def _mask_planes(a, b, mask, quantize, paste, out):
    """mask_sample_cpu for one channel per column (NCHW planes): each
    H x W plane and the mask are contiguous, so long passes over planes
    (uint8: three at a time where there are three, the mask read once)."""
    a, b, out, m = a.reshape(-1), b.reshape(-1), out.reshape(-1), mask.reshape(-1)
    plane = m.shape[0]
    n_planes = a.shape[0] // plane
    p = 0
    if quantize and not paste:
        while p + 3 <= n_planes:
            _mask_three_byte_planes(a, b, m, out, p * plane)
            p += 3
    for p in range(p, n_planes):
        pa, pb = a[p * plane:(p + 1) * plane], b[p * plane:(p + 1) * plane]
        po = out[p * plane:(p + 1) * plane]
        if paste:  # both values loaded first: a select, which vectorises
            for k in range(plane):
                va, vb = pa[k], pb[k]
                po[k] = va if m[k] >= 0.5 else vb
        elif quantize:
            for k in range(plane):
                po[k] = _blend_byte_cpu(pa[k], pb[k], m[k])
        else:
            for k in range(plane):
                po[k] = _mixed_value_cpu(pa[k], pb[k], m[k], quantize)


@njit(cache=True, nogil=True)
def mask_sample_cpu(a, b, mask, height, cstride, quantize, paste, out, mask_row):
    """One sample's rows (R, L) mixed by its (H, W) ``mask`` into ``out``
    (``mask_row``: float32 scratch of L). The batch kernel and the
    per-sample DALI applier (gpumix/dali_cpu.py) both run it."""
    # Row by row: first the mask row widened to the row's columns (each
    # pixel's value repeated for its cstride channels) in a scratch row, then
    # one contiguous pass over the columns that LLVM vectorises. A pixel loop
    # with an inner channel loop, or k divided by a run-time cstride, does
    # not vectorise.
    # One channel per column (NCHW planes, dense maps): rows are whole
    # planes of ``height`` rows each, so the plane pass serves.
    if cstride == 1:
        _mask_planes(a, b, mask, quantize, paste, out)
        return
    n_cols = a.shape[1]
    for r in range(a.shape[0]):
        y = r % height
        if cstride == 3:  # RGB, unrolled
            for px in range(n_cols // 3):
                m = mask[y, px]
                mask_row[3 * px] = m
                mask_row[3 * px + 1] = m
                mask_row[3 * px + 2] = m
        else:
            for px in range(n_cols // cstride):
                m = mask[y, px]
                for c in range(cstride):
                    mask_row[px * cstride + c] = m
        if paste:
            for k in range(n_cols):
                out[r, k] = a[r, k] if mask_row[k] >= 0.5 else b[r, k]
        elif quantize:  # uint8: the branch-free blend, which gives the same bytes
            for k in range(n_cols):
                out[r, k] = _blend_byte_cpu(a[r, k], b[r, k], mask_row[k])
        else:
            for k in range(n_cols):
                out[r, k] = _mixed_value_cpu(a[r, k], b[r, k], mask_row[k], quantize)


@njit(cache=True, nogil=True)
def _mask_rows_cpu(x, pair, mask, samples, height, cstride, quantize, paste, out, lo, hi):
    mask_row = np.empty(x.shape[2], np.float32)
    for s in range(lo, hi):
        i = samples[s]
        mask_sample_cpu(x[i], x[pair[i]], mask[i], height, cstride, quantize, paste, out[i],
                        mask_row)


def _cpu_any_dtype(x, pair, mask, samples, height, cstride, paste=False, *, out):
    samples = as_index_array(samples)
    run_parallel(_mask_rows_cpu, samples.size, x, pair, mask, samples, height, cstride,
                 x.dtype == np.uint8, paste, out, item_bytes=x[0].nbytes)
    return out


cpu = float16_via_float32(_cpu_any_dtype)
cpu.__doc__ = "Mix the listed samples through their float32 masks (B, H, W), on the CPU."


_gpu = element_functions("cuda")
_mixed_value_gpu = _gpu.mixed_value


def _mask_rows_cuda(x, pair, mask, samples, height, cstride, quantize, paste, out):
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
        for k in range(col_start, n_cols, col_step):
            m = mask[i, y, k // cstride]
            if paste:
                out[i, r, k] = x[i, r, k] if m >= 0.5 else x[j, r, k]
            else:
                out[i, r, k] = _mixed_value_gpu(x[i, r, k], x[j, r, k], m, quantize)


cuda_kernel = LazyCudaKernel(_mask_rows_cuda)


def cuda(x, pair, mask, samples, height: int, cstride: int, paste: bool = False, *,
         out, stream=None):
    """Mask mix on the GPU: device arrays (B, R, L), float32 mask (B, H, W)."""
    cuda_kernel.launch_rows(
        samples.shape[0] * x.shape[1], x.shape[2], stream,
        x, pair, mask, samples, height, cstride, x.dtype == np.uint8, paste, out,
    )
    return out
