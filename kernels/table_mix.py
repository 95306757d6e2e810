"""Every method in one launch, driven by the params table (kernels/table.py),
with the soft targets in the same launch.

Images keep their dtype and layout (the (B, R, L) row views of
kernels._launch). Sample i takes from its partner j = pair[i]:

    MixUp                      lam * x[i] + (1 - lam) * x[j]   (kernels/blend.py)
    CutMix, SaliencyMix        x[j] inside the box, x[i] elsewhere
                                                           (kernels/box_paste.py)
    FMix, SmoothMix, GridMix   the mask blend                  (kernels/mask_mix.py)
    and rows marked masked     (a volume's cuboids)
    ResizeMix                  x[j] resized into the box       (kernels/resize_paste.py)
    none                       x[i]

with the per-element functions of kernels._element, so the values equal the
per-method kernels'. Targets (rows B .. 2B of the launch, when given):
``targets[i] = w * onehot_s(y_i) + (1 - w) * onehot_s(y_j)`` with w the row's
label_lam (lam unless mapped)
(kernels/soft_targets.py); a label outside [0, K) sets ``error[0] = 1`` and
makes that row NaN, so a bad label is never silently trained on.

In place by pairs (``by_pairs``): where the pairing is an involution
(pair[pair[i]] == i, e.g. timm's flip) and no sample uses ResizeMix (whose
pixels read the partner elsewhere), the thread of element e of sample
i <= j reads x[i][e] and x[j][e] and then writes both outputs, so ``out``
may be ``x`` with no snapshot. Otherwise ``out`` must not alias ``x``.

Versions: :func:`apply_sample_cpu` (one sample, the CPU DALI applier) and
:data:`cuda_kernel` (a batch); the oracle is gpumix.mixing.reference_mix_images
with gpumix.mixing.reference_soft_targets.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda as _cuda_api, float32, int64, njit

from gpumix.kernels import blend, box_paste, mask_mix, resize_paste, shape_mask, table
from gpumix.kernels._element import element_functions
from gpumix.kernels._launch import LazyCudaKernel, row_grid

MIXUP, FMIX, RESIZEMIX, SMOOTHMIX, GRIDMIX = 1, 3, 4, 5, 6  # gpumix.config's method codes


@njit(inline="always")
def is_mask_method(method):
    """FMix, SmoothMix and GridMix: applied through the sample's mask."""
    return method == FMIX or method == SMOOTHMIX or method == GRIDMIX


is_mask_method_gpu = _cuda_api.jit(device=True, inline=True)(is_mask_method.py_func)


@njit(cache=True, nogil=True)
def apply_sample_cpu(out, image, partner, row, mask, chw, quantize):
    """Mix one HWC or CHW sample with its partner by its table ``row`` with
    the CPU kernels' per-sample bodies (``mask``: the FMix mask, None when
    FMix is off; SmoothMix and GridMix masks are made here from the row).
    The image height is the row's (when set): a video clip's F frames of H
    rows come as one F * H-row sample and take the same box or mask each."""
    method = np.int64(row[table.METHOD])
    if chw:
        height, cstride = image.shape[1], 1
        shape2d = (image.shape[0] * image.shape[1], image.shape[2])
    else:
        height, cstride = image.shape[0], image.shape[2]
        shape2d = (image.shape[0], image.shape[1] * image.shape[2])
    if row[table.HEIGHT] > 0:  # the frame height: a clip's frames are stacked as rows
        height = np.int64(row[table.HEIGHT])
    a, b, o = image.reshape(shape2d), partner.reshape(shape2d), out.reshape(shape2d)
    if method == MIXUP:
        blend.blend_sample_cpu(a, b, np.float32(row[table.LAM]), quantize, o)
    elif shape_mask.is_shape_method(method):  # the mask (or GridMix's flags) from the row, here
        own = np.empty((height, a.shape[1] // cstride), np.float32)
        mask_row = np.empty(a.shape[1], np.float32)
        shape_mask.shape_sample_cpu(a, b, row, height, cstride, quantize, False, o, own, mask_row)
    elif method == FMIX or row[table.MASKED] != 0:
        if mask is not None:  # always: masks come whenever a sample uses one
            mask_row = np.empty(a.shape[1], np.float32)
            mask_mix.mask_sample_cpu(a, b, mask, height, cstride, quantize, False, o, mask_row)
    elif method == RESIZEMIX:
        resize_paste.resize_sample_cpu(a, b, np.int64(row[table.Y0]), np.int64(row[table.Y1]),
                                       np.int64(row[table.X0]), np.int64(row[table.X1]),
                                       height, cstride, row[table.BILINEAR] != 0, quantize, o)
    else:  # CutMix, SaliencyMix, or no mixing (an empty box): a copy and the box
        box_paste.paste_sample_cpu(a, b, np.int64(row[table.Y0]), np.int64(row[table.Y1]),
                                   np.int64(row[table.X0]), np.int64(row[table.X1]), height,
                                   cstride, o)


_gpu = element_functions("cuda")
_blend_value_gpu = _gpu.blend_value
_blend_uint8_gpu = _gpu.blend_uint8
_mixed_value_gpu = _gpu.mixed_value
_box_contains_gpu = _gpu.box_contains
_target_value_gpu = _gpu.target_value


@_cuda_api.jit(device=True, inline=True)
def _store(x, out, i, j, r, k, a, b, rows, masks, height, cstride, quantize):
    """out[i, r, k] from the primary value ``a`` and the partner's ``b``
    (``x[j]``'s other pixels for ResizeMix)."""
    method = int64(rows[i, table.METHOD])
    if method == MIXUP:
        lam = float32(rows[i, table.LAM])
        if quantize:
            out[i, r, k] = _blend_uint8_gpu(a, b, lam)
        else:
            out[i, r, k] = _blend_value_gpu(a, b, lam)
    elif is_mask_method_gpu(method) or rows[i, table.MASKED] != 0:
        out[i, r, k] = _mixed_value_gpu(a, b, masks[i, r % height, k // cstride], quantize)
    elif not _box_contains_gpu(r % height, k // cstride, int64(rows[i, table.Y0]),
                               int64(rows[i, table.Y1]), int64(rows[i, table.X0]),
                               int64(rows[i, table.X1])):
        out[i, r, k] = a
    elif method == RESIZEMIX:
        y0, x0 = int64(rows[i, table.Y0]), int64(rows[i, table.X0])
        out[i, r, k] = resize_paste.resized_value(
            x, j, r, k, r % height, y0, x0, int64(rows[i, table.Y1]) - y0,
            int64(rows[i, table.X1]) - x0, height, cstride, rows[i, table.BILINEAR] != 0,
            quantize)
    else:
        out[i, r, k] = b


def _table_mix_cuda(x, out, rows, masks, labels, targets, error, height, cstride, quantize,
                    by_pairs, off, on):
    n_samples, n_rows, n_cols = x.shape
    image_rows = n_samples * n_rows
    n_classes = targets.shape[1]
    col_start = _cuda_api.blockIdx.x * _cuda_api.blockDim.x + _cuda_api.threadIdx.x
    col_step = _cuda_api.blockDim.x * _cuda_api.gridDim.x
    for row in range(_cuda_api.blockIdx.y, image_rows + targets.shape[0], _cuda_api.gridDim.y):
        if row >= image_rows:  # a targets row
            i = row - image_rows
            y_i = int64(labels[i])
            y_j = int64(labels[int64(rows[i, table.PAIR])])
            lam = float32(rows[i, table.LABEL_LAM])
            bad = y_i < 0 or y_i >= n_classes or y_j < 0 or y_j >= n_classes
            if bad and col_start == 0:
                error[0] = 1
            for k in range(col_start, n_classes, col_step):
                if bad:
                    targets[i, k] = math.nan
                else:
                    targets[i, k] = _target_value_gpu(k, y_i, y_j, lam, off, on)
            continue
        i = row // n_rows
        r = row - i * n_rows
        j = int64(rows[i, table.PAIR])
        if by_pairs and j < i:
            continue  # written by the thread of sample j
        for k in range(col_start, n_cols, col_step):
            a = x[i, r, k]
            b = x[j, r, k]
            _store(x, out, i, j, r, k, a, b, rows, masks, height, cstride, quantize)
            if by_pairs and j != i:
                _store(x, out, j, i, r, k, b, a, rows, masks, height, cstride, quantize)


cuda_kernel = LazyCudaKernel(_table_mix_cuda)


def cuda_grid(n_samples: int, n_rows: int, n_cols: int, n_targets: int, n_classes: int):
    """(grid, block) covering the image rows and the targets rows."""
    return row_grid(n_samples * n_rows + n_targets, max(n_cols, n_classes))


def is_involution(pair: np.ndarray) -> bool:
    """Whether pair[pair[i]] == i for every i."""
    pair = np.asarray(pair)
    return bool(np.all(pair[pair] == np.arange(pair.shape[0])))


def pairs_in_place(pair: np.ndarray, method: np.ndarray) -> bool:
    """Whether a launch may mix in place by pairs (``by_pairs``): the pairing
    is an involution and no sample uses ResizeMix."""
    return is_involution(pair) and not np.any(np.asarray(method) == RESIZEMIX)
