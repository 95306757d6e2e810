"""The CUDA kernels, run by the Numba CUDA simulator, against the NumPy
references (tiny shapes: the simulator is ~1 us per thread-element).

Launched with fewer threads than elements so the grid-stride loops wrap.
Run: ``NUMBA_ENABLE_CUDASIM=1 pytest tests/cudasim``."""

import numba
import numpy as np
import pytest

import gpumix
from gpumix.kernels import blend, box_paste, mask_mix, mask_select, normals, soft_targets
from gpumix.kernels._launch import row_view

assert numba.config.ENABLE_CUDASIM, "collected only in the simulator process"

GRID, BLOCK = (2, 3), 8  # 2 x 3 blocks of 8 threads: forces both stride loops to wrap


def images(rng, dtype, layout, shape=(4, 3, 5, 6)):
    x = rng.integers(0, 256, shape).astype(dtype) if dtype == np.uint8 else \
        (rng.random(shape) * 2 - 1).astype(dtype)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x


def params_for(rng, **options):
    config = gpumix.MixConfig(mode="elem", pairing="permutation", num_classes=5, **options)
    return gpumix.sample(config, 4, (5, 6), rng)


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_blend_kernel(dtype, layout):
    rng = np.random.default_rng(1)
    x = images(rng, dtype, layout)
    p = params_for(rng, mixup_alpha=1.0)
    samples = np.array([0, 2, 3])
    out = np.zeros_like(x)
    v = row_view(x, layout)
    blend.cuda_kernel.kernel[GRID, BLOCK](v.rows, p.pair, p.lam, samples, dtype == np.uint8,
                                          row_view(out, layout).rows)
    expected = blend.reference(x, p.pair, p.lam, samples)
    np.testing.assert_array_equal(out[samples], expected[samples])
    assert not out[1].any()  # unlisted samples untouched


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.int64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_box_paste_kernel(dtype, layout):
    rng = np.random.default_rng(2)
    x = images(rng, dtype, layout)
    p = params_for(rng, mixup_alpha=0.0, cutmix_alpha=1.0)
    out = np.zeros_like(x)
    v = row_view(x, layout)
    box_paste.cuda_kernel.kernel[GRID, BLOCK](v.rows, p.pair, p.box, np.arange(4), v.height,
                                              v.cstride, row_view(out, layout).rows)
    np.testing.assert_array_equal(out, box_paste.reference(x, p.pair, p.box, layout))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("max_soft", [0.0, 0.25])
def test_mask_mix_kernel(dtype, layout, max_soft):
    rng = np.random.default_rng(3)
    x = images(rng, dtype, layout)
    p = params_for(rng, mixup_alpha=0.0, fmix_alpha=1.0, max_soft=max_soft)
    out = np.zeros_like(x)
    v = row_view(x, layout)
    mask_mix.cuda_kernel.kernel[GRID, BLOCK](v.rows, p.pair, p.mask, np.arange(4), v.height,
                                             v.cstride, dtype == np.uint8, False,
                                             row_view(out, layout).rows)
    np.testing.assert_array_equal(out, mask_mix.reference(x, p.pair, p.mask, layout))


def test_mask_mix_kernel_pastes_dense_maps():
    rng = np.random.default_rng(4)
    dense = rng.integers(0, 50, (4, 5, 6)).astype(np.int64)
    p = params_for(rng, mixup_alpha=0.0, fmix_alpha=1.0, max_soft=0.3)
    out = np.zeros_like(dense)
    mask_mix.cuda_kernel.kernel[GRID, BLOCK](dense, p.pair, p.mask, np.arange(4), 5, 1, False,
                                             True, out)
    np.testing.assert_array_equal(out, mask_mix.reference(dense, p.pair, p.mask, "NHW",
                                                          paste=True))


def test_soft_targets_kernel():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 5, 6)
    pair = np.array([5, 4, 3, 2, 1, 0])
    lam = np.array([0.0, 0.3, 1.0, 0.5, 0.7, 0.25], np.float32)
    off, on = soft_targets.smoothing_values(5, 0.1)
    out = np.zeros((6, 5), np.float32)
    soft_targets.cuda_kernel.kernel[GRID, BLOCK](labels, pair, lam, off, on, out)
    np.testing.assert_array_equal(out, soft_targets.reference(labels, pair, lam, 5, 0.1))


@pytest.mark.parametrize("threads", [8, 5])
def test_selection_kernel_hard_masks(threads):
    rng = np.random.default_rng(6)
    grey = rng.standard_normal((6, 37)).astype(np.float32)
    grey[0] = 1.5                           # every value tied
    grey[1, ::2] = 0.0
    grey[1, 1::4] = -0.0
    grey[2] = np.round(grey[2])             # many ties
    k = np.array([20, 11, 18, 0, 37, 1])
    out = np.zeros_like(grey)
    mask_select.cuda(grey.view(np.uint32), k, out=out, threads=threads)
    np.testing.assert_array_equal(out, mask_select.reference(grey, k, k))


# uint64 hashing wraps by design; NumPy scalars (the simulator's) warn on it.
@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("scaled", [False, True])
def test_normals_kernel(scaled):
    keys = np.array([3, 2**62 - 5])
    count = 1800
    x_edge, f_edge, k_bound, w_scale, r = normals.ziggurat_tables()
    assert (np.abs(normals.reference(keys, count)) > r).any()  # the tail path is taken
    scale = np.linspace(0.25, 2.0, count // 2).astype(np.float32) if scaled else \
        np.ones(1, np.float32)
    out = np.zeros((2, count), np.float32)
    normals.cuda_kernel.kernel[3, 16](normals.lane_seeds(keys), count, x_edge, f_edge, k_bound,
                                      w_scale, r, scale, scaled, out)
    expected = normals.reference(keys, count, pair_scale=scale if scaled else None)
    np.testing.assert_array_equal(out, expected)
