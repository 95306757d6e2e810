"""Mix, normalise and lay out in one pass: the hand-off from a DALI pipeline
to the model (mixing as in kernels/blend.py, box_paste.py and mask_mix.py).

Input: a batch of HWC uint8 images ``(B, H, W, C)`` and its params table
(kernels/table.py: partner, lam, method, box per sample), plus masks
``(B, H, W)`` float32 when a sample uses FMix, SmoothMix or GridMix. For every sample i with
partner j and every element:

    v   = the mixed uint8 value: MixUp rounded ties-to-even, the box's
          pixels from j for CutMix and SaliencyMix, the mask blend
          (rounded) for FMix, SmoothMix and GridMix, j resized into the box
          for ResizeMix, x[i] itself for an unmixed sample
    out = (float32(v) - mean[c]) * inv_std[c]        (float32, then the
          output dtype: float16 rounds to nearest even)

written CHW (``chw``) or HWC. This is DALI's ``crop_mirror_normalize``
arithmetic applied to the uint8 mix, so the result equals mixing, then
normalising, exactly.

Three versions of one computation:
* :func:`reference` - NumPy, the oracle;
* :func:`mix_normalize_sample_cpu` (one sample; the per-sample DALI
  applier of gpumix.dali_cpu) and :func:`cpu` (a batch, on every core);
* :data:`cuda_kernel` - Numba CUDA: blocks of threads along a row's pixels,
  rows spread over grid.y, every channel of a pixel in one thread. It is
  launched by gpumix.runtime on torch's current stream.
"""

from __future__ import annotations

import numpy as np
from numba import cuda as _cuda_api, float32, int64, njit

from gpumix.kernels import blend, box_paste, mask_mix, resize_paste, shape_mask, table
from gpumix.kernels._element import element_functions
from gpumix.kernels._launch import LazyCudaKernel, run_parallel
from gpumix.kernels.table_mix import is_mask_method, is_mask_method_gpu

MIXUP, CUTMIX, FMIX, RESIZEMIX, SMOOTHMIX, GRIDMIX, SALIENCYMIX = range(1, 8)  # gpumix.config

_element = element_functions("cpu")
_blend_uint8 = _element.blend_uint8


def reference(images: np.ndarray, rows: np.ndarray, masks, mean, std, chw: bool,
              dtype=np.float32) -> np.ndarray:
    """NumPy oracle: each method's reference mix, then the normalisation."""
    pair = rows[:, table.PAIR].astype(np.int64)
    method = rows[:, table.METHOD].astype(np.int64)
    lam = rows[:, table.LAM].astype(np.float32)
    box = rows[:, table.Y0:table.X1 + 1].astype(np.int64)
    bilinear = bool(np.any(rows[:, table.BILINEAR] != 0))
    mixed = images.copy()
    for codes, mix in (((0, CUTMIX, SALIENCYMIX),
                        lambda s: box_paste.reference(images, pair, box, "NHWC", s)),
                       ((MIXUP,), lambda s: blend.reference(images, pair, lam, s)),
                       ((FMIX, SMOOTHMIX, GRIDMIX),
                        lambda s: mask_mix.reference(images, pair, masks, "NHWC", s)),
                       ((RESIZEMIX,), lambda s: resize_paste.reference(images, pair, box, "NHWC",
                                                                      bilinear, s))):
        samples = np.flatnonzero(np.isin(method, codes))
        if samples.size:
            mixed[samples] = mix(samples)[samples]
    mean = np.asarray(mean, np.float32)
    inv_std = (np.float32(1.0) / np.asarray(std, np.float32)).astype(np.float32)
    out = (mixed.astype(np.float32) - mean) * inv_std
    out = out.transpose(0, 3, 1, 2) if chw else out
    return np.ascontiguousarray(out).astype(dtype)


@njit(cache=True, nogil=True)
def _rgb_copy(src, o0, o1, o2, mean, inv_std):
    """Normalise RGB pixels ``src`` (3 n uint8) into the planes' rows (n each)."""
    m0, m1, m2 = mean[0], mean[1], mean[2]
    s0, s1, s2 = inv_std[0], inv_std[1], inv_std[2]
    for k in range(o0.shape[0]):
        o0[k] = (np.float32(src[3 * k]) - m0) * s0
        o1[k] = (np.float32(src[3 * k + 1]) - m1) * s1
        o2[k] = (np.float32(src[3 * k + 2]) - m2) * s2


@njit(cache=True, nogil=True)
def _rgb_blend(ra, rb, lam, o0, o1, o2, mean, inv_std):
    """MixUp of two RGB rows, rounded to uint8 values, normalised."""
    m0, m1, m2 = mean[0], mean[1], mean[2]
    s0, s1, s2 = inv_std[0], inv_std[1], inv_std[2]
    for k in range(o0.shape[0]):
        o0[k] = (_blend_uint8(ra[3 * k], rb[3 * k], lam) - m0) * s0
        o1[k] = (_blend_uint8(ra[3 * k + 1], rb[3 * k + 1], lam) - m1) * s1
        o2[k] = (_blend_uint8(ra[3 * k + 2], rb[3 * k + 2], lam) - m2) * s2


@njit(cache=True, nogil=True)
def _rgb_mask(ra, rb, mask_row, o0, o1, o2, mean, inv_std):
    """A mask mix of two RGB rows by a mask row, rounded to uint8 values,
    normalised (the branch-free uint8 blend: equal to mixed_value for masks
    in [0, 1], see gpumix.kernels.mask_mix)."""
    m0, m1, m2 = mean[0], mean[1], mean[2]
    s0, s1, s2 = inv_std[0], inv_std[1], inv_std[2]
    for k in range(o0.shape[0]):
        m = mask_row[k]
        o0[k] = (_blend_uint8(ra[3 * k], rb[3 * k], m) - m0) * s0
        o1[k] = (_blend_uint8(ra[3 * k + 1], rb[3 * k + 1], m) - m1) * s1
        o2[k] = (_blend_uint8(ra[3 * k + 2], rb[3 * k + 2], m) - m2) * s2


@njit(cache=True, nogil=True)
def _normalize_row(row, out, y, mean, inv_std, chw):
    """Normalise one uint8 image row (W * C) into row ``y`` of the CHW or HWC ``out``."""
    channels = out.shape[0] if chw else out.shape[2]
    n_means = mean.shape[0]
    for px in range(row.shape[0] // channels):
        for c in range(channels):
            k = c % n_means
            value = (np.float32(row[px * channels + c]) - mean[k]) * inv_std[k]
            if chw:
                out[c, y, px] = value
            else:
                out[y, px, c] = value


@njit(cache=True, nogil=True)
def mix_normalize_sample_cpu(out, image, partner, row, mask, mean, inv_std, chw):
    """Mix one HWC uint8 sample with its partner by its table ``row`` and
    normalise it into ``out`` (CHW or HWC float32). ``row`` None: normalise
    only; ``mask``: the FMix mask, None when FMix is off (SmoothMix and
    GridMix masks are made here from the row). A ``mean`` of neither one
    value nor one per channel normalises nothing: the sample is NaN."""
    if mean.shape[0] != 1 and mean.shape[0] != image.shape[2]:
        out.fill(np.nan)
        return
    if row is not None:
        if shape_mask.is_shape_method(np.int64(row[table.METHOD])):
            own = np.empty((image.shape[0], image.shape[1]), np.float32)
            shape_mask.sample_mask_cpu(row, own)
            _mix_normalize_body(out, image, partner, row, own, mean, inv_std, chw)
            return
    _mix_normalize_body(out, image, partner, row, mask, mean, inv_std, chw)


@njit(cache=True, nogil=True)
def _mix_normalize_body(out, image, partner, row, mask, mean, inv_std, chw):
    """:func:`mix_normalize_sample_cpu` once the mask is known."""
    height, width, channels = image.shape[0], image.shape[1], image.shape[2]
    n_cols = width * channels
    a, b = image.reshape(height, n_cols), partner.reshape(height, n_cols)
    method, lam = np.int64(-1), np.float32(1.0)
    y0, y1, x0, x1 = np.int64(0), np.int64(0), np.int64(0), np.int64(0)
    bilinear = False
    if row is not None:
        bilinear = row[table.BILINEAR] != 0
        method, lam = np.int64(row[table.METHOD]), np.float32(row[table.LAM])
        y0, y1 = np.int64(row[table.Y0]), np.int64(row[table.Y1])
        x0, x1 = np.int64(row[table.X0]), np.int64(row[table.X1])
    if method == RESIZEMIX:  # mix into a copy first, then normalise it like an unmixed sample
        resized = np.empty((height, n_cols), np.uint8)
        resize_paste.resize_sample_cpu(a, b, y0, y1, x0, x1, height, channels, bilinear, True,
                                       resized)
        a, method, y1 = resized, np.int64(0), y0
    if chw and channels == 3 and mean.shape[0] == 3:  # RGB to CHW: loops LLVM vectorises
        o = out.reshape(3 * height, width)
        for y in range(height):
            o0, o1, o2 = o[y], o[height + y], o[2 * height + y]
            if method == MIXUP:
                _rgb_blend(a[y], b[y], lam, o0, o1, o2, mean, inv_std)
            elif is_mask_method(method):
                if mask is not None:  # always, for masks come whenever a sample uses them
                    _rgb_mask(a[y], b[y], mask[y], o0, o1, o2, mean, inv_std)
            else:
                _rgb_copy(a[y], o0, o1, o2, mean, inv_std)
                if y0 <= y < y1 and x0 < x1:  # CutMix: the box's span from the partner
                    _rgb_copy(b[y][3 * x0:3 * x1], o0[x0:x1], o1[x0:x1], o2[x0:x1], mean,
                              inv_std)
        return
    row_buffer = np.empty((1, n_cols), np.uint8)
    mask_row = np.empty(n_cols, np.float32)
    for y in range(height):
        ra, rb = a[y:y + 1], b[y:y + 1]
        if method == MIXUP:
            blend.blend_sample_cpu(ra, rb, lam, True, row_buffer)
        elif is_mask_method(method):
            if mask is not None:
                mask_mix.mask_sample_cpu(ra, rb, mask[y:y + 1], 1, channels, True, False,
                                         row_buffer, mask_row)
        else:  # CutMix, or a copy: this row's part of the box
            box_paste.paste_sample_cpu(ra, rb, y0 - y, y1 - y, x0, x1, 1, channels, row_buffer)
        _normalize_row(row_buffer[0], out, y, mean, inv_std, chw)


@njit(cache=True, nogil=True)
def _mix_normalize_rows_cpu(images, rows, masks, mean, inv_std, chw, out, lo, hi):
    for i in range(lo, hi):
        j = np.int64(rows[i, table.PAIR])
        mask = masks[i] if masks.shape[0] == images.shape[0] else masks[0]
        mix_normalize_sample_cpu(out[i], images[i], images[j], rows[i], mask, mean, inv_std,
                                 chw)


def cpu(images, rows, masks, mean, inv_std, chw: bool, *, out):
    """The batch on every core: ``images`` (B, H, W, C) uint8, ``rows`` the
    (B, N_COLUMNS) float64 table, ``masks`` (B, H, W) float32 (or one
    ignored mask when no sample uses FMix), ``out`` float32 (B, C, H, W) or
    (B, H, W, C)."""
    run_parallel(_mix_normalize_rows_cpu, images.shape[0], images, rows, masks, mean, inv_std,
                 chw, out, item_bytes=out[0].nbytes)
    return out


_gpu = element_functions("cuda")
_blend_uint8_gpu = _gpu.blend_uint8
_mixed_value_gpu = _gpu.mixed_value
_source_span_gpu = _gpu.source_span
_bilerp_gpu = _gpu.bilerp
_quantize_gpu = _gpu.quantize_uint8


def _mix_normalize_cuda(images, rows, masks, mean, inv_std, chw, out):
    n_samples, height, width, channels = images.shape
    n_means = mean.shape[0]
    x_start = _cuda_api.blockIdx.x * _cuda_api.blockDim.x + _cuda_api.threadIdx.x
    x_step = _cuda_api.blockDim.x * _cuda_api.gridDim.x
    for image_row in range(_cuda_api.blockIdx.y, n_samples * height, _cuda_api.gridDim.y):
        i = image_row // height
        y = image_row - i * height
        j = int64(rows[i, table.PAIR])
        method = int64(rows[i, table.METHOD])
        lam = float32(rows[i, table.LAM])
        in_box_rows = int64(rows[i, table.Y0]) <= y and y < int64(rows[i, table.Y1])
        x0 = int64(rows[i, table.X0])
        x1 = int64(rows[i, table.X1])
        y0 = int64(rows[i, table.Y0])
        masked = is_mask_method_gpu(method)
        bilinear = rows[i, table.BILINEAR] != 0
        resized = method == RESIZEMIX and in_box_rows
        sy0, sy1, wy = int64(0), int64(0), float32(0.0)
        if resized:
            sy0, sy1, wy = _source_span_gpu(y - y0, height, int64(rows[i, table.Y1]) - y0,
                                            bilinear)
        for x in range(x_start, width, x_step):
            m = float32(1.0)
            if masked:
                m = masks[i, y, x]
            from_partner = in_box_rows and x0 <= x and x < x1
            sx0, sx1, wx = int64(0), int64(0), float32(0.0)
            if resized and from_partner:
                sx0, sx1, wx = _source_span_gpu(x - x0, width, x1 - x0, bilinear)
            for c in range(channels):
                a = images[i, y, x, c]
                b = images[j, y, x, c]
                if method == MIXUP:
                    v = _blend_uint8_gpu(a, b, lam)
                elif masked:
                    v = _mixed_value_gpu(a, b, m, True)
                elif from_partner and method == RESIZEMIX:
                    if bilinear:
                        v = _quantize_gpu(_bilerp_gpu(
                            images[j, sy0, sx0, c], images[j, sy0, sx1, c],
                            images[j, sy1, sx0, c], images[j, sy1, sx1, c], wy, wx))
                    else:
                        v = float32(images[j, sy0, sx0, c])
                elif from_partner:
                    v = float32(b)
                else:
                    v = float32(a)
                k = c % n_means
                value = (v - mean[k]) * inv_std[k]
                if chw:
                    out[i, c, y, x] = value
                else:
                    out[i, y, x, c] = value


cuda_kernel = LazyCudaKernel(_mix_normalize_cuda)

THREADS_PER_BLOCK = 128


def cuda_grid(n_samples: int, height: int, width: int) -> tuple[tuple[int, int], int]:
    """(grid, block): pixels of a row along x, image rows along y."""
    blocks_x = max(1, min(-(-width // THREADS_PER_BLOCK), 16))
    return (blocks_x, max(1, min(n_samples * height, 65535))), THREADS_PER_BLOCK
