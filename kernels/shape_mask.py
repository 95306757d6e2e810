"""Masks drawn by a formula from the params table: SmoothMix and GridMix.

Both are applied like FMix masks (kernels/mask_mix.py; 1 = primary). For
every row i whose method is SMOOTHMIX or GRIDMIX (gpumix.config) and every
pixel (y, x) of an H x W image:

SmoothMix (Lee et al., "SmoothMix: a Simple Yet Effective Data Augmentation
to Train Robust Classifiers", CVPR-W 2020): a Gaussian bump G weighs the
partner, so the primary's mask is 1 - G, with

    gy = float32(exp(-((y - centre_y) / sigma_y)^2 / 2))       (float64 exp)
    gx = float32(exp(-((x - centre_x) / sigma_x)^2 / 2))
    G  = gy * gx (circle, float32)  or  min(gy, gx) (square)

(the square variant is exp(-max(dy^2, dx^2) / 2) in scaled distances,
since exp is monotone). Made from the two 1-D profiles, so the CPU and CUDA
masks agree wherever their float64 exp rounds to the same float32 (all
but about one value in 2^29).

GridMix (Baek et al., "GridMix: Strong regularization through local context
mapping", Pattern Recognition 2021): an n x n grid, pixel (y, x) in cell
(y n // H, x n // W); the cells whose bit is set in the row's cell set take
the partner (mask 0), the rest the primary (mask 1).

Versions: :func:`reference` (NumPy, the formulas above evaluated directly),
:func:`cpu` (Numba, parallel over rows) and :data:`cuda_kernel`; they
write only the rows of these two methods. :func:`mix_cpu` mixes images by
these masks without keeping them: each sample's mask is made into a
per-thread (H, W) buffer that stays in cache while the sample is mixed, so
the batch's masks never travel through memory (4 bytes a pixel, more than
a uint8 RGB pixel itself). A GridMix sample, whose mask is 0 or 1, needs
no float mask at all: each value is the primary's or the partner's, picked
by a bitwise select (:func:`grid_sample_cpu`); SmoothMix samples blend by
their mask over whole planes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda as _cuda_api, float32, int64, njit

from gpumix.kernels import mask_mix, table
from gpumix.kernels._launch import (LazyCudaKernel, as_index_array, copy_bytes, float16_via_float32,
                                    run_parallel)

SMOOTHMIX, GRIDMIX = 5, 6  # gpumix.config's method codes


def _profile(v, centre, sigma):
    """One axis of the SmoothMix Gaussian at integer position ``v``."""
    d = (v - centre) / sigma
    return float32(math.exp(-0.5 * d * d))


def _bump(gy, gx, square):
    """G from the two profiles."""
    if square:
        return min(gy, gx)
    return gy * gx


def _cell_value(row, cell):
    """GridMix mask value (1 primary, 0 partner) of cell ``cell``."""
    bits = int64(row[table.CELLS_LOW]) if cell < 32 else int64(row[table.CELLS_HIGH])
    return float32(0.0) if (bits >> (cell % 32)) & 1 else float32(1.0)


_profile_cpu = njit(inline="always")(_profile)
_bump_cpu = njit(inline="always")(_bump)
_cell_value_cpu = njit(inline="always")(_cell_value)


def reference(rows, shape) -> np.ndarray:
    """NumPy masks (B, H, W) float32 of the table's SmoothMix and GridMix
    rows (zeros elsewhere)."""
    rows = np.asarray(rows, np.float64)
    h, w = shape
    out = np.zeros((len(rows), h, w), np.float32)
    y, x = np.arange(h)[:, None], np.arange(w)[None, :]
    for i, row in enumerate(rows):
        method = int(row[table.METHOD])
        if method == SMOOTHMIX:
            gy = np.exp(-0.5 * ((y - row[table.CENTRE_Y]) / row[table.SIGMA_Y]) ** 2)
            gx = np.exp(-0.5 * ((x - row[table.CENTRE_X]) / row[table.SIGMA_X]) ** 2)
            gy, gx = gy.astype(np.float32), gx.astype(np.float32)
            bump = np.minimum(gy, gx) if row[table.SQUARE] else gy * gx
            out[i] = np.float32(1) - bump
        elif method == GRIDMIX:
            n = int(row[table.GRID])
            cell = (y * n // h) * n + (x * n // w)
            bits = np.array([int(row[table.CELLS_LOW]), int(row[table.CELLS_HIGH])], np.int64)
            taken = (bits[cell // 32] >> (cell % 32)) & 1
            out[i] = np.where(taken == 1, 0.0, 1.0)
    return out


@njit(inline="always")
def _distance_profile_cpu(sigma, reach):
    """The profile at integer distances 0..reach from an integral centre:
    (v - c) / sigma is exactly +-d / sigma there, so its square, and the
    value, depend on the distance alone."""
    values = np.empty(reach + 1, np.float32)
    for d in range(reach + 1):
        values[d] = _profile_cpu(d, 0.0, sigma)
    return values


@njit(cache=True, nogil=True)
def _smooth_profiles_cpu(row, gy, gx):
    """SmoothMix's two profiles (``gy``, ``gx``) of a table row, each value
    equal to :func:`_profile` at its position. With integral centres (as
    sampled) each distinct distance costs one exp, shared by both sides of
    the centre and by both axes when their sigmas are equal (square images):
    the exps are most of a mask's cost."""
    cy, cx = row[table.CENTRE_Y], row[table.CENTRE_X]
    sigma_y, sigma_x = row[table.SIGMA_Y], row[table.SIGMA_X]
    if not (cy == np.floor(cy) and cx == np.floor(cx) and abs(cy) < 2 ** 31
            and abs(cx) < 2 ** 31):
        for y in range(gy.shape[0]):
            gy[y] = _profile_cpu(y, cy, sigma_y)
        for x in range(gx.shape[0]):
            gx[x] = _profile_cpu(x, cx, sigma_x)
        return
    iy, ix = np.int64(cy), np.int64(cx)
    reach_y = max(abs(iy), abs(gy.shape[0] - 1 - iy))
    reach_x = max(abs(ix), abs(gx.shape[0] - 1 - ix))
    if sigma_x == sigma_y:
        by_y = _distance_profile_cpu(sigma_y, max(reach_y, reach_x))
        by_x = by_y
    else:
        by_y = _distance_profile_cpu(sigma_y, reach_y)
        by_x = _distance_profile_cpu(sigma_x, reach_x)
    for y in range(gy.shape[0]):
        gy[y] = by_y[abs(y - iy)]
    for x in range(gx.shape[0]):
        gx[x] = by_x[abs(x - ix)]


@njit(cache=True, nogil=True)
def sample_mask_cpu(row, out):
    """The (H, W) mask ``out`` of one SmoothMix or GridMix table row (left
    alone for other methods): the batch kernel and the per-sample CPU
    appliers (gpumix.kernels.table_mix, mix_normalize) run it."""
    height, width = out.shape[0], out.shape[1]
    method = np.int64(row[table.METHOD])
    if method == SMOOTHMIX:  # the two profiles, then their product or minimum
        gy = np.empty(height, np.float32)
        gx = np.empty(width, np.float32)
        _smooth_profiles_cpu(row, gy, gx)
        square = row[table.SQUARE] != 0
        for y in range(height):
            for x in range(width):
                out[y, x] = np.float32(1.0) - _bump_cpu(gy[y], gx[x], square)
    elif method == GRIDMIX:  # the n distinct mask rows, then each image row copies its own
        n = np.int64(row[table.GRID])
        patterns = np.empty((n, width), np.float32)
        for cell_row in range(n):
            for x in range(width):
                patterns[cell_row, x] = _cell_value_cpu(row, cell_row * n + (x * n) // width)
        for y in range(height):
            pattern, target = patterns[(y * n) // height], out[y]
            for x in range(width):
                target[x] = pattern[x]


@njit(inline="always")
def is_shape_method(method):
    """SmoothMix and GridMix: masks made from the row alone."""
    return method == SMOOTHMIX or method == GRIDMIX


@njit(cache=True, nogil=True)
def _masks_cpu(rows, out, lo, hi):
    for i in range(lo, hi):
        sample_mask_cpu(rows[i], out[i])


def cpu(rows, out) -> np.ndarray:
    """Write the masks of the SmoothMix and GridMix rows of ``rows`` (B,
    N_COLUMNS float64) into ``out`` (B, H, W) float32, on every core."""
    run_parallel(_masks_cpu, rows.shape[0], rows, out)
    return out


GRID_CHUNK_ROWS = 4  # rows of flags per cell row: one select pass covers this many rows


@njit(cache=True, nogil=True)
def grid_sample_cpu(a, b, row, height, cstride, out):
    """One GridMix sample's C-contiguous rows (R, L) into ``out``: its mask
    is 0 or 1, so every value is the primary's or the partner's, picked
    byte by byte (any dtype) by flags (0xFF keeps the primary's) in a
    bitwise select that vectorises: what the mask mix stores, without a
    float mask. Cell column c covers pixels [ceil(c W / n), ceil((c + 1) W /
    n)), the x with x n // W == c; cell rows likewise. The rows of one cell
    row within a plane (channel, frame) are contiguous, so each is mixed in
    passes of GRID_CHUNK_ROWS rows against that many rows of its flags, in
    memory order (one short pass per row, or a plane's cell rows visited
    across planes, measured slower: benchmarks/README.md)."""
    n = np.int64(row[table.GRID])
    n_rows = a.shape[0]
    row_bytes = a.shape[1] * a.itemsize
    pixel_bytes = cstride * a.itemsize
    width = a.shape[1] // cstride
    chunk = GRID_CHUNK_ROWS * row_bytes
    flags = np.empty((n, chunk), np.uint8)
    for cell_row in range(n):
        first = flags[cell_row]
        for c in range(n):
            flag = 255 if _cell_value_cpu(row, cell_row * n + c) != 0 else 0
            for k in range(((c * width + n - 1) // n) * pixel_bytes,
                           (((c + 1) * width + n - 1) // n) * pixel_bytes):
                first[k] = flag
        for r in range(1, GRID_CHUNK_ROWS):
            copy_bytes(first.ctypes.data + r * row_bytes, first.ctypes.data, row_bytes)
    fa = a.reshape(-1).view(np.uint8)
    fb = b.reshape(-1).view(np.uint8)
    fo = out.reshape(-1).view(np.uint8)
    for plane in range(0, n_rows, height):
        for cell_row in range(n):
            keep = flags[cell_row]
            start = (plane + (cell_row * height + n - 1) // n) * row_bytes
            stop = (plane + ((cell_row + 1) * height + n - 1) // n) * row_bytes
            for lo in range(start, stop, chunk):
                hi = min(lo + chunk, stop)
                pa, pb, po = fa[lo:hi], fb[lo:hi], fo[lo:hi]
                for k in range(hi - lo):
                    m = keep[k]
                    po[k] = (pa[k] & m) | (pb[k] & ~m)


@njit(cache=True, nogil=True)
def shape_sample_cpu(a, b, row, height, cstride, quantize, paste, out, mask, mask_row):
    """One SmoothMix or GridMix sample's rows (R, L) into ``out``: GridMix by
    its bitwise select, SmoothMix by its mask made into ``mask`` (H, W)
    float32 and blended (``mask_row``: float32 scratch of L). The batch
    kernel and the per-sample DALI appliers both run it."""
    if np.int64(row[table.METHOD]) == GRIDMIX:
        grid_sample_cpu(a, b, row, height, cstride, out)
        return
    sample_mask_cpu(row, mask)
    mask_mix.mask_sample_cpu(a, b, mask, height, cstride, quantize, paste, out, mask_row)


@njit(cache=True, nogil=True)
def _mix_rows_cpu(x, rows, samples, height, cstride, quantize, paste, out, lo, hi):
    mask = np.empty((height, x.shape[2] // cstride), np.float32)
    mask_row = np.empty(x.shape[2], np.float32)
    for s in range(lo, hi):
        i = samples[s]
        shape_sample_cpu(x[i], x[np.int64(rows[i, table.PAIR])], rows[i], height, cstride,
                         quantize, paste, out[i], mask, mask_row)


def _mix_cpu_any_dtype(x, rows, samples, height, cstride, paste=False, *, out):
    samples = as_index_array(samples)
    run_parallel(_mix_rows_cpu, samples.size, x, rows, samples, height, cstride,
                 x.dtype == np.uint8, paste, out, item_bytes=x[0].nbytes)
    return out


mix_cpu = float16_via_float32(_mix_cpu_any_dtype)
mix_cpu.__doc__ = ("Mix the listed SmoothMix and GridMix samples of the (B, R, L) batch "
                   "``x`` by the masks of their table ``rows``, made per sample on the CPU.")

_profile_gpu = _cuda_api.jit(device=True, inline=True)(_profile)
_bump_gpu = _cuda_api.jit(device=True, inline=True)(_bump)
_cell_value_gpu = _cuda_api.jit(device=True, inline=True)(_cell_value)


def _masks_cuda(rows, out):
    n_samples, height, width = out.shape
    x_start = _cuda_api.blockIdx.x * _cuda_api.blockDim.x + _cuda_api.threadIdx.x
    x_step = _cuda_api.blockDim.x * _cuda_api.gridDim.x
    for image_row in range(_cuda_api.blockIdx.y, n_samples * height, _cuda_api.gridDim.y):
        i = image_row // height
        y = image_row - i * height
        method = int64(rows[i, table.METHOD])
        if method == SMOOTHMIX:
            gy = _profile_gpu(y, rows[i, table.CENTRE_Y], rows[i, table.SIGMA_Y])
            square = rows[i, table.SQUARE] != 0
            for x in range(x_start, width, x_step):
                gx = _profile_gpu(x, rows[i, table.CENTRE_X], rows[i, table.SIGMA_X])
                out[i, y, x] = float32(1.0) - _bump_gpu(gy, gx, square)
        elif method == GRIDMIX:
            n = int64(rows[i, table.GRID])
            first = ((y * n) // height) * n
            for x in range(x_start, width, x_step):
                out[i, y, x] = _cell_value_gpu(rows[i], first + (x * n) // width)


cuda_kernel = LazyCudaKernel(_masks_cuda)


def uses_shape_masks(rows) -> bool:
    """Whether a host table has a SmoothMix or GridMix row."""
    return table.uses(rows, SMOOTHMIX, GRIDMIX)
