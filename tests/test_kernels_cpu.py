"""CPU kernels (through gpumix.mixing) against the NumPy references of kernels/*.

Same params into both; uint8 and masks must be equal, float within 1 ulp of
float32 (in practice the CPU kernels are bit-exact)."""

import dataclasses
import zlib

import numpy as np
import pytest
from numba import njit

import gpumix
from gpumix import mixing
from gpumix.kernels import mask_select, resize_paste, soft_targets
from gpumix.kernels._compress import compress_row, new_plans, plan_row
from gpumix.kernels._launch import row_view

DTYPES = [np.uint8, np.float16, np.float32]
LAYOUTS = ["NCHW", "NHWC"]
SHAPES = [(1, 3, 1, 1), (5, 3, 7, 11), (4, 1, 13, 6), (3, 4, 9, 9), (6, 3, 32, 24)]
CONFIGS = {
    "mixup": dict(mixup_alpha=0.8),
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "fmix": dict(mixup_alpha=0.0, fmix_alpha=1.0),
    "fmix_soft": dict(mixup_alpha=0.0, fmix_alpha=1.0, max_soft=0.2),
    "all": dict(mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, prob=0.8),
}


def make_images(rng, shape, dtype, layout):
    x = rng.integers(0, 256, shape).astype(dtype) if dtype == np.uint8 else \
        (rng.random(shape) * 4 - 2).astype(dtype)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x


def assert_close(actual, expected):
    if actual.dtype == np.uint8:
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_array_max_ulp(actual.astype(np.float32), expected.astype(np.float32), 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_mix_images_matches_reference(dtype, layout, shape, name, mode):
    rng = np.random.default_rng(zlib.crc32(repr((name, mode, shape)).encode()))  # per run too
    x = make_images(rng, shape, dtype, layout)
    config = gpumix.MixConfig(mode=mode, pairing="permutation", num_classes=3, **CONFIGS[name])
    spatial = (shape[2], shape[3])
    params = gpumix.sample(config, shape[0], spatial, rng)
    assert_close(gpumix.mix_images(x, params, layout), mixing.reference_mix_images(x, params, layout))


@pytest.mark.parametrize("dense_dtype", [np.int64, np.uint8, np.float32])
@pytest.mark.parametrize("name", ["cutmix", "fmix", "fmix_soft"])
def test_dense_maps_are_pasted_like_the_reference(dense_dtype, name):
    rng = np.random.default_rng(3)
    config = gpumix.MixConfig(mode="elem", **CONFIGS[name])
    params = gpumix.sample(config, 6, (10, 13), rng)
    dense = rng.integers(0, 200, (6, 10, 13)).astype(dense_dtype)
    mixed = gpumix.mix_dense(dense, params)
    np.testing.assert_array_equal(mixed, mixing.reference_mix_dense(dense, params))
    # pasted, never blended: every value comes from the primary or the partner
    partner = dense[params.pair]
    assert np.all((mixed == dense) | (mixed == partner))


def test_in_place_equals_out_of_place():
    rng = np.random.default_rng(4)
    x = make_images(rng, (8, 3, 16, 12), np.uint8, "NCHW")
    params = gpumix.sample(gpumix.MixConfig(mode="elem", **CONFIGS["all"]), 8, (16, 12), rng)
    expected = mixing.reference_mix_images(x, params, "NCHW")
    result = gpumix.mix_images(x, params, "NCHW", out=x)
    assert result is x
    np.testing.assert_array_equal(x, expected)


def test_an_out_sharing_the_input_memory_is_mixed_in_place():
    """Another view of the same memory (a torch tensor's .numpy() twice, or
    x[:]) is in place too: the kernels must read a snapshot."""
    rng = np.random.default_rng(6)
    x = make_images(rng, (8, 3, 16, 12), np.uint8, "NCHW")
    params = gpumix.sample(gpumix.MixConfig(mode="elem", **CONFIGS["all"]), 8, (16, 12), rng)
    expected = mixing.reference_mix_images(x, params, "NCHW")
    view = x[:]
    assert gpumix.mix_images(x, params, "NCHW", out=view) is view
    np.testing.assert_array_equal(x, expected)


def test_mix_targets_in_place_equals_out_of_place():
    import torch

    rng = np.random.default_rng(7)
    targets = rng.dirichlet(np.ones(5), 9).astype(np.float32)
    params = gpumix.sample(gpumix.MixConfig(mode="elem"), 9, (4, 4), rng)
    expected = gpumix.mix_targets(targets, params)
    tensor = torch.from_numpy(targets.copy())  # a CPU tensor, written through its NumPy view
    assert gpumix.mix_targets(targets, params, out=targets) is targets
    np.testing.assert_array_equal(targets, expected)
    gpumix.mix_targets(tensor, params, out=tensor.numpy())
    np.testing.assert_array_equal(tensor.numpy(), expected)


def test_soft_targets_write_a_strided_out_and_checks_take_float16_lam():
    rng = np.random.default_rng(8)
    params = gpumix.sample(gpumix.MixConfig(mode="elem", num_classes=4), 6, (4, 4), rng)
    labels = rng.integers(0, 4, 6)
    wide = np.zeros((6, 9), np.float32)
    gpumix.soft_targets(labels, params, 4, 0.1, out=wide[:, 2:6])
    np.testing.assert_allclose(wide[:, 2:6], mixing.reference_soft_targets(labels, params, 4, 0.1),
                               atol=1e-7)
    assert not wide[:, :2].any() and not wide[:, 6:].any()
    half = dataclasses.replace(params, lam=params.lam.astype(np.float16))
    half.check(6, (4, 4))  # float16 lam is as valid as float32


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_soft_targets_kernel_matches_reference(smoothing):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 7, 33)
    pair = rng.permutation(33)
    lam = rng.random(33).astype(np.float32)
    lam[:3] = [0.0, 1.0, 0.5]
    got = soft_targets.cpu(labels, pair, lam, 7, smoothing)
    np.testing.assert_array_max_ulp(got, soft_targets.reference(labels, pair, lam, 7, smoothing), 1)


def test_selection_kernel_matches_stable_argsort_reference():
    rng = np.random.default_rng(6)
    grey = rng.standard_normal((8, 97)).astype(np.float32)
    grey[0] = 0.5                     # all tied: lowest indices win
    grey[1, ::3] = 0.0
    grey[1, 1::7] = -0.0              # -0.0 ranks just below +0.0
    grey[2] = np.round(grey[2], 1)    # many ties
    low = np.array([0, 10, 30, 97, 5, 40, 1, 96])
    high = np.array([0, 10, 50, 97, 90, 41, 1, 97])
    np.testing.assert_array_equal(mask_select.cpu(grey, low, high),
                                  mask_select.reference(grey, low, high))


@pytest.mark.parametrize("decimals", [None, 2, 0])
def test_hard_selection_matches_reference_with_ties_at_the_threshold(decimals):
    rng = np.random.default_rng(11)
    grey = (rng.standard_normal((6, 5003)) * 3).astype(np.float32)
    if decimals is not None:          # many equal values around every threshold
        grey = np.round(grey, decimals).astype(np.float32)
    grey[5, :] = -0.0
    grey[5, ::2] = 0.0
    k = np.array([1, 2500, 5002, 1234, 4000, 2502])
    np.testing.assert_array_equal(mask_select.cpu(grey, k, k), mask_select.reference(grey, k, k))


def test_uint8_blend_of_equal_values_is_exact_for_every_value():
    """blend_uint8 skips blend_value's a == b test: rounding must return a
    for every uint8 value and any lam in [0, 1] (edges and 3000 random)."""
    from gpumix.kernels import blend
    from gpumix.kernels._launch import row_view

    rng = np.random.default_rng(11)
    lam = np.concatenate([rng.random(3000), [0.0, 1.0, 0.5, 1e-8, 1 - 1e-7, 1e-30]])
    lam = lam.astype(np.float32)
    n = lam.size
    x = np.broadcast_to(np.arange(256, dtype=np.uint8), (n, 1, 1, 256)).copy()
    partner = np.roll(np.arange(n), 1)  # a different sample holding the same values
    out = np.empty_like(x)
    view = row_view(x, "NCHW")
    blend.cpu(view.rows, partner, lam, np.arange(n), out=row_view(out, "NCHW").rows)
    np.testing.assert_array_equal(out, x)


@njit(cache=True)
def _pick_by_plan(row, positions, out):
    plans = new_plans(1, row.shape[0])
    plan_row(positions, row.shape[0], plans, 0)
    compress_row(np.int64(out.ctypes.data), np.int64(row.ctypes.data), plans, 0)


@pytest.mark.parametrize("row_bytes", [64, 65, 100, 128, 224, 673])
def test_compress_plans_pick_exactly_the_chosen_bytes(row_bytes):
    """A plan's masked stores equal NumPy's indexing by the positions: whole
    chunks, a row ending mid-chunk (its last chunk overlaps the one before),
    every byte, one byte, none; nothing is written past the picked bytes."""
    rng = np.random.default_rng(row_bytes)
    row = rng.integers(1, 256, row_bytes).astype(np.uint8)
    for positions in (np.arange(row_bytes), np.array([row_bytes - 1]), np.array([], np.int64),
                      np.flatnonzero(rng.random(row_bytes) < 0.4),
                      np.unique((np.arange(row_bytes // 3) * 2.7).astype(np.int64))):
        out = np.zeros(row_bytes + 8, np.uint8)
        _pick_by_plan(row, positions.astype(np.int64), out)
        np.testing.assert_array_equal(out[:positions.size], row[positions])
        assert not out[positions.size:].any()


@pytest.mark.parametrize("compress", [True, False], ids=["compress", "gather"])
@pytest.mark.parametrize("bilinear", [False, True], ids=["nearest", "bilinear"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout,width", [("NCHW", 64), ("NCHW", 97), ("NCHW", 224),
                                          ("NHWC", 22), ("NHWC", 75)])
def test_resizemix_routes_match_the_reference(compress, bilinear, dtype, layout, width):
    """Both CPU routes of ResizeMix (masked compress-stores, gathers) against
    the NumPy reference, on rows a little over, at and across the 64-byte
    chunks, for boxes from a sliver to the whole image (the clamped last
    tap)."""
    rng = np.random.default_rng(width)
    n, h = 12, 17
    shape = (n, 3, h, width) if layout == "NCHW" else (n, h, width, 3)
    x = rng.integers(0, 256, shape).astype(dtype)
    boxes = []
    for scale in np.linspace(0.05, 1.0, n):
        bh, bw = max(1, int(h * scale)), max(1, int(width * scale))
        y0, x0 = rng.integers(0, h - bh + 1), rng.integers(0, width - bw + 1)
        boxes.append((y0, y0 + bh, x0, x0 + bw))
    box, pair = np.array(boxes, np.int64), rng.permutation(n)
    out = np.empty_like(x)
    view, out_view = row_view(x, layout), row_view(out, layout)
    resize_paste.cpu(view.rows, pair, box, np.arange(n), view.height, view.cstride, bilinear,
                     out=out_view.rows, compress=compress)
    np.testing.assert_array_equal(out, resize_paste.reference(x, pair, box, layout, bilinear))
