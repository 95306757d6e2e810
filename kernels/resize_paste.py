"""ResizeMix paste (Qin et al., "ResizeMix: Mixing Data with Preserved
Object Information and True Labels", 2020).

For every selected sample i with partner j = pair[i] and box
``(y0, y1, x0, x1)`` = box[i] (half-open, inside the image):

    out[i][y, x] = resize(x[j], (y1 - y0, x1 - x0))[y - y0, x - x0]   in the box
                   x[i][y, x]                                         elsewhere

The whole partner image shrunk into the box, with torch's
``interpolate`` index rules (gpumix.kernels._element.source_span):
"nearest" copies source pixels (exact for every dtype), "bilinear" blends
four in float32 (uint8 rounded ties-to-even). A thread of an output pixel
reads partner pixels elsewhere, so ``out`` must not alias ``x``.

Arrays are the (B, R, L) row views of gpumix.kernels._launch; the source
row of row r is ``r - r % height + sy`` (the same channel plane) and the
source column of column k is ``sx * cstride + k % cstride``.

Three versions: :func:`reference` (NumPy), :func:`cpu` (Numba, parallel
over samples; :func:`resize_sample_cpu` is also the per-sample body of the
DALI appliers), :func:`cuda`. The CPU version picks a downscale's source
values with masked compress-stores where the CPU has them (AVX-512 VBMI2)
and gathers them elsewhere.
"""

from __future__ import annotations

import numpy as np
from numba import cuda as _cuda_api, float32, int64, njit

from gpumix.kernels import _compress
from gpumix.kernels._compress import (byte_positions, compress_row, new_plans, plan_row,
                                      strictly_increasing)
from gpumix.kernels._element import element_functions
from gpumix.kernels._launch import (LazyCudaKernel, as_index_array, copy_bytes,
                                    float16_via_float32, prefetch_bytes, run_parallel)


def _source_indices(n_in: int, n_out: int, bilinear: bool):
    """NumPy: (i0, i1, weight of i1) for every output index, float32 as torch."""
    o = np.arange(n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    if not bilinear:
        if n_out == n_in:
            i = o
        elif n_out == 2 * n_in:
            i = o // 2
        else:
            i = np.minimum(np.floor(o.astype(np.float32) * scale).astype(np.int64), n_in - 1)
        return i, i, np.zeros(n_out, np.float32)
    source = np.maximum(scale * (o.astype(np.float32) + np.float32(0.5)) - np.float32(0.5),
                        np.float32(0))
    i0 = source.astype(np.int64)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, np.clip(source - i0.astype(np.float32), 0, 1).astype(np.float32)


def reference(x: np.ndarray, pair, box, layout: str, bilinear: bool, samples=None):
    """NumPy ResizeMix of the listed samples of a batch in ``layout``
    (NCHW, NHWC or NHW)."""
    samples = range(len(x)) if samples is None else samples
    out = x.copy()
    spatial = (2, 3) if layout == "NCHW" else (1, 2)
    h, w = x.shape[spatial[0]], x.shape[spatial[1]]
    for i in samples:
        y0, y1, x0, x1 = (int(v) for v in box[i])
        if y1 <= y0 or x1 <= x0:
            continue
        src = np.moveaxis(x[int(pair[i])], (spatial[0] - 1, spatial[1] - 1), (0, 1))
        yi0, yi1, wy = _source_indices(h, y1 - y0, bilinear)
        xi0, xi1, wx = _source_indices(w, x1 - x0, bilinear)
        if bilinear:
            wy = wy.reshape((-1, 1) + (1,) * (src.ndim - 2))
            wx = wx.reshape((1, -1) + (1,) * (src.ndim - 2))
            f = src.astype(np.float32)
            one = np.float32(1)
            rows = (one - wy) * f[yi0] + wy * f[yi1]  # down the columns, then across
            patch = (one - wx) * rows[:, xi0] + wx * rows[:, xi1]
            if x.dtype == np.uint8:
                patch = np.rint(np.clip(patch, 0, 255))
            patch = patch.astype(x.dtype)
        else:
            patch = src[yi0][:, xi0]
        patch = np.moveaxis(patch, (0, 1), (spatial[0] - 1, spatial[1] - 1))
        if layout == "NCHW":
            out[i, :, y0:y1, x0:x1] = patch
        else:
            out[i, y0:y1, x0:x1] = patch
    return out


_cpu = element_functions("cpu")
_source_span_cpu = _cpu.source_span
_lerp_cpu = _cpu.lerp
_quantize_cpu = _cpu.quantize_uint8
_rounded_byte_cpu = _cpu.rounded_byte


PREFETCH_ROWS = 4  # box rows ahead whose source rows a box row asks the cache for


@njit(inline="always")
def _pair_with_neighbours(values, pairs, step):
    """pairs[2k], pairs[2k + 1] = values[k], values[k + step]; the last
    ``step`` values (the last pixel's) pair with themselves."""
    n = values.shape[0]
    for k in range(n - step):
        pairs[2 * k] = values[k]
        pairs[2 * k + 1] = values[k + step]
    for k in range(n - step, n):
        pairs[2 * k] = values[k]
        pairs[2 * k + 1] = values[k]


@njit(inline="always")
def _pack_planes(b, first, height, lanes, packed):
    """packed[x] = pixel x of rows ``first + j * height`` (the same pixel of
    ``lanes`` <= 4 planes), lane j in byte j. Shifts stay uint32: an int64
    shift would widen the vector loop."""
    row = b[first]
    for x in range(packed.shape[0]):
        packed[x] = np.uint32(row[x])
    for j in range(1, lanes):
        row, shift = b[first + j * height], np.uint32(8 * j)
        for x in range(packed.shape[0]):
            packed[x] |= np.uint32(row[x]) << shift


@njit(inline="always")
def _unpack_planes(got, out, first, height, lanes, x0):
    """The inverse of :func:`_pack_planes` into columns [x0, x0 + len(got))."""
    for j in range(lanes):
        target, shift = out[first + j * height, x0:x0 + got.shape[0]], np.uint32(8 * j)
        for x in range(got.shape[0]):
            target[x] = np.uint8((got[x] >> shift) & np.uint32(0xFF))


@njit(cache=True, nogil=True)
def _nearest_planes_of_bytes(b, out, sx, y0, y1, x0, height):
    """Nearest ResizeMix of byte planes (one value per column, two or more
    planes: channels of CHW, frames), the box of ``out`` filled from ``b``
    (R, L); ``sx``: the source column of each box column. A scalar gather
    moves one value per load, so the same pixel of up to four planes is
    packed into a uint32 first (a vectorised pass), gathered once, and
    unpacked (RGB's three lanes as a constant). Interleaved channels keep
    one byte gather per channel: packing them is strided, and measured
    slower (benchmarks/README.md)."""
    n_planes = b.shape[0] // height
    box_h, box_w = y1 - y0, sx.shape[0]
    packed = np.empty(b.shape[1], np.uint32)
    got = np.empty(box_w, np.uint32)
    for y in range(y0, y1):
        sy, _, _ = _source_span_cpu(y - y0, height, box_h, False)
        for plane in range(0, n_planes, 4):
            first, lanes = plane * height, min(4, n_planes - plane)
            if lanes == 3:
                _pack_planes(b, first + sy, height, 3, packed)
            else:
                _pack_planes(b, first + sy, height, lanes, packed)
            for x in range(box_w):
                got[x] = packed[sx[x]]
            if lanes == 3:
                _unpack_planes(got, out, first + y, height, 3, x0)
            else:
                _unpack_planes(got, out, first + y, height, lanes, x0)


@njit(inline="always")
def _box_row_sources(height, box_h, bilinear):
    """The top and bottom source rows (2, box_h) of every box row, and the
    bottom row's weights, found once per sample for every plane: per row,
    the divisions cost more than the row's stores."""
    rows = np.empty((2, box_h), np.int64)
    weights = np.empty(box_h, np.float32)
    for y in range(box_h):
        rows[0, y], rows[1, y], weights[y] = _source_span_cpu(y, height, box_h, bilinear)
    return rows, weights


@njit(cache=True, nogil=True)
def _resize_by_compress(b, out, y0, y1, x0, x1, height, cstride, bilinear, quantize):
    """The box of ``out`` filled from ``b`` by masked compress-stores
    (gpumix.kernels._compress), where a gather would load one value at a
    time. A downscale reads a strictly increasing subset of each source
    row, the same for every row: nearest, one column per output; bilinear,
    the left taps, and the right taps of every output but those clamped at
    the last pixel, which take their left tap. So one plan per sample picks
    a row's values in a few stores. Bilinear then blends the four picked
    taps down and across in the CUDA kernel's order (uint8: the blend of
    values in [0, 255] lies in [0, 255.5), so rounding needs no clamp).

    Nearest has a loop of its own with nothing in it but each row's
    stores (sharing bilinear's loop measured slower). Wider values prefetch
    the source rows PREFETCH_ROWS ahead (a float32 batch outgrows the
    last-level cache; for uint8 the prefetches measured slower). Returns
    False, doing nothing, when the columns do not increase (an upscale)."""
    n_cols = b.shape[1]
    width = n_cols // cstride
    box_h, box_w = y1 - y0, x1 - x0
    n_out = box_w * cstride
    left = np.empty(n_out, np.int64)  # source column of each output column
    right = np.empty(n_out, np.int64)  # its right-hand tap's, where not clamped
    wx = np.empty(n_out, np.float32)  # the right-hand tap's weight
    n_right = 0
    for x in range(box_w):
        sx0, sx1, w = _source_span_cpu(x, width, box_w, bilinear)
        for c in range(cstride):
            left[x * cstride + c] = sx0 * cstride + c
            wx[x * cstride + c] = w
            if sx1 != sx0:
                right[n_right] = sx1 * cstride + c
                n_right += 1
    if not strictly_increasing(left):
        return False
    row_bytes = np.int64(n_cols * b.itemsize)
    plans = new_plans(2, row_bytes)  # 0: left taps (nearest: the pixels), 1: right taps
    plan_row(byte_positions(left, b.itemsize), row_bytes, plans, 0)
    if bilinear:
        plan_row(byte_positions(right[:n_right], b.itemsize), row_bytes, plans, 1)
    rows, wy = _box_row_sources(height, box_h, bilinear)
    taps = np.empty((4, n_out if bilinear else 0), b.dtype)  # top/bottom x left/right
    top_left, bottom_left, top_right, bottom_right = taps[0], taps[1], taps[2], taps[3]
    at_taps = np.int64(taps.ctypes.data)
    tap_bytes = np.int64(n_out * b.itemsize)
    source, target = np.int64(b.ctypes.data), np.int64(out.ctypes.data)
    first = (y0 * n_cols + x0 * cstride) * b.itemsize  # the box's first value in its plane
    prefetch = b.itemsize > 1
    if not bilinear:
        for plane in range(0, b.shape[0], height):
            at_plane, box_top = source + plane * row_bytes, target + plane * row_bytes + first
            for y in range(box_h):
                if prefetch:
                    ahead = min(y + PREFETCH_ROWS, box_h - 1)
                    prefetch_bytes(at_plane + rows[0, ahead] * row_bytes, row_bytes)
                compress_row(box_top + y * row_bytes, at_plane + rows[0, y] * row_bytes, plans, 0)
        return True
    for plane in range(0, b.shape[0], height):
        at_plane = source + plane * row_bytes
        for y in range(box_h):
            top, bottom = at_plane + rows[0, y] * row_bytes, at_plane + rows[1, y] * row_bytes
            if prefetch:
                ahead = min(y + PREFETCH_ROWS, box_h - 1)
                prefetch_bytes(at_plane + rows[0, ahead] * row_bytes, row_bytes)
                prefetch_bytes(at_plane + rows[1, ahead] * row_bytes, row_bytes)
            compress_row(at_taps, top, plans, 0)
            compress_row(at_taps + tap_bytes, bottom, plans, 0)
            compress_row(at_taps + 2 * tap_bytes, top, plans, 1)
            compress_row(at_taps + 3 * tap_bytes, bottom, plans, 1)
            for k in range(n_right, n_out):  # clamped at the last pixel
                top_right[k] = top_left[k]
                bottom_right[k] = bottom_left[k]
            box_row, w = out[plane + y0 + y, x0 * cstride:x0 * cstride + n_out], wy[y]
            for k in range(n_out):
                v = _lerp_cpu(_lerp_cpu(top_left[k], bottom_left[k], w),
                              _lerp_cpu(top_right[k], bottom_right[k], w), wx[k])
                box_row[k] = _rounded_byte_cpu(v) if quantize else v
    return True


@njit(cache=True, nogil=True)
def resize_sample_cpu(a, b, y0, y1, x0, x1, height, cstride, bilinear, quantize, out,
                      compress=_compress.NATIVE):
    """One sample's C-contiguous rows (R, L): ``out`` is ``a`` with partner
    ``b`` resized into the box (``out`` must not alias ``b``). The source
    columns and weights of the box's columns are found once per sample with
    the same scalar function the CUDA kernel uses, so values are equal.

    Where the CPU compresses natively (``compress``, default
    gpumix.kernels._compress.NATIVE), a downscale picks each box row's
    values with masked compress-stores (:func:`_resize_by_compress`).
    Otherwise the box's rows are visited plane by plane (channels of CHW,
    frames), each prefetching the source rows of the box row PREFETCH_ROWS
    ahead: a downscale reads rows scattered through the partner, which the
    hardware prefetcher does not foresee. Nearest gathers each output value
    from its source row (byte planes: four to a gather,
    :func:`_nearest_planes_of_bytes`). Bilinear blends an output row's two
    source rows whole (a vectorised pass), pairs every blended value with
    its right-hand neighbour's (the next pixel's, the last pixel's with
    itself, as the source index rule clamps), gathers one pair per output
    value, then blends each pair across (vectorised): the products and
    sums of the CUDA kernel's bilerp, in its order, with one gather per
    value, not two. Both routes give the same values."""
    n_rows, n_cols = a.shape[0], a.shape[1]
    width = n_cols // cstride
    row_bytes = n_cols * b.itemsize
    copy_bytes(out.ctypes.data, a.ctypes.data, n_rows * row_bytes)
    box_h, box_w = y1 - y0, x1 - x0
    if box_h <= 0 or box_w <= 0:
        return
    if compress and row_bytes >= _compress.CHUNK_BYTES and \
            _resize_by_compress(b, out, y0, y1, x0, x1, height, cstride, bilinear, quantize):
        return
    if b.itemsize == 1 and not bilinear and cstride == 1 and n_rows >= 2 * height:
        sx = np.empty(box_w, np.int32)
        for x in range(box_w):
            sx[x] = _source_span_cpu(x, width, box_w, False)[0]
        _nearest_planes_of_bytes(b, out, sx, y0, y1, x0, height)
        return
    n_out = box_w * cstride
    k0 = np.empty(n_out, np.int32)  # source column of each output column
    wx = np.empty(n_out, np.float32)  # weight of its right-hand neighbour
    for x in range(box_w):
        sx0, _, w = _source_span_cpu(x, width, box_w, bilinear)
        for c in range(cstride):
            k0[x * cstride + c] = sx0 * cstride + c
            wx[x * cstride + c] = w
    scratch = n_cols if bilinear else 0
    blended = np.empty(scratch, np.float32)  # one row, down the columns
    pairs = np.empty(scratch, np.complex64)  # (blended[k], its neighbour's)
    gathered = np.empty(n_out if bilinear else 0, np.complex64)  # the pair of each output
    pair_values, gathered_values = pairs.view(np.float32), gathered.view(np.float32)
    first = x0 * cstride
    rows, wys = _box_row_sources(height, box_h, bilinear)
    for plane in range(0, n_rows, height):
        for y in range(box_h):
            ahead = min(y + PREFETCH_ROWS, box_h - 1)
            prefetch_bytes(b[plane + rows[0, ahead]].ctypes.data, row_bytes)
            if bilinear:
                prefetch_bytes(b[plane + rows[1, ahead]].ctypes.data, row_bytes)
            top, target = b[plane + rows[0, y]], out[plane + y0 + y, first:first + n_out]
            if bilinear:
                bottom, wy = b[plane + rows[1, y]], wys[y]
                for k in range(n_cols):
                    blended[k] = _lerp_cpu(top[k], bottom[k], wy)
                if cstride == 1:  # a constant step: the pairing loop vectorises
                    _pair_with_neighbours(blended, pair_values, 1)
                elif cstride == 3:
                    _pair_with_neighbours(blended, pair_values, 3)
                else:
                    _pair_with_neighbours(blended, pair_values, cstride)
                for k in range(n_out):
                    gathered[k] = pairs[k0[k]]
                for k in range(n_out):
                    v = _lerp_cpu(gathered_values[2 * k], gathered_values[2 * k + 1], wx[k])
                    target[k] = _quantize_cpu(v) if quantize else v
            elif cstride == 3:  # RGB pixels: one source index per pixel
                for x in range(box_w):
                    k = k0[3 * x]
                    target[3 * x] = top[k]
                    target[3 * x + 1] = top[k + 1]
                    target[3 * x + 2] = top[k + 2]
            else:
                for k in range(n_out):
                    target[k] = top[k0[k]]


@njit(cache=True, nogil=True)
def _resize_rows_cpu(x, pair, box, samples, height, cstride, bilinear, quantize, compress, out,
                     lo, hi):
    for s in range(lo, hi):
        i = samples[s]
        resize_sample_cpu(x[i], x[pair[i]], box[i, 0], box[i, 1], box[i, 2], box[i, 3], height,
                          cstride, bilinear, quantize, out[i], compress)


def _cpu_any_dtype(x, pair, box, samples, height, cstride, bilinear=False, *, out,
                   compress=_compress.NATIVE):
    samples = as_index_array(samples)
    run_parallel(_resize_rows_cpu, samples.size, x, pair, box, samples, height, cstride,
                 bilinear, x.dtype == np.uint8, compress, out, item_bytes=x[0].nbytes)
    return out


cpu = float16_via_float32(_cpu_any_dtype)
cpu.__doc__ = ("Resize the listed samples' partners into their boxes, on the CPU "
               "(``compress=False``: gather even where the CPU compresses natively).")

_gpu = element_functions("cuda")
_source_span_gpu = _gpu.source_span
_bilerp_gpu = _gpu.bilerp
_quantize_gpu = _gpu.quantize_uint8


@_cuda_api.jit(device=True, inline=True)
def resized_value(x, j, r, k, y, box_y0, box_x0, box_h, box_w, height, cstride, bilinear,
                  quantize):
    """The value of row-view element (r, k) of the partner ``x[j]`` resized
    into a box at (box_y0, box_x0) of size (box_h, box_w); (r, k) in the box."""
    width = x.shape[2] // cstride
    px = k // cstride
    c = k - px * cstride
    base = r - y
    sy0, sy1, wy = _source_span_gpu(y - box_y0, height, box_h, bilinear)
    sx0, sx1, wx = _source_span_gpu(px - box_x0, width, box_w, bilinear)
    k0 = sx0 * cstride + c
    if not bilinear:
        return float32(x[j, base + sy0, k0])
    k1 = sx1 * cstride + c
    v = _bilerp_gpu(x[j, base + sy0, k0], x[j, base + sy0, k1], x[j, base + sy1, k0],
                    x[j, base + sy1, k1], wy, wx)
    return _quantize_gpu(v) if quantize else v


def _resize_rows_cuda(x, pair, box, samples, height, cstride, bilinear, quantize, out):
    n_rows = x.shape[1]
    n_cols = x.shape[2]
    col_start = _cuda_api.blockIdx.x * _cuda_api.blockDim.x + _cuda_api.threadIdx.x
    col_step = _cuda_api.blockDim.x * _cuda_api.gridDim.x
    for row in range(_cuda_api.blockIdx.y, samples.size * n_rows, _cuda_api.gridDim.y):
        s = row // n_rows
        r = row - s * n_rows
        i = samples[s]
        y = r % height
        y0, y1 = int64(box[i, 0]), int64(box[i, 1])
        x0, x1 = int64(box[i, 2]), int64(box[i, 3])
        for k in range(col_start, n_cols, col_step):
            px = k // cstride
            if y0 <= y and y < y1 and x0 <= px and px < x1:
                out[i, r, k] = resized_value(x, pair[i], r, k, y, y0, x0, y1 - y0, x1 - x0,
                                             height, cstride, bilinear, quantize)
            else:
                out[i, r, k] = x[i, r, k]


cuda_kernel = LazyCudaKernel(_resize_rows_cuda)


def cuda(x, pair, box, samples, height: int, cstride: int, bilinear: bool = False, *, out,
         stream=None):
    """ResizeMix on the GPU: device arrays (B, R, L), int64 pair/samples/box."""
    cuda_kernel.launch_rows(samples.shape[0] * x.shape[1], x.shape[2], stream,
                            x, pair, box, samples, height, cstride, bilinear,
                            x.dtype == np.uint8, out)
    return out
