"""SaliencyMix's grey thumbnails: the first step of spectral residual
saliency (Hou and Zhang, "Saliency Detection: A Spectral Residual Approach",
CVPR 2007), kept small so the FFTs after it stay cheap.

For every listed sample s (image ``samples[s]`` of the batch) and every
thumbnail pixel (ty, tx) of a T x T thumbnail:

    grey(y, x)  = 0.299 R + 0.587 G + 0.114 B      (ITU-R 601, OpenCV's
                  RGB-to-grey weights, float32; one channel: itself; four:
                  the first three)
    thumb[s]    = grey bilinearly resized to T x T with half-pixel centres
                  (OpenCV's INTER_LINEAR and torch's interpolate without
                  antialiasing: the indices of gpumix.kernels._element.source_span)

Images are the (B, R, L) row views of gpumix.kernels._launch in any image
dtype: channel c of pixel (y, x) is at row ``c H + y``, column ``x`` (CHW,
cstride 1) or row ``y``, column ``x C + c`` (HWC, cstride C).

Versions: :func:`reference` (NumPy), :func:`cpu` (Numba, parallel over the
listed samples) and :data:`cuda_kernel`. The rest of the saliency map
(FFTs) is gpumix.saliency.

Placing a box: :func:`boxes_at` (NumPy or CuPy) and :data:`place_kernel`
(writes placed boxes into a device params table) centre a box of the size
it holds on a peak, moved the least needed to lie inside the image.
"""

from __future__ import annotations

import numpy as np
from numba import cuda as _cuda_api, float32, int64, njit

from gpumix.kernels import table
from gpumix.kernels._element import element_functions
from gpumix.kernels._launch import LazyCudaKernel, run_parallel

GREY_WEIGHTS = (0.299, 0.587, 0.114)


def _build(jit, functions):
    """The per-pixel functions compiled with ``jit`` over the target's
    element functions (gpumix.kernels._element: its unfused products and
    sums, source_span and bilerp)."""
    span, bilerp = functions.source_span, functions.bilerp
    fmul, fadd = functions.fmul, functions.fadd

    @jit
    def grey(x, i, y, px, height, cstride, channels):
        """Grey value of pixel (y, px) of sample i of the row view ``x``."""
        if channels < 3:
            return float32(x[i, y, px * cstride])
        if cstride == 1:
            r, g, b = x[i, y, px], x[i, height + y, px], x[i, 2 * height + y, px]
        else:
            k = px * cstride
            r, g, b = x[i, y, k], x[i, y, k + 1], x[i, y, k + 2]
        return fadd(fadd(fmul(float32(0.299), float32(r)), fmul(float32(0.587), float32(g))),
                    fmul(float32(0.114), float32(b)))

    @jit
    def thumb_value(x, i, ty, tx, size, height, cstride, channels):
        """Thumbnail pixel (ty, tx) of sample i."""
        width = x.shape[2] // cstride
        sy0, sy1, wy = span(ty, height, size, True)
        sx0, sx1, wx = span(tx, width, size, True)
        return bilerp(grey(x, i, sy0, sx0, height, cstride, channels),
                      grey(x, i, sy0, sx1, height, cstride, channels),
                      grey(x, i, sy1, sx0, height, cstride, channels),
                      grey(x, i, sy1, sx1, height, cstride, channels), wy, wx)

    return thumb_value


def grey_images(images: np.ndarray, layout: str, samples) -> np.ndarray:
    """NumPy full-size grey images (S, H, W) float32 of the listed samples."""
    x = images[np.asarray(samples)].astype(np.float32)
    x = np.moveaxis(x, 1, -1) if layout == "NCHW" else x
    if x.shape[-1] < 3:
        return x[..., 0]
    return (np.float32(0.299) * x[..., 0] + np.float32(0.587) * x[..., 1]
            + np.float32(0.114) * x[..., 2])


def reference(images: np.ndarray, layout: str, samples, size: int) -> np.ndarray:
    """NumPy thumbnails (S, size, size) float32 of the listed samples."""
    grey = grey_images(images, layout, samples)
    from gpumix.kernels.resize_paste import _source_indices

    yi0, yi1, wy = _source_indices(grey.shape[1], size, True)
    xi0, xi1, wx = _source_indices(grey.shape[2], size, True)
    wy, wx, one = wy[:, None], wx[None, :], np.float32(1)
    rows = (one - wy) * grey[:, yi0] + wy * grey[:, yi1]  # down the columns, then across
    return ((one - wx) * rows[:, :, xi0] + wx * rows[:, :, xi1]).astype(np.float32)


_cpu = element_functions("cpu")
_thumb_value_cpu = _build(njit(inline="always"), _cpu)


@njit(cache=True, nogil=True)
def _thumbs_cpu(x, samples, height, cstride, channels, out, lo, hi):
    size = out.shape[1]
    for s in range(lo, hi):
        for ty in range(size):
            for tx in range(size):
                out[s, ty, tx] = _thumb_value_cpu(x, samples[s], ty, tx, size, height, cstride,
                                                  channels)


def cpu(x, samples, height: int, cstride: int, channels: int, *, out) -> np.ndarray:
    """Thumbnails ``out`` (S, T, T) float32 of the listed samples of the row
    view ``x`` (uint8 or float32; widen float16 first)."""
    run_parallel(_thumbs_cpu, len(samples), x, np.ascontiguousarray(samples, np.int64), height,
                 cstride, channels, out)
    return out


_gpu = element_functions("cuda")
_thumb_value_gpu = _build(_cuda_api.jit(device=True, inline=True), _gpu)


def _thumbs_cuda(x, samples, height, cstride, channels, out):
    n, size = out.shape[0], out.shape[1]
    start = _cuda_api.blockIdx.x * _cuda_api.blockDim.x + _cuda_api.threadIdx.x
    step = _cuda_api.blockDim.x * _cuda_api.gridDim.x
    for row in range(_cuda_api.blockIdx.y, n * size, _cuda_api.gridDim.y):
        s = row // size
        ty = row - s * size
        for tx in range(start, size, step):
            out[s, ty, tx] = _thumb_value_gpu(x, int64(samples[s]), ty, tx, size, height,
                                              cstride, channels)


cuda_kernel = LazyCudaKernel(_thumbs_cuda)


def boxes_at(centres, sizes, spatial_shape, xp=np):
    """Boxes (S, 4) = (y0, y1, x0, x1) of ``sizes`` (S, 2) centred on
    ``centres`` (S, 2) and moved the least needed to lie inside the image."""
    h, w = spatial_shape
    y0 = xp.clip(centres[:, 0] - sizes[:, 0] // 2, 0, h - sizes[:, 0])
    x0 = xp.clip(centres[:, 1] - sizes[:, 1] // 2, 0, w - sizes[:, 1])
    return xp.stack([y0, y0 + sizes[:, 0], x0, x0 + sizes[:, 1]], axis=1).astype(xp.int64)


def _place_cuda(rows, todo, centres, height, width):
    """Row todo[s] of the table: its box (whose sides it holds) centred on
    centres[s] and moved inside, as :func:`boxes_at`."""
    s = _cuda_api.grid(1)
    if s >= todo.size:
        return
    i = todo[s]
    h = int64(rows[i, table.Y1]) - int64(rows[i, table.Y0])
    w = int64(rows[i, table.X1]) - int64(rows[i, table.X0])
    y0 = min(max(centres[s, 0] - h // 2, 0), height - h)
    x0 = min(max(centres[s, 1] - w // 2, 0), width - w)
    rows[i, table.Y0] = y0
    rows[i, table.Y1] = y0 + h
    rows[i, table.X0] = x0
    rows[i, table.X1] = x0 + w


place_kernel = LazyCudaKernel(_place_cuda)
