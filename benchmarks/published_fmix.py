"""The published FMix per-mask sampler (ecs-vlc/FMix, fmix.py: sample_mask =
make_low_freq_image + binarise_mask), restated for benchmarking only.

One mask per call: legacy ``np.random`` normals, a float64 complex spectrum
(with the published height-axis slice), ``irfftn``, normalisation, a full
argsort, then the ceil/floor coin. This is the cost gpumix's batched
per-sample masks are compared against."""

from __future__ import annotations

import math
import random

import numpy as np


def _frequencies(h: int, w: int) -> np.ndarray:
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[: w // 2 + (2 if w % 2 else 1)]
    return np.sqrt(fx * fx + fy * fy)


def low_freq_image(decay_power: float, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    freqs = _frequencies(h, w)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(w, h)) ** decay_power
    param = np.random.randn(1, *freqs.shape, 2)
    spectrum = scale[None, :, :, None] * param
    spectrum = spectrum[:, 0] + 1j * spectrum[:, 1]  # the published slice
    grey = np.real(np.fft.irfftn(spectrum, shape, axes=(-2, -1)))[:1, :h, :w]
    grey = grey - grey.min()
    return grey / grey.max()


def binarise(grey: np.ndarray, lam: float, shape, max_soft: float = 0.0) -> np.ndarray:
    order = grey.reshape(-1).argsort()[::-1]
    flat = grey.reshape(-1).copy()
    num = math.ceil(lam * flat.size) if random.random() > 0.5 else math.floor(lam * flat.size)
    soft = max_soft if max_soft <= min(lam, 1 - lam) else min(lam, 1 - lam)
    width = int(flat.size * soft)
    low, high = num - width, num + width
    flat[order[:high]] = 1
    flat[order[low:]] = 0
    flat[order[low:high]] = np.linspace(1, 0, high - low)
    return flat.reshape((1, *shape))


def sample_mask(alpha: float, decay_power: float, shape, max_soft: float = 0.0):
    lam = np.random.beta(alpha, alpha)
    return lam, binarise(low_freq_image(decay_power, shape), lam, shape, max_soft)
