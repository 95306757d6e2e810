"""FMix grey images and masks (Harris et al., "FMix: Enhancing Mixed Sample
Data Augmentation", arXiv:2002.12047; anchor: ecs-vlc/FMix ``fmix.py``).

A chain of short pure functions, each one step of the maths, written against
an array module ``xp`` (NumPy or CuPy) so the CPU and CUDA paths share it:

    frequency_magnitude(shape)                 |f| on the rfft grid
    spectrum_scale(shape, decay_power)         1 / max(|f|, 1/max(shape))**d
    grey_images(normals, shape, decay_power)   irfftn(scale * (a + i b)), batched
    rank_bounds(lam, n, round_up, max_soft)    k and the soft ramp's ranks
    masks_from_grey(grey, lo, hi)              kernels.mask_select (selection)

``normals`` has shape ``(n, *freq_shape, 2)``: the real and imaginary parts
of each sample's spectrum, drawn by the caller's seeded generator (or DALI's
random.normal), so masks can be replayed from their draws.

The published code builds its complex spectrum as ``s[:, 0] + 1j * s[:, 1]``,
slicing the height axis rather than the real/imaginary one, which keeps only
horizontal frequencies 0 and +-1 (banded masks). :func:`grey_images` follows
the paper by default; ``reference_compatible=True`` reproduces the published
maths from the same normal draws, including its odd-width frequency grid of
``W // 2 + 2`` columns. Supports 1-D, 2-D and 3-D shapes.
"""

from __future__ import annotations

import math

import numpy as np


def _rfft_frequencies(shape, xp, odd_extra_column: bool = False):
    """Per-axis frequency vectors on the rfft grid (last axis halved)."""
    *full_axes, last = shape
    axes = [xp.fft.fftfreq(n) for n in full_axes]
    last_freq = xp.fft.fftfreq(last) if odd_extra_column else xp.fft.rfftfreq(last)
    if odd_extra_column:
        last_freq = last_freq[: last // 2 + (2 if last % 2 == 1 else 1)]
    return axes + [xp.abs(last_freq)]


_NORMAL_POOL = None


def normals_from_keys(keys, freq_shape) -> np.ndarray:
    """Spectrum normals ``(n, *freq_shape, 2)`` float32, one stream per key.

    Each sample's normals are a deterministic function of its 62-bit key
    (NumPy's SFC64 seeded with it), so the single seeded source at the call
    site (a NumPy generator, or DALI's ``random.choice`` inside a pipeline)
    only draws n keys, and the expansion runs on all cores: NumPy releases
    the GIL while it fills, and DALI's own ``random.normal`` costs several
    times more for the 3.2 M normals of 64 masks of 224 x 224.
    """
    from concurrent.futures import ThreadPoolExecutor
    import os

    global _NORMAL_POOL
    keys = [int(k) for k in np.asarray(keys).reshape(-1)]
    out = np.empty((len(keys), *freq_shape, 2), np.float32)

    def fill(i):
        np.random.Generator(np.random.SFC64(keys[i])).standard_normal(out=out[i],
                                                                       dtype=np.float32)

    if len(keys) > 1:
        if _NORMAL_POOL is None:
            _NORMAL_POOL = ThreadPoolExecutor(os.cpu_count() or 1)
        list(_NORMAL_POOL.map(fill, range(len(keys))))
    elif keys:
        fill(0)
    return out


def frequency_shape(shape, reference_compatible: bool = False) -> tuple[int, ...]:
    """Shape of one spectrum (without the trailing re/im axis of 2)."""
    *full_axes, last = shape
    extra = 2 if (reference_compatible and last % 2 == 1) else 1
    return (*full_axes, last // 2 + extra)


def frequency_magnitude(shape, xp=np, reference_compatible: bool = False):
    """|f| = sqrt(sum of squared per-axis frequencies) on the spectrum grid."""
    axes = _rfft_frequencies(shape, xp, odd_extra_column=reference_compatible)
    grids = xp.meshgrid(*axes, indexing="ij")
    return xp.sqrt(sum(g * g for g in grids))


def spectrum_scale(shape, decay_power: float, xp=np, reference_compatible: bool = False):
    """Amplitude 1 / max(|f|, 1 / max(shape)) ** decay_power (float64)."""
    f = frequency_magnitude(shape, xp, reference_compatible)
    return 1.0 / xp.maximum(f, 1.0 / max(shape)) ** decay_power


def grey_images(normals, shape, decay_power: float, xp=np,
                reference_compatible: bool = False):
    """Batched low-frequency grey images ``(n, *shape)`` float32, one FFT call.

    ``normals``: ``(n, *frequency_shape(shape, reference_compatible), 2)``.
    """
    shape = tuple(int(s) for s in shape)
    scale = spectrum_scale(shape, decay_power, xp, reference_compatible).astype(xp.float32)
    normals = xp.ascontiguousarray(normals, dtype=xp.float32)
    axes = tuple(range(-len(shape), 0))
    if reference_compatible:
        spectrum = normals * scale[..., None]
        # The published line: index 0/1 of the axis after the batch (height
        # for 2-D), not of the re/im axis.
        complex_spectrum = (spectrum[:, 0] + 1j * spectrum[:, 1]).astype(xp.complex64)
    else:
        # (re, im) pairs are adjacent: view them as complex64, scale in one pass.
        complex_spectrum = normals.view(xp.complex64)[..., 0] * scale
    return xp.fft.irfftn(complex_spectrum, s=shape, axes=axes).astype(xp.float32, copy=False)


def rank_bounds(lam, n_pixels: int, round_up, max_soft: float):
    """(k, num_low, num_high) per sample: k = ceil or floor of lam * N.

    ``round_up`` (bool per sample) picks ceil, else floor (FMix draws that
    coin with probability 1/2). The soft ramp's half-width is
    ``int(N * min(max_soft, lam, 1 - lam))`` ranks on each side of k.
    """
    lam = np.asarray(lam, np.float64)
    exact = lam * n_pixels
    k = np.where(round_up, np.ceil(exact), np.floor(exact)).astype(np.int64)
    k = np.clip(k, 0, n_pixels)
    effective = np.minimum(max_soft, np.minimum(lam, 1.0 - lam))
    soft = (n_pixels * np.maximum(effective, 0.0)).astype(np.int64) if max_soft > 0 else 0 * k
    return k, np.clip(k - soft, 0, n_pixels), np.clip(k + soft, 0, n_pixels)


def masks_from_grey(grey: np.ndarray, num_low, num_high) -> np.ndarray:
    """CPU masks ``(n, *shape)`` float32 by rank selection (kernels.mask_select)."""
    from kernels import mask_select

    n = grey.shape[0]
    flat = mask_select.cpu(grey.reshape(n, -1), num_low, num_high)
    return flat.reshape(grey.shape)


def masks_from_grey_cuda(grey, num_low, num_high, stream=None):
    """CUDA masks from CuPy grey images: the selection kernel for hard masks,
    a sort for soft ones (the ramp needs the band's order)."""
    import cupy as cp

    from kernels import mask_select

    n = grey.shape[0]
    flat = cp.ascontiguousarray(grey.reshape(n, -1), dtype=cp.float32)
    lo = cp.asarray(num_low, dtype=cp.int64)
    hi = cp.asarray(num_high, dtype=cp.int64)
    out = cp.empty(flat.shape, cp.float32)
    if bool(np.all(np.asarray(num_low) == np.asarray(num_high))):
        mask_select.cuda(flat.view(cp.uint32), hi, out=out, stream=stream)
        return out.reshape(grey.shape)
    # Stable descending order: negate, then a stable sort keeps index order on ties.
    order = cp.argsort(-flat, axis=1, kind="stable")
    ranks = cp.empty_like(order)
    cp.put_along_axis(ranks, order, cp.arange(flat.shape[1])[None, :].repeat(n, 0), axis=1)
    lo = lo[:, None]
    hi = hi[:, None]
    width = cp.maximum(hi - lo - 1, 1)
    ramp = 1.0 - (ranks - lo) / width
    out = cp.where(ranks < lo, 1.0, cp.where(ranks >= hi, 0.0, ramp)).astype(cp.float32)
    return out.reshape(grey.shape)


def soft_lam(masks):
    """Label weight of soft masks: the mask mean per sample (float32)."""
    n = masks.shape[0]
    return masks.reshape(n, -1).astype("float64").mean(axis=1).astype("float32")


def cuda_mask_maker(shape, decay_power: float, reference_compatible: bool = False,
                    stream=None):
    """A ``fmix_masks`` callback for params_from_draws that makes masks on the
    GPU: normals go to the device once, cupy.fft makes the grey images and the
    selection kernel the masks; returns CuPy masks."""

    def make(normals, num_low, num_high):
        import cupy as cp

        from gpumix.mixing import cupy_stream

        with cupy_stream(stream):
            grey = grey_images(cp.asarray(normals), shape, decay_power, cp, reference_compatible)
            return masks_from_grey_cuda(grey, num_low, num_high, stream=stream)

    return make


def n_pixels(shape) -> int:
    return int(math.prod(shape))
