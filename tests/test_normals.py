"""gpumix.kernels.normals: counter-based ziggurat normals (the FMix spectra).

The CPU kernel against the vectorised NumPy reference (bit-equal, slow paths
included), the tables against the ziggurat's defining equations and
Marsaglia & Tsang's published tail start, and the output against N(0, 1)
(KS and chi-square tests, tail mass, independence across keys)."""

import math

import numpy as np
import pytest
from scipy import stats

from gpumix import fmix
from gpumix.kernels import normals

KEYS = np.array([0, 1, 2, 12345, 2**62 - 1, 2**40 + 7])


def test_tables_solve_the_strip_equations():
    x, f, k_bound, w_scale, r = normals.ziggurat_tables()
    # Marsaglia & Tsang (2000), 256 strips: r = 3.6541528853610088.
    assert r == pytest.approx(3.6541528853610088, rel=1e-14)
    v = r * math.exp(-r * r / 2) + math.sqrt(math.pi / 2) * math.erfc(r / math.sqrt(2))
    strip_areas = x[1:-1] * (f[2:] - f[1:-1])          # strips 1 .. 255
    np.testing.assert_allclose(strip_areas, v, rtol=1e-10)
    assert x[0] * f[1] == pytest.approx(v, rel=1e-14)  # the base strip's pseudo-width
    assert x[-1] == 0.0 and f[-1] == 1.0 and np.all(np.diff(x) < 0)
    assert k_bound.dtype == np.uint64 and k_bound[-1] == 0
    np.testing.assert_allclose(w_scale, x[:-1] / 2.0**53)


@pytest.mark.parametrize("count", [1, 2, 7, 4096, 40001])
def test_cpu_kernel_equals_reference(count):
    np.testing.assert_array_equal(normals.cpu(KEYS, count), normals.reference(KEYS, count))


def test_reference_exercises_the_wedge_and_tail_paths():
    x = normals.reference(KEYS, 40001)
    r = normals.ziggurat_tables()[4]
    assert (np.abs(x) > r).sum() >= 10   # tail draws (about 2.6e-4 of outputs)
    assert np.array_equal(normals.cpu(KEYS, 40001), x)


def test_pair_scale_multiplies_both_members_of_a_pair():
    scale = np.linspace(0.5, 3.0, 500).astype(np.float32)
    plain = normals.cpu(KEYS, 1000)
    scaled = normals.cpu(KEYS, 1000, pair_scale=scale)
    np.testing.assert_array_equal(scaled, plain * np.repeat(scale, 2))
    np.testing.assert_array_equal(scaled, normals.reference(KEYS, 1000, pair_scale=scale))


def test_each_output_depends_only_on_key_and_index():
    both = normals.cpu(np.array([5, 9]), 3000)
    np.testing.assert_array_equal(normals.cpu(np.array([9]), 3000)[0], both[1])
    np.testing.assert_array_equal(normals.cpu(np.array([5]), 1000)[0], both[0, :1000])
    assert not np.array_equal(both[0], both[1])


def test_outputs_are_standard_normal():
    x = normals.cpu(np.arange(40), 50_000).ravel().astype(np.float64)
    assert stats.kstest(x, "norm").pvalue > 1e-3
    edges = stats.norm.ppf(np.linspace(0, 1, 101)[1:-1])
    counts = np.bincount(np.searchsorted(edges, x), minlength=100)
    assert stats.chisquare(counts).pvalue > 1e-3
    r = normals.ziggurat_tables()[4]
    tail = (np.abs(x) > r).sum()
    expected = x.size * 2 * stats.norm.sf(r)
    assert abs(tail - expected) < 5 * math.sqrt(expected)
    assert abs(x.mean()) < 5 / math.sqrt(x.size)
    assert abs(x.var() - 1) < 5 * math.sqrt(2 / x.size)


def test_streams_of_neighbouring_keys_are_uncorrelated():
    x = normals.cpu(np.arange(16), 20_000).astype(np.float64)
    corr = np.corrcoef(x)[np.triu_indices(16, 1)]
    assert np.abs(corr).max() < 5 / math.sqrt(20_000)
    lagged = np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1]  # neighbouring indices
    assert abs(lagged) < 5 / math.sqrt(x.size)


def test_fmix_normals_from_keys_are_the_kernel_normals():
    freq = fmix.frequency_shape((9, 7))
    got = fmix.normals_from_keys(KEYS[:3], freq)
    assert got.shape == (3, *freq, 2) and got.dtype == np.float32
    np.testing.assert_array_equal(got.reshape(3, -1), normals.reference(KEYS[:3], 2 * 9 * 4))


@pytest.mark.parametrize("keys,count,scale,message", [
    (np.array([-1]), 4, None, "keys must be non-negative integers"),
    (np.array([0.5]), 4, None, "keys must be non-negative integers"),
    (np.array([1]), -1, None, "count must be in"),
    (np.array([1]), 4, np.ones(3, np.float32), "pair_scale must be float32 of shape"),
    (np.array([1]), 4, np.ones(2, np.float64), "pair_scale must be float32 of shape"),
])
def test_bad_arguments_are_named(keys, count, scale, message):
    with pytest.raises(ValueError, match=message):
        normals.cpu(keys, count, pair_scale=scale)


@pytest.mark.cuda
def test_cuda_kernel_gives_the_cpu_numbers():
    import cupy as cp

    scale = np.linspace(0.5, 2.0, 25_000).astype(np.float32)
    out = cp.zeros((len(KEYS), 50_000), cp.float32)
    normals.cuda(KEYS, 50_000, out=out, pair_scale=scale)
    expected = normals.cpu(KEYS, 50_000, pair_scale=scale)
    # Fast-path outputs are bit-equal; the rare wedge/tail ones go through
    # exp/log, whose last bit may differ between libm and libdevice.
    got = out.get()
    assert np.mean(got == expected) > 0.999
    np.testing.assert_allclose(got, expected, rtol=1e-6)
