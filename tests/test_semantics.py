"""docs/semantics.md as properties: invariants under hypothesis, and statistics of
the sampled parameters (fixed seeds, so these tests are deterministic)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

import gpumix
from gpumix.config import CUTMIX, FMIX, MIXUP, NONE
from gpumix.params import MixParams, cutmix_boxes, draw

configs = st.fixed_dictionaries({
    "mixup_alpha": st.sampled_from([0.0, 0.2, 1.0]),
    "cutmix_alpha": st.sampled_from([0.0, 1.0]),
    "fmix_alpha": st.sampled_from([0.0, 1.0]),
    "prob": st.sampled_from([0.0, 0.5, 1.0]),
    "mode": st.sampled_from(["batch", "elem"]),
    "pairing": st.sampled_from(["flip", "roll", "permutation"]),
    "box_placement": st.sampled_from(["clip", "inside", "uniform"]),
    "label_smoothing": st.sampled_from([0.0, 0.1]),
    "num_classes": st.integers(1, 12),
})
batch_sizes = st.integers(1, 9)
sizes = st.tuples(st.integers(1, 12), st.integers(1, 12))
seeds = st.integers(0, 2**32 - 1)


def distinct_images(b, h, w, dtype=np.uint8, layout="NCHW"):
    """Sample i is the constant i + 1: every output pixel names its source."""
    x = np.broadcast_to(np.arange(1, b + 1, dtype=dtype)[:, None, None, None], (b, 3, h, w))
    x = np.ascontiguousarray(x)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x


@settings(max_examples=60, deadline=None)
@given(options=configs, b=batch_sizes, hw=sizes, seed=seeds)
def test_targets_rows_sum_to_one_and_are_nonnegative(options, b, hw, seed):
    config = gpumix.MixConfig(**options)
    rng = np.random.default_rng(seed)
    params = gpumix.sample(config, b, hw, rng)
    labels = rng.integers(0, config.num_classes, b)
    t = gpumix.soft_targets(labels, params, config.num_classes, config.label_smoothing)
    assert t.dtype == np.float32 and t.shape == (b, config.num_classes)
    assert np.all(t >= 0)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=0, atol=4e-7)


@settings(max_examples=60, deadline=None)
@given(options=configs, b=batch_sizes, hw=sizes, seed=seeds,
       layout=st.sampled_from(["NCHW", "NHWC"]))
def test_hard_masks_take_pixels_from_one_input_and_match_lam_exactly(options, b, hw, seed, layout):
    options = dict(options, mixup_alpha=0.0)  # MixUp blends; the rest select
    config = gpumix.MixConfig(**options)
    params = gpumix.sample(config, b, hw, np.random.default_rng(seed))
    x = distinct_images(b, *hw, layout=layout)
    out = gpumix.mix_images(x, params, layout)
    for i in range(b):
        own = out[i] == i + 1
        partner = out[i] == params.pair[i] + 1
        assert np.all(own | partner)
        channel0 = own[0] if layout == "NCHW" else own[..., 0]
        if params.pair[i] != i:
            # the realised pixel fraction is the label weight, to the last bit
            assert np.float32(channel0.sum() / channel0.size) == params.lam[i]


@settings(max_examples=40, deadline=None)
@given(options=configs, hw=sizes, seed=seeds, dtype=st.sampled_from([np.uint8, np.float16,
                                                                      np.float32]))
def test_a_sample_mixed_with_itself_is_unchanged(options, hw, seed, dtype):
    rng = np.random.default_rng(seed)
    config = gpumix.MixConfig(**options)
    params = gpumix.sample(config, 1, hw, rng)  # B == 1 pairs with itself
    assert params.pair.tolist() == [0]
    x = (rng.random((1, 3, *hw)) * 255).astype(dtype)
    np.testing.assert_array_equal(gpumix.mix_images(x, params), x)
    t = gpumix.soft_targets(np.array([0]), params, config.num_classes, config.label_smoothing)
    off = config.label_smoothing / config.num_classes
    expected = np.full(config.num_classes, off, np.float32)
    expected[0] = 1 - config.label_smoothing + off
    np.testing.assert_allclose(t[0], expected, atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(b=batch_sizes, hw=sizes, seed=seeds, dtype=st.sampled_from([np.uint8, np.float16,
                                                                     np.float32]))
def test_lam_one_is_the_identity(b, hw, seed, dtype):
    rng = np.random.default_rng(seed)
    x = (rng.random((b, 3, *hw)) * 255).astype(dtype)
    params = MixParams(pair=np.arange(b)[::-1].copy(), lam=np.ones(b, np.float32),
                       method=np.full(b, MIXUP, np.int8), box=np.zeros((b, 4), np.int64))
    np.testing.assert_array_equal(gpumix.mix_images(x, params), x)


@settings(max_examples=20, deadline=None)
@given(options=configs, b=batch_sizes, hw=sizes, seed=seeds)
def test_same_seed_same_output(options, b, hw, seed):
    config = gpumix.MixConfig(**options)
    x = (np.random.default_rng(0).random((b, 3, *hw)) * 255).astype(np.uint8)
    runs = []
    for _ in range(2):
        params = gpumix.sample(config, b, hw, np.random.default_rng(seed))
        runs.append((gpumix.mix_images(x, params), params.lam))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


# ------------------------------------------------------------------ statistics
def elem_params(n=4000, seed=0, hw=(16, 16), **options):
    config = gpumix.MixConfig(mode="elem", **options)
    return gpumix.sample(config, n, hw, np.random.default_rng(seed))


@pytest.mark.parametrize("alpha", [0.2, 1.0, 3.0])
def test_mixup_lam_follows_beta(alpha):
    lam = elem_params(mixup_alpha=alpha).lam
    assert stats.kstest(lam, "beta", args=(alpha, alpha)).pvalue > 1e-3


def test_cutmix_minmax_lam_is_uniform_before_correction():
    lam = elem_params(mixup_alpha=0.0, cutmix_minmax=(0.3, 0.8), correct_lam=False).lam
    assert stats.kstest(lam, "uniform", args=(0.3, 0.5)).pvalue > 1e-3


@pytest.mark.parametrize("reformulate", [False, True])
def test_fmix_lam_draws_follow_beta(reformulate):
    config = gpumix.MixConfig(mixup_alpha=0.0, fmix_alpha=0.7, mode="elem",
                              reformulate=reformulate)
    lam = draw(config, 4000, (4, 4), np.random.default_rng(1)).lam_fmix
    a = 0.7
    args = (a + 1, a) if reformulate else (a, a)
    assert stats.kstest(lam, "beta", args=args).pvalue > 1e-3


def within(observed, expected, n, sigmas=5):
    return abs(observed - expected) <= sigmas * np.sqrt(expected * (1 - expected) / n) + 1e-12


@pytest.mark.parametrize("prob", [0.0, 0.3, 1.0])
def test_prob_rate_elem_and_batch(prob):
    n = 5000
    mixed = elem_params(n, mixup_alpha=1.0, prob=prob).method != NONE
    assert within(mixed.mean(), prob, n)
    config = gpumix.MixConfig(mixup_alpha=1.0, prob=prob)
    rng = np.random.default_rng(2)
    batches = [gpumix.sample(config, 4, (4, 4), rng).method for _ in range(2000)]
    assert all(len(set(m)) == 1 for m in batches)  # one draw for the whole batch
    assert within(np.mean([m[0] != NONE for m in batches]), prob, 2000)


@pytest.mark.parametrize("switch_prob", [0.0, 0.25, 0.9])
def test_switch_prob_is_the_cutmix_rate(switch_prob):
    method = elem_params(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob).method
    assert set(np.unique(method)) <= {MIXUP, CUTMIX}
    assert within((method == CUTMIX).mean(), switch_prob, method.size)


def test_three_methods_uniform_and_weighted():
    method = elem_params(mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, hw=(4, 4)).method
    for m in (MIXUP, CUTMIX, FMIX):
        assert within((method == m).mean(), 1 / 3, method.size)
    method = elem_params(mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, hw=(4, 4),
                         method_weights=(1, 0, 3)).method
    assert not np.any(method == CUTMIX)
    assert within((method == FMIX).mean(), 0.75, method.size)


def test_every_box_centre_is_reachable_including_last_row_and_column():
    h, w = 5, 7
    # lam = 0.9375 -> r = 0.25, cut_h = cut_w = 1: the box is exactly its centre pixel
    params = elem_params(3000, hw=(h, w), mixup_alpha=0.0, cutmix_minmax=(0.9375, 0.9375))
    box = params.box
    assert np.all(box[:, 1] - box[:, 0] == 1) and np.all(box[:, 3] - box[:, 2] == 1)
    assert set(box[:, 0]) == set(range(h))
    assert set(box[:, 2]) == set(range(w))


def test_boxes_differ_per_sample_in_elem_mode_and_not_in_batch_mode():
    params = elem_params(64, mixup_alpha=0.0, cutmix_alpha=1.0)
    assert len({tuple(b) for b in params.box}) > 32
    config = gpumix.MixConfig(mixup_alpha=0.0, cutmix_alpha=1.0, mode="batch")
    params = gpumix.sample(config, 64, (16, 16), np.random.default_rng(0))
    assert len({tuple(b) for b in params.box}) == 1


def test_box_sizes_use_height_and_width_separately():
    box = cutmix_boxes(np.array([0.75]), np.array([[0.5, 0.5]]), (40, 100), "inside")
    # r = 0.5: 20 rows by 50 columns
    assert box[0, 1] - box[0, 0] == 20 and box[0, 3] - box[0, 2] == 50


def reference_box_axis(size, cut, u, placement):
    """One axis of a box, in Python integers, as docs/semantics.md words it."""
    if placement == "clip":
        centre = min(int(u * size), size - 1)
        return max(centre - cut // 2, 0), min(centre + (cut + 1) // 2, size)
    if placement == "inside":
        start = min(int(u * (size - cut + 1)), size - cut)
        return start, start + cut
    if cut <= 0:
        return 0, 0
    positions = size + cut - 1
    origin = min(int(u * positions), positions - 1) - (cut - 1)
    return min(max(origin, 0), size), min(max(origin + cut, 0), size)


@settings(max_examples=200, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=2, max_size=3),
       lam=st.lists(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0])), min_size=1,
                    max_size=6),
       data=st.data(), placement=st.sampled_from(["clip", "inside", "uniform"]),
       axes=st.sampled_from(["both", "width", "height"]))
def test_cutmix_boxes_follow_the_written_rule(shape, lam, data, placement, axes):
    if len(shape) == 3:
        axes = "both"
    u = np.array([[data.draw(st.floats(0, 1, exclude_max=True)) for _ in shape] for _ in lam])
    box = cutmix_boxes(np.array(lam), u, tuple(shape), placement, axes)
    assert box.dtype == np.int64 and box.shape == (len(lam), 2 * len(shape))
    for i, share in enumerate(1.0 - np.array(lam)):
        for a, size in enumerate(shape):
            spans = (axes == "width" and a == 0) or (axes == "height" and a == 1)
            side = share if axes != "both" else (np.cbrt(share) if len(shape) == 3
                                                 else math.sqrt(share))
            expected = (0, size) if spans else reference_box_axis(size, int(size * side),
                                                                   u[i, a], placement)
            assert tuple(box[i, 2 * a:2 * a + 2]) == expected


def coverage(placement, n=20000, size=(12, 12), cut_lam=0.75):
    params = elem_params(n, hw=size, mixup_alpha=0.0, cutmix_minmax=(cut_lam, cut_lam),
                         box_placement=placement)
    covered = np.zeros(size)
    for y0, y1, x0, x1 in params.box:
        covered[y0:y1, x0:x1] += 1
    return covered / n, params


def test_inside_boxes_fit_and_uniform_boxes_cover_every_pixel_equally():
    cov, params = coverage("inside")
    assert np.all(params.box[:, 1] - params.box[:, 0] == 6)  # never clipped
    cov, _ = coverage("uniform")
    assert cov.max() / cov.min() < 1.15  # flat, up to sampling noise
    cov, _ = coverage("clip")
    assert cov[0, 0] < 0.6 * cov[6, 6]  # clipped boxes under-cover the border


def test_permutation_pairing_has_no_fixed_points_and_batch_of_one_pairs_with_itself():
    for b in (2, 3, 7, 64):
        pair = elem_params(b, mixup_alpha=1.0, pairing="permutation").pair
        assert sorted(pair) == list(range(b)) and not np.any(pair == np.arange(b))
    assert elem_params(1, mixup_alpha=1.0, pairing="permutation").pair.tolist() == [0]
    assert elem_params(5, mixup_alpha=1.0, pairing="roll").pair.tolist() == [4, 0, 1, 2, 3]
    assert elem_params(5, mixup_alpha=1.0, pairing="flip").pair.tolist() == [4, 3, 2, 1, 0]


def test_all_methods_off_is_identity_with_smoothed_targets():
    config = gpumix.MixConfig(mixup_alpha=0.0, num_classes=4, label_smoothing=0.2)
    params = gpumix.sample(config, 3, (5, 5), np.random.default_rng(0))
    x = np.random.default_rng(1).random((3, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(gpumix.mix_images(x, params), x)
    t = gpumix.soft_targets(np.array([0, 1, 3]), params, 4, 0.2)
    np.testing.assert_allclose(t[0], [0.85, 0.05, 0.05, 0.05], atol=1e-7)
