"""FMix masks: the published code's maths (reference_compatible), the paper's
isotropic default, exact k, soft ramps, and 1-D/3-D shapes."""

import numpy as np
import pytest

import gpumix
from gpumix import fmix
from gpumix.config import FMIX


def published_grey(normals_one, shape, decay_power):
    """The maths of ecs-vlc/FMix make_low_freq_image for one 2-D mask, written
    out independently (float64, as the published code runs): frequency grid
    with its odd-width extra column, the height-axis complex slice, irfftn."""
    h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[: w // 2 + (2 if w % 2 else 1)]
    freqs = np.sqrt(fx * fx + fy * fy)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(w, h)) ** decay_power
    spectrum = scale[None, :, :, None] * normals_one[None].astype(np.float64)  # (1, H, Wf, 2)
    complex_spectrum = spectrum[:, 0] + 1j * spectrum[:, 1]
    return np.real(np.fft.irfftn(complex_spectrum, (h, w), axes=(-2, -1)))[0]


@pytest.mark.parametrize("shape", [(32, 32), (24, 31), (17, 40), (7, 1), (6, 1), (2, 5)])
def test_reference_compatible_grey_matches_published_maths(shape):
    rng = np.random.default_rng(0)
    freq = fmix.frequency_shape(shape, reference_compatible=True)
    normals = rng.standard_normal((3, *freq, 2)).astype(np.float32)
    ours = fmix.grey_images(normals, shape, 3.0, reference_compatible=True)
    for i in range(3):
        theirs = published_grey(normals[i], shape, 3.0)
        np.testing.assert_allclose(ours[i], theirs, rtol=0, atol=2e-5 * np.abs(theirs).max())
        # and the binarised masks agree (argsort of the published maths)
        k = int(0.4 * ours[i].size)
        published_mask = np.zeros(ours[i].size)
        published_mask[np.argsort(-theirs.ravel(), kind="stable")[:k]] = 1
        ours_mask = fmix.masks_from_grey(ours[i][None], [k], [k])[0].ravel()
        assert np.mean(ours_mask != published_mask) < 1e-3  # float32 vs float64 near-ties


def horizontal_energy_outside_0_and_1(grey):
    spectrum = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
    kx = np.abs(np.fft.fftfreq(grey.shape[1]) * grey.shape[1])
    return spectrum[:, kx > 1.5].sum() / spectrum.sum()


def test_published_masks_are_banded_and_default_masks_are_isotropic():
    rng = np.random.default_rng(1)
    shape = (64, 64)
    banded = fmix.grey_images(rng.standard_normal((4, *fmix.frequency_shape(shape, True), 2)),
                              shape, 3.0, reference_compatible=True)
    paper = fmix.grey_images(rng.standard_normal((4, *fmix.frequency_shape(shape), 2)),
                             shape, 3.0)
    for g in banded:
        assert horizontal_energy_outside_0_and_1(g) < 1e-8
    for g in paper:
        assert horizontal_energy_outside_0_and_1(g) > 1e-3
    # isotropic on average: energy along kx and ky is balanced
    spectra = np.mean([np.abs(np.fft.fft2(g)) ** 2 for g in paper], axis=0)
    assert 0.2 < spectra[0, 2:8].sum() / spectra[2:8, 0].sum() < 5


@pytest.mark.parametrize("reference_compatible", [False, True])
@pytest.mark.parametrize("shape", [(50,), (51,), (24, 19), (32, 32), (5, 6, 7)])
def test_cpu_inverse_fft_matches_numpy(shape, reference_compatible):
    """The CPU grey images (ducc0's c2r, in slices on every core) equal NumPy's
    irfftn of the same spectra to float32 rounding, including the crop and
    zero-padding that irfftn(s=shape) applies to the published spectra."""
    rng = np.random.default_rng(4)
    freq = fmix.frequency_shape(shape, reference_compatible)
    spectra = rng.standard_normal((9, *freq, 2)).astype(np.float32)
    ours = fmix.grey_from_spectra(spectra, shape, np, reference_compatible)
    if reference_compatible:
        complex_spectra = spectra[:, 0] + 1j * spectra[:, 1]
    else:
        complex_spectra = spectra[..., 0] + 1j * spectra[..., 1]
    axes = tuple(range(-len(shape), 0))
    theirs = np.fft.irfftn(complex_spectra.astype(np.complex128), s=shape, axes=axes)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6 * np.abs(theirs).max())


@pytest.mark.parametrize("shape", [(50,), (12, 9), (5, 6, 7)])
def test_masks_in_one_two_and_three_dimensions_have_exactly_k_ones(shape):
    rng = np.random.default_rng(2)
    normals = rng.standard_normal((4, *fmix.frequency_shape(shape), 2))
    grey = fmix.grey_images(normals, shape, 3.0)
    assert grey.shape == (4, *shape)
    k, lo, hi = fmix.rank_bounds(rng.random(4), int(np.prod(shape)), rng.random(4) < 0.5, 0.0)
    masks = fmix.masks_from_grey(grey, lo, hi)
    np.testing.assert_array_equal(masks.reshape(4, -1).sum(axis=1), k)


def test_hard_mask_lam_is_k_over_n_and_k_rounds_both_ways():
    config = gpumix.MixConfig(mixup_alpha=0.0, fmix_alpha=1.0, mode="elem")
    rounded = set()  # how k sits against the drawn lam * N: above (ceil), below (floor)
    for seed in range(30):
        drawn = gpumix.draw(config, 8, (7, 9), np.random.default_rng(seed)).lam_fmix
        params = gpumix.sample(config, 8, (7, 9), np.random.default_rng(seed))
        assert params.method.tolist() == [FMIX] * 8
        for i in range(8):
            k = int(params.mask[i].sum())
            assert params.lam[i] == np.float32(k / 63)
            assert np.floor(drawn[i] * 63) <= k <= np.ceil(drawn[i] * 63)
            rounded.add(np.sign(k - drawn[i] * 63))
    assert {-1.0, 1.0} <= rounded  # both ways, each with probability 1/2


def test_soft_masks_ramp_and_lam_is_their_mean():
    config = gpumix.MixConfig(mixup_alpha=0.0, fmix_alpha=1.0, mode="elem", max_soft=0.2)
    params = gpumix.sample(config, 16, (20, 20), np.random.default_rng(3))
    for m, lam in zip(params.mask, params.lam):
        assert m.min() >= 0 and m.max() <= 1
        assert lam == pytest.approx(m.mean(), abs=1e-6)
    assert np.any((params.mask > 0) & (params.mask < 1))


@pytest.mark.parametrize("reference_compatible", [False, True])
def test_cpu_mask_maker_equals_the_staged_references_across_batch_sizes(reference_compatible):
    """The fused maker (slices of keys -> spectra -> grey -> masks, reused
    buffers) against the stages' NumPy references run on the whole batch, for
    batches that grow and shrink between calls (stale buffer contents must
    never leak into a result)."""
    from gpumix.kernels import mask_select, normals

    shape = (24, 19)
    n_pix = 24 * 19
    make = fmix.cpu_mask_maker(shape, 3.0, reference_compatible)
    freq = fmix.frequency_shape(shape, reference_compatible)
    scale = fmix.spectrum_scale(shape, 3.0, reference_compatible=reference_compatible)
    rng = np.random.default_rng(5)
    for n in (3, 40, 1, 17):
        keys = rng.integers(0, 2**62, n)
        k, lo, hi = fmix.rank_bounds(rng.random(n), n_pix, rng.random(n) < 0.5,
                                     0.1 if n == 17 else 0.0)
        spectra = normals.reference(keys, 2 * int(np.prod(freq))).reshape(n, *freq, 2)
        spectra = spectra * scale.astype(np.float32)[..., None]
        if reference_compatible:
            complex_spectra = (spectra[:, 0] + 1j * spectra[:, 1]).astype(np.complex64)
        else:
            complex_spectra = (spectra[..., 0] + 1j * spectra[..., 1]).astype(np.complex64)
        grey = np.fft.irfftn(complex_spectra, s=shape, axes=(1, 2)).astype(np.float32)
        expected = mask_select.reference(grey.reshape(n, -1), lo, hi).reshape(n, *shape)
        np.testing.assert_array_equal(make(keys, lo, hi), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(32, 32), (31, 20)])
@pytest.mark.parametrize("reference_compatible", [False, True])
def test_cuda_grey_images_match_the_cpu(shape, reference_compatible):
    import cupy as cp

    rng = np.random.default_rng(0)
    freq = fmix.frequency_shape(shape, reference_compatible)
    spectra = rng.standard_normal((4, *freq, 2)).astype(np.float32)
    cpu = fmix.grey_from_spectra(spectra, shape, np, reference_compatible)
    for _ in range(2):  # the second call runs the kept cuFFT plan
        gpu = fmix.grey_from_spectra(cp.asarray(spectra), shape, cp, reference_compatible)
        assert gpu.dtype == cp.float32
        np.testing.assert_allclose(gpu.get(), cpu, rtol=1e-4, atol=1e-5 * np.abs(cpu).max())
