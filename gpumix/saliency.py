"""SaliencyMix's boxes (Uddin et al., "SaliencyMix: A Saliency Guided Data
Augmentation Strategy for Better Regularization", ICLR 2021): a CutMix box of
the partner's pixels, centred on the partner's most salient point.

Saliency is the spectral residual (Hou and Zhang, CVPR 2007), written
against an array module ``xp`` (NumPy on the CPU, CuPy on the GPU) like
gpumix.fmix, on a T x T grey thumbnail (gpumix.kernels.saliency, T = 64):

    F  = fft2(thumbnail)                        (complex64)
    R  = log|F| - box3(log|F|)                  the spectral residual
    m  = |ifft2(exp(R) F / |F|)|                back with the original phase
    S  = gauss5(m)^2 / max                      smoothed, squared, normalised

box3 is a 3 x 3 mean and gauss5 a 5 x 5 Gaussian of sigma 8, both with
reflect-101 borders, in the order OpenCV's ``StaticSaliencySpectralResidual``
uses (it blurs the magnitude, then squares; the paper writes the square
first), so on the same thumbnail the maps agree with OpenCV's to within its
fast-atan phase error. The published SaliencyMix code used OpenCV's
fine-grained saliency instead: ``saliencymix_saliency="fine_grained"`` (CPU
front doors only; needs opencv-contrib-python-headless) computes that on the
full-size grey image (float images stretched to 0..255 first).

The peak is the arg-max of S (first in row-major order), mapped to the image
as the pixel under the thumbnail pixel's centre. The box keeps the size the
params drew (gpumix.params.saliencymix_sizes) and moves the least needed to
lie inside the image, so its area, and lam, never depend on the image.

Unplaced boxes. Params are drawn before the images are seen, so a
SaliencyMix row's box first holds only its size, as ``(-h, 0, -w, 0)``
(which covers no pixel); :func:`place_boxes` and its table twins replace it
by the placed box. Placing is idempotent: placed rows are left alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gpumix.config import SALIENCYMIX
from gpumix.kernels import saliency as thumbs_kernel, table
from gpumix.kernels._launch import row_geometry, row_grid, row_view, run_parallel
from gpumix.kernels.saliency import boxes_at

THUMBNAIL = 64


def _reflect101_filter(a, weights, axis: int, xp):
    """Correlate ``a`` along ``axis`` (-1 or -2) with odd-length ``weights``,
    reflect-101 borders (``pad`` mode "reflect": d c b | a b c d | c b a)."""
    r = len(weights) // 2
    n = a.shape[axis]
    widths = [(0, 0)] * a.ndim
    widths[axis] = (r, r)
    padded = xp.pad(a, widths, mode="reflect")
    window = (lambda k: padded[..., k:k + n, :]) if axis == -2 else (
        lambda k: padded[..., k:k + n])
    out = weights[0] * window(0)
    for k in range(1, len(weights)):
        out += weights[k] * window(k)
    return out


def _blur(a, weights, xp):
    """Separable blur of the last two axes."""
    return _reflect101_filter(_reflect101_filter(a, weights, -2, xp), weights, -1, xp)


def gaussian_weights(size: int = 5, sigma: float = 8.0) -> np.ndarray:
    """A normalised 1-D Gaussian of ``size`` taps."""
    x = np.arange(size) - (size - 1) / 2
    w = np.exp(-x * x / (2 * sigma * sigma))
    return w / w.sum()


def spectral_residual(thumbnails, xp=np):
    """Saliency maps (S, T, T) float32 in [0, 1] of grey thumbnails (S, T, T).

    exp(R) F / |F| is computed as F exp(-box3(log|F|)) (the same number,
    without a complex division), in float32 / complex64. Amplitudes are
    floored at 1e-10 of each image's largest, so frequencies an image lacks
    (exact zeros, common in synthetic images) cannot blow the gain up."""
    spectrum = xp.fft.fft2(xp.asarray(thumbnails, dtype=xp.float32))
    amplitude = xp.abs(spectrum)
    floor = xp.maximum(amplitude.max(axis=(-2, -1), keepdims=True) * np.float32(1e-10),
                       np.float32(np.finfo(np.float32).tiny))
    log_amplitude = xp.log(xp.maximum(amplitude, floor))
    gain = xp.exp(-_blur(log_amplitude, np.full(3, 1 / 3, np.float32), xp))
    back = xp.abs(xp.fft.ifft2(spectrum * gain)).astype(xp.float32)
    smoothed = _blur(back, gaussian_weights().astype(np.float32), xp)
    smoothed *= smoothed
    peak = smoothed.max(axis=(-2, -1), keepdims=True)
    return smoothed / xp.where(peak > 0, peak, np.float32(1.0))


def peaks(maps, spatial_shape, xp=np):
    """(S, 2) int64 image pixels (y, x) under each map's arg-max."""
    s, t_h, t_w = maps.shape
    flat = xp.argmax(maps.reshape(s, -1), axis=1)
    h, w = spatial_shape
    y = xp.minimum(((flat // t_w) * 2 + 1) * h // (2 * t_h), h - 1)
    x = xp.minimum(((flat % t_w) * 2 + 1) * w // (2 * t_w), w - 1)
    return xp.stack([y, x], axis=1).astype(xp.int64)


def unplaced(method, box) -> np.ndarray:
    """Indices of the SaliencyMix rows whose box is not placed yet: a
    negative start on any axis (``(-h, 0, -w, 0)`` holds the sides)."""
    method = np.asarray(method)
    if SALIENCYMIX not in set(method.tolist()):
        return np.zeros(0, np.int64)
    negative = np.any(np.asarray(box)[:, 0::2] < 0, axis=1)
    return np.flatnonzero((method == SALIENCYMIX) & negative)


def _fine_grained_peaks(images, layout, samples, spatial_shape):
    """Peaks of OpenCV's fine-grained saliency on the full-size grey images."""
    try:
        import cv2
    except ImportError as error:
        raise ImportError("saliency='fine_grained' needs OpenCV's contrib modules: pip install "
                          "opencv-contrib-python-headless") from error
    grey = thumbs_kernel.grey_images(images, layout, samples)
    if images.dtype != np.uint8:  # OpenCV's detector takes 0..255 bytes
        low = grey.min(axis=(1, 2), keepdims=True)
        span = grey.max(axis=(1, 2), keepdims=True) - low
        grey = (grey - low) * (255 / np.where(span > 0, span, 1))
    detector = cv2.saliency.StaticSaliencyFineGrained_create()
    maps = []
    for g in grey:
        ok, found = detector.computeSaliency(np.clip(np.rint(g), 0, 255).astype(np.uint8))
        if not ok:
            raise RuntimeError("OpenCV's fine-grained saliency failed")
        maps.append(found)
    return peaks(np.asarray(maps, np.float64), spatial_shape)  # full size: pixel = index


def host_centres(images: np.ndarray, layout: str, samples, method: str = "spectral_residual"):
    """(S, 2) saliency peaks of the listed samples of a NumPy batch."""
    spatial = _spatial(images.shape, layout)
    if method == "fine_grained":
        return _fine_grained_peaks(images, layout, samples, spatial)
    source = images.astype(np.float32) if images.dtype == np.float16 else images
    view = row_view(np.ascontiguousarray(source), layout)
    channels = view.rows.shape[1] // view.height if view.cstride == 1 else view.cstride
    thumbs = np.empty((len(samples), THUMBNAIL, THUMBNAIL), np.float32)
    thumbs_kernel.cpu(view.rows, samples, view.height, view.cstride, channels, out=thumbs)
    centres = np.empty((len(samples), 2), np.int64)

    def peaks_of(lo, hi):  # NumPy's FFTs and ufuncs release the GIL: chunks run in parallel
        centres[lo:hi] = peaks(spectral_residual(thumbs[lo:hi]), spatial)

    run_parallel(peaks_of, len(samples))
    return centres


def place_boxes(images, params, layout: str, method: str = "spectral_residual", stream=None):
    """``params`` with every unplaced SaliencyMix box centred on its partner's
    saliency peak (see the module docstring); the same params when none is
    unplaced. NumPy images, or CUDA arrays on ``stream`` (a Numba or CuPy
    stream; their peaks are copied to the host: one wait, outside the CUDA
    fast paths, which place on the device)."""
    todo = unplaced(params.method, params.box)
    if todo.size == 0:
        return params
    partners = params.pair[todo]
    if hasattr(images, "__cuda_array_interface__") and not isinstance(images, np.ndarray):
        import cupy as cp

        from gpumix import runtime
        from gpumix.kernels._launch import cupy_stream, upload_many

        with cupy_stream(stream):
            (partners_dev,) = upload_many([(partners, np.int64)], stream)
            centres = device_peaks(images, layout, runtime.DeviceArray.of(partners_dev),
                                   cp.cuda.get_current_stream().ptr,
                                   runtime.active_launcher()).owner.get()
    else:
        centres = host_centres(np.asarray(images), layout, partners, method)
    box = params.box.copy()
    box[todo] = boxes_at(centres, _sizes(box[todo]), _spatial(images.shape, layout))
    return dataclasses.replace(params, box=box)


def place_rows(images, rows: np.ndarray, layout: str, method: str = "spectral_residual") -> None:
    """:func:`place_boxes` on a host params table, in place; ``images`` a
    NumPy batch or a sequence of its samples."""
    if not table.uses(rows, SALIENCYMIX):
        return
    todo = unplaced(rows[:, table.METHOD], rows[:, table.Y0:table.X1 + 1])
    if todo.size == 0:
        return
    partners = rows[todo, table.PAIR].astype(np.int64)
    if isinstance(images, (list, tuple)):
        images, partners = np.stack([images[j] for j in partners]), np.arange(todo.size)
    centres = host_centres(images, layout, partners, method)
    box = rows[todo, table.Y0:table.X1 + 1].astype(np.int64)
    rows[todo, table.Y0:table.X1 + 1] = boxes_at(centres, _sizes(box),
                                                 _spatial((0, *images.shape[1:]), layout))


def _sizes(box):
    return np.stack([box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]], axis=1)


def _spatial(shape, layout):
    return (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])


def device_peaks(images, layout: str, samples, stream: int, launcher):
    """Peaks (S, 2) int64 of the listed samples (a device int64 array) of a
    CUDA batch, made on ``stream``: the thumbnail kernel, then CuPy's FFTs;
    returned as a DeviceArray of a CuPy array."""
    import cupy as cp

    from gpumix import runtime
    from gpumix.kernels._launch import StreamHandle, cupy_stream
    from gpumix.mixing import as_cupy

    x = images if isinstance(images, runtime.DeviceArray) else runtime.DeviceArray.of(
        as_cupy(images))
    (b, n_rows, n_cols), height, cstride = row_geometry(x.shape, layout)
    channels = n_rows // height if cstride == 1 else cstride
    n = samples.shape[0]
    with cupy_stream(StreamHandle(stream)):
        thumbs = cp.empty((n, THUMBNAIL, THUMBNAIL), cp.float32)
        grid, block = row_grid(n * THUMBNAIL, THUMBNAIL)
        runtime.launch(thumbs_kernel.cuda_kernel, grid, block, stream,
                       (x.reshape(b, n_rows, n_cols), samples, height, cstride, channels,
                        runtime.DeviceArray.of(thumbs)), launcher)
        return runtime.DeviceArray.of(peaks(spectral_residual(thumbs, cp),
                                            _spatial(x.shape, layout), cp))


def place_device_rows(images, device_rows, host_rows, layout: str, stream: int, device,
                      launcher, upload=None):
    """Place the unplaced SaliencyMix boxes of a device params table on
    ``stream`` without waiting: which rows and their partners come from the
    host copy of the table (one upload), the peaks and boxes stay on the
    device (the launcher's saliency peaks, then gpumix.kernels.saliency's
    place kernel). ``upload(host) -> DeviceArray``: how the indices go up
    (default: the launcher's upload to ``device``, on torch's stream)."""
    from gpumix import runtime

    if not table.uses(host_rows, SALIENCYMIX):
        return
    todo = unplaced(host_rows[:, table.METHOD], host_rows[:, table.Y0:table.X1 + 1])
    if todo.size == 0:
        return
    n = todo.size
    upload = upload or (lambda host: launcher.upload(host, device))
    both = upload(np.stack([todo, host_rows[todo, table.PAIR].astype(np.int64)]))
    todo_dev = runtime.DeviceArray(both.ptr, (n,), (8,), np.dtype(np.int64), both.owner)
    partners = runtime.DeviceArray(both.ptr + 8 * n, (n,), (8,), np.dtype(np.int64), both.owner)
    centres = launcher.saliency_peaks(images, layout, partners, stream)
    h, w = _spatial(images.shape, layout)
    runtime.launch(thumbs_kernel.place_kernel, (max(1, -(-n // 64)),), 64, stream,
                   (device_rows, todo_dev, centres, h, w), launcher)
