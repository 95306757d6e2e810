"""The fast path's two CUDA kernels under the simulator, bit for bit against
their CPU twins and the NumPy oracles, over every method, both layouts, the
output dtypes, odd sizes and in-place mixing by pairs.

    kernels/mix_normalize.py   the hand-off: mix + normalise + layout + dtype
    kernels/table_mix.py       one launch for every method, plus the targets
"""

import numba
import numpy as np
import pytest

import gpumix
from gpumix import mixing
from gpumix.kernels import mix_normalize, table_mix
from gpumix.kernels._launch import row_view
from gpumix.params import sample, to_table

assert numba.config.ENABLE_CUDASIM, "collected only in the simulator process"

GRID, BLOCK = (2, 3), 8  # forces both grid-stride loops to wrap
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
ALL = dict(mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, mode="elem")


def batch_and_table(rng, b=5, h=5, w=7, pairing="permutation", **options):
    images = rng.integers(0, 256, (b, h, w, 3), np.uint8)
    config = gpumix.MixConfig(num_classes=4, pairing=pairing, **{**ALL, **options})
    params = sample(config, b, (h, w), rng)
    labels = rng.integers(0, 4, b)
    return images, params, to_table(params, (h, w), config, labels), labels, config


@pytest.mark.parametrize("chw", [True, False], ids=["CHW", "HWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_handoff_kernel_equals_its_cpu_twin(chw, dtype, seed):
    rng = np.random.default_rng(seed)
    images, params, rows, _, _ = batch_and_table(rng)
    b, h, w, c = images.shape
    mean = np.asarray(MEAN, np.float32)
    inv_std = (np.float32(1) / np.asarray(STD, np.float32)).astype(np.float32)
    masks = params.mask if params.mask is not None else np.zeros((1, 1, 1), np.float32)
    out = np.zeros((b, c, h, w) if chw else (b, h, w, c), dtype)
    mix_normalize.cuda_kernel.kernel[GRID, BLOCK](images, rows, masks, mean, inv_std, chw, out)
    twin = np.zeros(out.shape, np.float32)
    mix_normalize.cpu(images, rows, masks, mean, inv_std, chw, out=twin)
    np.testing.assert_array_equal(out, twin.astype(dtype))
    np.testing.assert_array_equal(
        out, mix_normalize.reference(images, rows, params.mask, MEAN, STD, chw, dtype))
    assert len(set(params.method.tolist())) >= 2, "too few methods drawn"


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("pairing,by_pairs", [("flip", True), ("permutation", False)])
def test_table_mix_kernel_equals_reference_with_targets(layout, dtype, pairing, by_pairs):
    rng = np.random.default_rng(4)
    images, params, rows, labels, config = batch_and_table(rng, pairing=pairing)
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2)) if layout == "NCHW" else images
    x = x.astype(dtype) if dtype == np.uint8 else (x / np.float32(255)).astype(dtype)
    expected = mixing.reference_mix_images(x, params, layout)
    view = row_view(x.copy(), layout)
    out = view.rows if by_pairs else np.zeros_like(view.rows)  # in place by pairs
    targets = np.zeros((len(labels), 4), np.float32)
    error = np.zeros(1, np.int32)
    off, on = np.float32(0.1 / 4), np.float32(0.9 + 0.1 / 4)
    table_mix.cuda_kernel.kernel[GRID, BLOCK](
        view.rows, out, rows, params.mask, labels, targets, error, view.height, view.cstride,
        dtype == np.uint8, by_pairs, off, on)
    assert table_mix.is_involution(params.pair) == (pairing == "flip")
    np.testing.assert_array_equal(out.reshape(x.shape), expected)
    np.testing.assert_allclose(targets, mixing.reference_soft_targets(labels, params, 4, 0.1),
                               rtol=0, atol=1e-7)
    assert error[0] == 0


def test_table_mix_kernel_flags_a_bad_label():
    rng = np.random.default_rng(5)
    images, params, rows, labels, _ = batch_and_table(rng, b=3, mixup_alpha=1.0,
                                                      cutmix_alpha=0.0, fmix_alpha=0.0)
    labels = np.array([0, 9, 1])
    view = row_view(images.copy(), "NHWC")
    targets = np.zeros((3, 4), np.float32)
    error = np.zeros(1, np.int32)
    table_mix.cuda_kernel.kernel[GRID, BLOCK](
        view.rows, np.zeros_like(view.rows), rows, np.zeros((1, 1, 1), np.float32), labels,
        targets, error, view.height, view.cstride, True, False, np.float32(0), np.float32(1))
    assert error[0] == 1
    bad = {1} | set(np.flatnonzero(params.pair == 1).tolist())
    assert np.isnan(targets[sorted(bad)]).all()
    good = sorted(set(range(3)) - bad)
    assert not np.isnan(targets[good]).any()
