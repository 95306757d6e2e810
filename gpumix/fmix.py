"""FMix grey images and masks (Harris et al., "FMix: Enhancing Mixed Sample
Data Augmentation", arXiv:2002.12047; anchor: ecs-vlc/FMix ``fmix.py``).

A chain of short pure functions, each one step of the maths, written against
an array module ``xp`` (NumPy or CuPy) so the CPU and CUDA paths share it:

    frequency_magnitude(shape)                 |f| on the rfft grid
    spectrum_scale(shape, decay_power)         1 / max(|f|, 1/max(shape))**d
    normals_from_keys(keys, freq_shape)        a, b ~ N(0, 1) (gpumix.kernels.normals)
    grey_images(normals, shape, decay_power)   irfftn(scale * (a + i b)), batched
    rank_bounds(lam, n, round_up, max_soft)    k and the soft ramp's ranks
    masks_from_grey(grey, lo, hi)              gpumix.kernels.mask_select (selection)
    cpu_mask_maker / cuda_mask_maker           keys -> masks on one backend

``normals`` has shape ``(n, *freq_shape, 2)``: the real and imaginary parts
of each sample's spectrum. The seeded source at the call site draws one key
per sample; gpumix.kernels.normals expands it (counter-based, the same numbers on
CPU and CUDA), so masks can be replayed from their draws. The makers fuse
the amplitude scaling into that expansion, then run one batched inverse FFT
(ducc0's c2r on the CPU, in chunks on every core; cuFFT on the GPU) and
the selection.

The published code builds its complex spectrum as ``s[:, 0] + 1j * s[:, 1]``,
slicing the height axis rather than the real/imaginary one, which keeps only
horizontal frequencies 0 and +-1 (banded masks). :func:`grey_images` follows
the paper by default; ``reference_compatible=True`` reproduces the published
maths from the same normal draws, including its odd-width frequency grid of
``W // 2 + 2`` columns. Supports 1-D, 2-D and 3-D shapes.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

from gpumix.config import FMIX


def _rfft_frequencies(shape, xp, odd_extra_column: bool = False):
    """Per-axis frequency vectors on the rfft grid (last axis halved)."""
    *full_axes, last = shape
    axes = [xp.fft.fftfreq(n) for n in full_axes]
    last_freq = xp.fft.fftfreq(last) if odd_extra_column else xp.fft.rfftfreq(last)
    if odd_extra_column:
        last_freq = last_freq[: last // 2 + (2 if last % 2 == 1 else 1)]
    return axes + [xp.abs(last_freq)]


FFT_MIN_SAMPLES = 4  # fewest samples per threaded FFT slice


def normals_from_keys(keys, freq_shape, pair_scale=None, out=None) -> np.ndarray:
    """Spectrum normals ``(n, *freq_shape, 2)`` float32, one stream per key
    (each (re, im) pair times ``pair_scale``, flat per frequency, if given).

    Each sample's normals are a deterministic function of its 62-bit key
    (gpumix.kernels.normals: counter-based ziggurat), so the single seeded source at
    the call site (a NumPy generator, or DALI's ``random.choice`` inside a
    pipeline) only draws n keys, and the expansion runs on all cores. The
    CUDA path expands the same keys on the device into the same numbers.
    """
    from gpumix.kernels import normals

    keys = np.asarray(keys).reshape(-1)
    count = 2 * math.prod(freq_shape)
    flat = None if out is None else out.reshape(keys.size, count)
    return normals.cpu(keys, count, out=flat, pair_scale=pair_scale).reshape(
        keys.size, *freq_shape, 2)


def _fit_spectrum(spectrum, shape, xp=np):
    """The spectrum cropped or zero-padded to ``(n, *shape[:-1], shape[-1] // 2
    + 1)``, what c2r reads: NumPy's ``irfftn(s=shape)`` semantics, which the
    published maths relies on (its height-axis slice leaves axes of other
    lengths, and odd widths carry an extra column). A view when it fits."""
    target = (*shape[:-1], shape[-1] // 2 + 1)
    if spectrum.shape[1:] == target:
        return spectrum
    fitted = xp.zeros((spectrum.shape[0], *target), xp.complex64)
    common = tuple(slice(0, min(a, b)) for a, b in zip(spectrum.shape[1:], target))
    fitted[(slice(None), *common)] = spectrum[(slice(None), *common)]
    return fitted


_CUFFT_PLANS = {}  # (device, stream, spectrum shape, shape) -> cuFFT plan, for the process
_CUFFT_LOCK = threading.Lock()


def _cupy_irfftn(spectrum, shape, axes):
    """cuFFT c2r with one plan per device, stream and shape for the whole
    process. CuPy's own plan cache is per thread, and DALI calls
    python_function from threads whose Python state (threading.local
    included) is new at every call: a plan would be made and destroyed per
    batch, which cost more than the rest of a GPU pipeline's batch
    (benchmarks/GPU.md). A plan per stream, because its work area must not
    be shared by two streams at once."""
    import cupy as cp
    from cupyx.scipy import fft as cupy_fft

    spectrum = _fit_spectrum(cp.ascontiguousarray(spectrum), shape, cp)
    stream = cp.cuda.get_current_stream()
    key = (cp.cuda.Device().id, stream.ptr, spectrum.shape, shape)
    with _CUFFT_LOCK:
        plan = _CUFFT_PLANS.get(key)
        if plan is None:
            plan = _CUFFT_PLANS[key] = cupy_fft.get_fft_plan(spectrum, shape=shape, axes=axes,
                                                             value_type="C2R")
        with plan:
            grey = cp.fft.irfftn(spectrum, s=shape, axes=axes)
    return grey.astype(cp.float32, copy=False)


def _irfftn(spectrum, shape, xp, out=None):
    """Batched inverse real FFT over the trailing axes, float32 out. On the
    CPU, ducc0's (pocketfft's successor: SIMD across lines, the GIL
    released, about half the time of NumPy's FFT) in chunks of samples on
    all cores, into ``out`` when given. On CUDA, one cuFFT plan
    (:func:`_cupy_irfftn`)."""
    axes = tuple(range(-len(shape), 0))
    if xp is not np:
        return _cupy_irfftn(spectrum, shape, axes)
    import ducc0

    from gpumix.kernels._launch import run_parallel

    if out is None:
        out = np.empty((spectrum.shape[0], *shape), np.float32)
    spectrum = _fit_spectrum(spectrum, shape)

    def inverse(lo, hi):
        ducc0.fft.c2r(spectrum[lo:hi], axes=axes, lastsize=shape[-1], forward=False, inorm=2,
                      out=out[lo:hi], nthreads=1)

    run_parallel(inverse, spectrum.shape[0], min_items=FFT_MIN_SAMPLES)
    return out


def frequency_shape(shape, reference_compatible: bool = False) -> tuple[int, ...]:
    """Shape of one spectrum (without the trailing re/im axis of 2). The
    published code's extra column of an odd last axis is there only where
    ``fftfreq`` has it (not for a last axis of 1); its real and imaginary
    parts come from rows 0 and 1 of the first axis, which must exist."""
    *full_axes, last = shape
    if reference_compatible and shape[0] < 2:
        raise ValueError(f"reference_compatible FMix masks need at least 2 pixels along the "
                         f"first axis (the published code reads its rows 0 and 1), got shape "
                         f"{tuple(shape)}")
    extra = 2 if (reference_compatible and last % 2 == 1) else 1
    return (*full_axes, min(last // 2 + extra, max(last, 1)))


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
    spectra = xp.asarray(normals, dtype=xp.float32) * scale[..., None]
    return grey_from_spectra(spectra, shape, xp, reference_compatible)


def grey_from_spectra(spectra, shape, xp=np, reference_compatible: bool = False, out=None):
    """Grey images from scaled spectra ``(n, *freq_shape, 2)`` float32 (re, im)
    (NumPy: into ``out`` when given)."""
    spectra = xp.ascontiguousarray(spectra, dtype=xp.float32)
    if reference_compatible:
        # The published line: index 0/1 of the axis after the batch (height
        # for 2-D), not of the re/im axis.
        complex_spectrum = (spectra[:, 0] + 1j * spectra[:, 1]).astype(xp.complex64)
    else:
        complex_spectrum = spectra.view(xp.complex64)[..., 0]  # (re, im) pairs are adjacent
    return _irfftn(complex_spectrum, tuple(int(s) for s in shape), xp, out)


@functools.lru_cache(maxsize=16)
def _pair_scale(shape, decay_power, reference_compatible) -> np.ndarray:
    """The spectrum amplitudes, flat float32, for gpumix.kernels.normals' pair_scale
    (cached per shape: a pipeline asks for the same one every batch)."""
    scale = spectrum_scale(shape, decay_power, np, reference_compatible).astype(np.float32)
    scale.flags.writeable = False
    return scale.reshape(-1)


def rank_bounds(lam, n_pixels: int, round_up, max_soft: float):
    """(k, num_low, num_high) per sample: k = ceil or floor of lam * N.

    ``round_up`` (bool per sample) picks ceil, else floor (FMix draws that
    coin with probability 1/2). The soft ramp's half-width is
    ``int(N * min(max_soft, lam, 1 - lam))`` ranks on each side of k.
    """
    lam = np.asarray(lam, np.float64)
    exact = lam * n_pixels
    k = np.where(round_up, np.ceil(exact), np.floor(exact)).astype(np.int64)
    k = np.minimum(np.maximum(k, 0), n_pixels)  # np.clip's per-call cost is 5x this
    if max_soft <= 0:
        return k, k.copy(), k.copy()
    soft = (n_pixels * np.maximum(np.minimum(max_soft, np.minimum(lam, 1.0 - lam)), 0.0)
            ).astype(np.int64)
    return k, np.maximum(k - soft, 0), np.minimum(k + soft, n_pixels)


def masks_from_grey(grey: np.ndarray, num_low, num_high, out=None) -> np.ndarray:
    """CPU masks ``(n, *shape)`` float32 by rank selection (gpumix.kernels.mask_select),
    into ``out`` (float32, grey's shape) when given."""
    from gpumix.kernels import mask_select

    n = grey.shape[0]
    flat_out = None if out is None else out.reshape(n, -1)
    return mask_select.cpu(grey.reshape(n, -1), num_low, num_high,
                           out=flat_out).reshape(grey.shape)


def masks_from_grey_cuda(grey, num_low, num_high, stream=None):
    """CUDA masks from CuPy grey images: the selection kernel for hard masks,
    a sort for soft ones (the ramp needs the band's order)."""
    import cupy as cp

    from gpumix.kernels import mask_select

    from gpumix.kernels._launch import upload_many

    n = grey.shape[0]
    flat = cp.ascontiguousarray(grey.reshape(n, -1), dtype=cp.float32)
    # Pinned uploads on the current stream: the host never waits for them.
    lo, hi = upload_many([(num_low, np.int64), (num_high, np.int64)],
                         cp.cuda.get_current_stream())
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


def _spectrum_layout(shape, decay_power, reference_compatible):
    """(frequency shape, flat float32 amplitudes) of one spectrum, for the makers."""
    shape = tuple(int(s) for s in shape)
    return (frequency_shape(shape, reference_compatible),
            _pair_scale(shape, float(decay_power), bool(reference_compatible)))


def cpu_mask_maker(shape, decay_power: float, reference_compatible: bool = False,
                   buffers: dict | None = None):
    """The default ``fmix_masks`` callback of params_from_draws: spectrum keys
    in, NumPy masks out (normals kernel, ducc0's FFT, selection kernel).

    ``make(keys, num_low, num_high, out=None)`` writes into ``out`` when given.
    Its spectra and grey images live in ``buffers`` (a dict kept by a caller
    whose calls never overlap), else in the calling thread's scratch store.
    One parallel pass over slices of samples, each slice going keys ->
    spectra -> grey -> masks while its spectra are still in cache, instead of
    three passes over the batch with a barrier after each.
    """
    from gpumix.kernels._launch import run_parallel, scratch

    freq, scale = _spectrum_layout(shape, decay_power, reference_compatible)
    shape = tuple(int(s) for s in shape)

    def make(keys, num_low, num_high, out=None):
        keys = np.asarray(keys).reshape(-1)
        num_low, num_high = np.asarray(num_low, np.int64), np.asarray(num_high, np.int64)
        n = keys.size
        # Spectra and grey images are dead once the masks exist: reused buffers.
        spectra = scratch("fmix.spectra", (n, *freq, 2), np.float32, buffers)
        grey = scratch("fmix.grey", (n, *shape), np.float32, buffers)
        masks = np.empty((n, *shape), np.float32) if out is None else out
        if masks.shape != (n, *shape) or masks.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {(n, *shape)}, got "
                             f"{masks.dtype} {masks.shape}")

        def masks_of(lo, hi):
            normals_from_keys(keys[lo:hi], freq, pair_scale=scale, out=spectra[lo:hi])
            grey_from_spectra(spectra[lo:hi], shape, np, reference_compatible, out=grey[lo:hi])
            masks_from_grey(grey[lo:hi], num_low[lo:hi], num_high[lo:hi], out=masks[lo:hi])

        run_parallel(masks_of, n)
        return masks

    return make


def cuda_mask_maker(shape, decay_power: float, reference_compatible: bool = False,
                    stream=None):
    """The ``fmix_masks`` callback that makes masks on the GPU: the keys'
    normals are expanded on the device (the same numbers as on the CPU),
    cupy.fft makes the grey images and the selection kernel the masks;
    returns CuPy masks. Only the keys cross the bus."""

    from gpumix.kernels import normals

    freq, scale = _spectrum_layout(shape, decay_power, reference_compatible)

    def make(keys, num_low, num_high):
        import cupy as cp

        from gpumix.kernels._launch import cupy_stream

        keys = np.asarray(keys).reshape(-1)
        with cupy_stream(stream):
            spectra = cp.empty((keys.size, 2 * scale.size), cp.float32)
            normals.cuda(keys, spectra.shape[1], out=spectra, pair_scale=scale, stream=stream)
            grey = grey_from_spectra(spectra.reshape(keys.size, *freq, 2), shape, cp,
                                     reference_compatible)
            return masks_from_grey_cuda(grey, num_low, num_high, stream=stream)

    return make


def n_pixels(shape) -> int:
    return int(math.prod(shape))


def table_fmix(rows):
    """What a params table (gpumix.kernels.table, host rows) says of FMix:
    (indices of the rows that use it, their keys, rank lows, rank highs,
    decay power, reference_compatible); None when no row uses FMix."""
    from gpumix.kernels import table

    rows = np.asarray(rows)
    if not table.uses(rows, FMIX):
        return None
    used = np.flatnonzero(rows[:, table.METHOD] == FMIX)
    high, low, rank_low, rank_high = np.ascontiguousarray(
        rows[used][:, [table.KEY_HIGH, table.KEY_LOW, table.RANK_LOW, table.RANK_HIGH]].T,
        np.int64)
    first = rows[used[0]]
    return (used, (high << 31) | low, rank_low, rank_high, float(first[table.DECAY_POWER]),
            bool(first[table.REFERENCE]))


def masks_from_table(rows, shape):
    """CPU masks (B, H, W) float32 for a params table (zeros where a row
    does not use FMix), or None when no row uses FMix."""
    fmix = table_fmix(rows)
    if fmix is None:
        return None
    used, keys, low, high, decay_power, reference = fmix
    masks = np.zeros((len(rows), *shape), np.float32)
    masks[used] = cpu_mask_maker(tuple(shape), decay_power, reference)(keys, low, high)
    return masks


def masks_from_table_cuda(rows, shape, stream):
    """The CUDA twin of :func:`masks_from_table` (host rows in, CuPy masks
    out, made on ``stream`` with pinned uploads only), or None without FMix."""
    import cupy as cp

    from gpumix.kernels._launch import StreamHandle, cupy_stream, upload_many

    fmix = table_fmix(rows)
    if fmix is None:
        return None
    used, keys, low, high, decay_power, reference = fmix
    handle = StreamHandle(stream)
    with cupy_stream(handle):
        masks = cp.zeros((len(rows), *shape), cp.float32)
        (index,) = upload_many([(used, np.int64)], handle)
        masks[index] = cuda_mask_maker(tuple(shape), decay_power, reference, handle)(
            keys, low, high)
    return masks
