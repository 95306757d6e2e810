"""Soft targets with label smoothing (docs/semantics.md, "Targets"; timm's
``mixup_target`` is the anchor, with the fix for equal labels).

    off = s / K,  on = 1 - s + s / K
    target[i, k] = off + (on - off) * w(i, k)
    w(i, k) = lam[i] * [k == y_i] + (1 - lam[i]) * [k == y_pair[i]]

with w = [k == y_i] exactly when y_i == y_pair[i], so such a row is a plain
smoothed one-hot. Output is float32 (B, K) whatever the image dtype; labels
are integers and are never cast to a float type.

Three versions: :func:`reference`, :func:`cpu`, :func:`cuda` (one thread per
(sample, class), grid-stride over rows = samples).
"""

from __future__ import annotations

import numpy as np
from numba import cuda as _cuda_api, float32, njit

from gpumix.kernels._element import element_functions
from gpumix.kernels._launch import LazyCudaKernel

_target_value_cpu = element_functions("cpu").target_value


def smoothing_values(num_classes: int, smoothing: float) -> tuple[np.float32, np.float32]:
    """(off, on): the smoothed one-hot's background and peak, as float32."""
    off = smoothing / num_classes
    return np.float32(off), np.float32(1.0 - smoothing + off)


def reference(labels, pair, lam, num_classes: int, smoothing: float) -> np.ndarray:
    """NumPy soft targets (B, K) float32."""
    labels = np.asarray(labels, np.int64)
    pair = np.asarray(pair, np.int64)
    lam = np.asarray(lam, np.float32)[:, None]
    classes = np.arange(num_classes)
    primary = (classes == labels[:, None]).astype(np.float32)
    partner = (classes == labels[pair][:, None]).astype(np.float32)
    weight = lam * primary + (np.float32(1) - lam) * partner
    weight = np.where((labels == labels[pair])[:, None], primary, weight)
    off, on = smoothing_values(num_classes, smoothing)
    return (off + (on - off) * weight).astype(np.float32)


@njit(cache=True, nogil=True)
def _targets_cpu(labels, pair, lam, off, on, out):
    # Serial: B x K values (64 x 1000 for ImageNet) take microseconds.
    n_classes = out.shape[1]
    for i in range(labels.size):
        y_i = labels[i]
        y_j = labels[pair[i]]
        for k in range(n_classes):
            out[i, k] = _target_value_cpu(k, y_i, y_j, lam[i], off, on)


def cpu(labels, pair, lam, num_classes: int, smoothing: float, *, out=None) -> np.ndarray:
    """Soft targets on the CPU: int64 labels/pair (B,), float32 lam (B,)."""
    if out is None:
        out = np.empty((labels.shape[0], num_classes), np.float32)
    off, on = smoothing_values(num_classes, smoothing)
    _targets_cpu(labels, pair, lam, off, on, out)
    return out


_target_value_gpu = element_functions("cuda").target_value


def _targets_cuda(labels, pair, lam, off, on, out):
    n_samples = out.shape[0]
    n_classes = out.shape[1]
    col_start = _cuda_api.blockIdx.x * _cuda_api.blockDim.x + _cuda_api.threadIdx.x
    col_step = _cuda_api.blockDim.x * _cuda_api.gridDim.x
    for i in range(_cuda_api.blockIdx.y, n_samples, _cuda_api.gridDim.y):
        y_i = labels[i]
        y_j = labels[pair[i]]
        w = lam[i]
        for k in range(col_start, n_classes, col_step):
            out[i, k] = _target_value_gpu(k, y_i, y_j, w, float32(off), float32(on))


cuda_kernel = LazyCudaKernel(_targets_cuda)


def cuda(labels, pair, lam, num_classes: int, smoothing: float, *, out, stream=None):
    """Soft targets on the GPU into a float32 (B, K) device array ``out``."""
    off, on = smoothing_values(num_classes, smoothing)
    cuda_kernel.launch_rows(out.shape[0], num_classes, stream, labels, pair, lam, off, on, out)
    return out
