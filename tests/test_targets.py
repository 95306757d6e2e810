"""Targets beyond class ids (issue 16, first part): dense probabilities,
timm's multi-label targets, regression values, (y_a, y_b, lam) for losses
mixed per term, a label weight apart from the pixels' lam, and a fixed MixUp
lam. References: timm's ``mixup_target``, the class-id soft targets, and the
formulas evaluated here."""

import dataclasses

import numpy as np
import pytest
import torch
from timm.data.mixup import mixup_target

import gpumix
from gpumix import mixing
from gpumix.config import MIXUP, MixConfig
from gpumix.torch import Mixup

K = 10


@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_multi_label_targets_equal_timms(mode, smoothing):
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 12, 12), (torch.rand(8, K) < 0.3).float()
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=K, multi_label=True,
                  label_smoothing=smoothing, mode=mode, seed=1)
    _, targets = mixup(x, y)
    lam = torch.from_numpy(mixup.last_params.lam.astype(np.float32))
    lam = float(lam[0]) if mode == "batch" else lam[:, None]  # timm's scalar or column
    expected = mixup_target(y, K, lam=lam, smoothing=smoothing, multi_label=True)
    torch.testing.assert_close(targets, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dense_one_hot_targets_equal_the_class_id_targets(smoothing):
    y = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    one_hot = torch.nn.functional.one_hot(y, K).float()
    options = dict(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=K, label_smoothing=smoothing,
                   mode="elem")
    x = torch.rand(7, 3, 10, 10)
    _, from_ids = Mixup(seed=2, **options)(x.clone(), y)
    _, from_dense = Mixup(seed=2, **options)(x.clone(), one_hot)
    torch.testing.assert_close(from_dense, from_ids, rtol=0, atol=1e-6)


def test_dense_probabilities_stay_probabilities():
    rng = np.random.default_rng(3)
    probabilities = rng.dirichlet(np.ones(K), 9).astype(np.float32)
    params = gpumix.sample(MixConfig(mode="elem", num_classes=K), 9, (4, 4), rng)
    mixed = gpumix.mix_targets(probabilities, params, smoothing=0.2, toward=1 / K)
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, atol=1e-6)
    smoothed = probabilities * 0.8 + 0.02
    lam = params.lam[:, None]
    np.testing.assert_allclose(mixed, lam * smoothed + (1 - lam) * smoothed[params.pair],
                               atol=1e-6)


@pytest.mark.parametrize("shape", [(6,), (6, 3)])
def test_regression_targets_mix_linearly_and_are_never_smoothed(shape):
    values = torch.from_numpy(np.random.default_rng(4).normal(size=shape).astype(np.float32))
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=K, targets="regression",
                  label_smoothing=0.1, mode="elem", seed=5)
    _, mixed = mixup(torch.rand(6, 3, 8, 8), values)
    p = mixup.last_params
    lam = p.lam.reshape((-1,) + (1,) * (len(shape) - 1))
    expected = lam * values.numpy() + (1 - lam) * values.numpy()[p.pair]
    np.testing.assert_allclose(mixed.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("target", ["classes", "dense"])
def test_split_targets_recombine_into_the_mixed_ones(target):
    y = torch.tensor([0, 2, 2, 7, 5])
    y_in = y if target == "classes" else torch.nn.functional.one_hot(y, K).float()
    options = dict(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=K, label_smoothing=0.0,
                   mode="elem", pairing="permutation")
    x = torch.rand(5, 3, 9, 9)
    _, (y_a, y_b, lam) = Mixup(seed=6, split_targets=True, **options)(x.clone(), y_in)
    mixup = Mixup(seed=6, **options)
    _, mixed = mixup(x.clone(), y_in)
    assert torch.equal(y_a, y_in) and torch.equal(y_b, y_in[mixup.last_params.pair])
    np.testing.assert_array_equal(lam.numpy(), mixup.last_params.lam)
    one_hot = lambda t: torch.nn.functional.one_hot(t, K).float() if t.dim() == 1 else t  # noqa: E731
    recombined = lam[:, None] * one_hot(y_a) + (1 - lam[:, None]) * one_hot(y_b)
    torch.testing.assert_close(recombined, mixed, rtol=0, atol=1e-6)


@pytest.mark.parametrize("label_lam", [0.5, lambda lam: lam ** 2])
def test_label_lam_weighs_the_labels_not_the_pixels(label_lam):
    options = dict(mixup_alpha=1.0, num_classes=K, label_smoothing=0.0, mode="elem",
                   pairing="roll")
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)
    plain = Mixup(seed=7, **options)
    mixed_x, _ = plain(x.clone(), y)
    mapped = Mixup(seed=7, label_lam=label_lam, **options)
    mapped_x, targets = mapped(x.clone(), y)
    torch.testing.assert_close(mapped_x, mixed_x, rtol=0, atol=0)  # pixels as before
    lam = mapped.last_params.lam
    weight = np.full(6, 0.5) if label_lam == 0.5 else lam ** 2
    np.testing.assert_allclose(targets.numpy()[np.arange(6), y.numpy()], weight, atol=1e-6)


@pytest.mark.parametrize("label_lam", [0.5, lambda lam: lam * 0.5])
@pytest.mark.parametrize("split", [False, True])
def test_unmixed_samples_keep_their_own_labels_whatever_label_lam_says(label_lam, split):
    """prob=0.5 leaves some samples unmixed: their targets stay their own
    one-hots (split: weight 1), while the mixed ones take ``label_lam``."""
    x, y = torch.rand(16, 3, 8, 8), torch.arange(16) % K
    mixup = Mixup(mixup_alpha=1.0, prob=0.5, num_classes=K, label_smoothing=0.0, mode="elem",
                  label_lam=label_lam, split_targets=split, seed=3)
    _, targets = mixup(x, y)
    unmixed = mixup.last_params.method == 0
    assert 0 < unmixed.sum() < 16
    lam = mixup.last_params.lam
    expected = np.where(unmixed, 1.0, 0.5 if label_lam == 0.5 else lam * 0.5)
    weights = targets[2].numpy() if split else targets.numpy()[np.arange(16), y.numpy()]
    np.testing.assert_allclose(weights, expected, atol=1e-6)


def test_a_label_lam_function_must_return_weights_in_0_1():
    mixup = Mixup(mixup_alpha=1.0, num_classes=K, label_lam=lambda lam: lam + 1, seed=0)
    with pytest.raises(ValueError, match=r"label_lam must map lam to weights in \[0, 1\]"):
        mixup(torch.rand(4, 3, 8, 8), torch.arange(4))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_target_that_weighs_nothing_never_reaches_the_result(bad):
    """0 * inf is NaN: rows with lam 1 take their own target whole, rows
    with lam 0 their partner's, so a NaN or inf elsewhere stays there."""
    values = np.array([[1.0], [2.0], [3.0], [bad]], np.float32)
    params = gpumix.sample(MixConfig(prob=0.0), 4, (4, 4), 0)  # nothing mixed: lam 1
    np.testing.assert_array_equal(gpumix.mix_targets(values, params), values)
    partners = dataclasses.replace(params, lam=np.zeros(4, np.float32),
                                   method=np.full(4, MIXUP, np.int8))
    np.testing.assert_array_equal(gpumix.mix_targets(values, partners), values[params.pair])
    halves = dataclasses.replace(partners, lam=np.full(4, 0.5, np.float32))
    mixed = gpumix.mix_targets(values, halves)
    np.testing.assert_array_equal(np.isfinite(mixed[:, 0]), [False, True, True, False])


def test_bfloat16_dense_targets_are_mixed_as_float32():
    y, x = torch.softmax(torch.rand(6, K), 1).bfloat16(), torch.rand(6, 3, 8, 8)
    _, got = Mixup(seed=1, num_classes=K)(x.clone(), y)
    _, expected = Mixup(seed=1, num_classes=K)(x.clone(), y.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_midpoint_mixup_fixes_lam():
    params = gpumix.sample(MixConfig(mixup_alpha=1.0, mixup_lam=0.5, mode="elem"), 50, (4, 4), 8)
    assert set(params.method.tolist()) == {MIXUP}
    np.testing.assert_array_equal(params.lam, np.float32(0.5))


@pytest.mark.parametrize("options,target,error,match", [
    (dict(), torch.rand(4, 3), ValueError, "targets='regression'"),
    (dict(targets="regression"), torch.arange(4), ValueError, "float"),
    (dict(targets="dense"), torch.rand(4, K + 1), ValueError, r"float \(4, 10\)"),
    (dict(multi_label=True), torch.rand(4, 3), ValueError, "multi_label"),
    (dict(targets="classes"), torch.rand(4), TypeError, "integer class ids"),
])
def test_targets_are_checked(options, target, error, match):
    with pytest.raises(error, match=match):
        Mixup(num_classes=K, **options)(torch.rand(4, 3, 8, 8), target)


@pytest.mark.parametrize("options,match", [
    (dict(multi_label=True, targets="dense"), "multi_label=True means"),
    (dict(targets="soft"), "targets must be one of"),
    (dict(label_lam=1.5), "label_lam"),
    (dict(mixup_lam=-0.1), "mixup_lam"),
])
def test_target_options_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        Mixup(num_classes=K, **options)


def test_mix_targets_refuses_class_ids_and_needs_a_direction_to_smooth():
    params = gpumix.sample(MixConfig(), 3, (4, 4), 0)
    with pytest.raises(TypeError, match="soft_targets"):
        gpumix.mix_targets(np.arange(3), params)
    with pytest.raises(ValueError, match="toward"):
        gpumix.mix_targets(np.zeros((3, 2), np.float32), params, smoothing=0.1)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dense", "multi_label", "regression", "split"])
def test_cuda_targets_equal_the_cpu_module_without_a_sync(kind, no_device_sync):
    # prob < 1: unmixed rows are taken whole, mixed ones blended
    options = dict(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=K, mode="elem", prob=0.75)
    y = {"dense": torch.softmax(torch.rand(8, K), 1), "multi_label": (torch.rand(8, K) < .3).float(),
         "regression": torch.rand(8, 2), "split": torch.arange(8)}[kind]
    if kind == "split":
        options["split_targets"] = True
    elif kind != "dense":
        options["targets"] = kind
    x = torch.rand(8, 3, 12, 12)
    _, expected = Mixup(seed=9, **options)(x.clone(), y)
    mixup = Mixup(seed=9, **options)
    x_gpu, y_gpu = x.cuda(), y.cuda()
    with no_device_sync():
        _, got = mixup(x_gpu, y_gpu)
    for a, b in zip(got if kind == "split" else [got], expected if kind == "split" else [expected]):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("target", ["classes", "dense", "regression"])
def test_clean_batch_comes_back_beside_the_mixed_one(target):
    y = torch.tensor([1, 4, 4, 0, 7, 2])
    y_in = {"classes": y, "dense": torch.softmax(torch.rand(6, K), 1),
            "regression": torch.rand(6, 2)}[target]
    options = dict(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=K, label_smoothing=0.1,
                   mode="elem", targets="auto" if target != "regression" else "regression")
    x = torch.rand(6, 3, 10, 10)
    mixed, targets = Mixup(seed=10, **options)(x.clone(), y_in)
    original = x.clone()
    mixup = Mixup(seed=10, return_clean=True, **options)
    got_mixed, got_targets, clean, clean_targets = mixup(x, y_in)
    assert clean is x and torch.equal(x, original)  # one pass: the input is the clean batch
    torch.testing.assert_close(got_mixed, mixed, rtol=0, atol=0)
    torch.testing.assert_close(got_targets, targets, rtol=0, atol=0)
    if target == "classes":
        expected = mixing.soft_targets(y.numpy(), mixing.MixParams(
            pair=np.arange(6), lam=np.ones(6, np.float32), method=np.zeros(6, np.int8),
            box=np.zeros((6, 4), np.int64)), K, 0.1)
    elif target == "dense":
        expected = y_in.numpy() * 0.9 + 0.1 / K
    else:
        expected = y_in.numpy()
    np.testing.assert_allclose(clean_targets.numpy(), expected, atol=1e-7)


def test_video_clips_take_one_box_or_mask_for_every_frame():
    clips = torch.rand(4, 5, 3, 12, 14)  # (N, T, C, H, W)
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, fmix_alpha=1.0, num_classes=K, mode="elem",
                  pairing="roll", inplace=False, seed=11)
    mixed, targets = mixup(clips, torch.arange(4))
    assert mixed.shape == clips.shape and targets.shape == (4, K)
    params = mixup.last_params
    for f in range(clips.shape[1]):  # every frame mixed by the same params, as an image
        np.testing.assert_array_equal(mixed[:, f].numpy(), mixing.reference_mix_images(
            clips[:, f].numpy(), params, "NCHW"))
    assert not torch.equal(mixed, clips)  # something was mixed
    expected = mixing.reference_soft_targets(np.arange(4), params, K, 0.1)
    np.testing.assert_allclose(targets.numpy(), expected, atol=1e-6)


def test_any_number_of_channels():
    x = torch.rand(4, 7, 9, 9)  # e.g. multispectral
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=K, mode="elem", seed=12)
    original = x.clone()
    out, _ = mixup(x, torch.arange(4))
    np.testing.assert_array_equal(out.numpy(), mixing.reference_mix_images(
        original.numpy(), mixup.last_params, "NCHW"))


def test_signals_take_segments_and_1d_masks():
    signals = torch.rand(6, 2, 50)  # (N, C, L)
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, fmix_alpha=1.0, cutmix_axes="width",
                  num_classes=K, mode="elem", pairing="roll", inplace=False, seed=13,
                  label_smoothing=0.0)
    mixed, targets = mixup(signals, torch.arange(6))
    assert mixed.shape == signals.shape
    p = mixup.last_params
    assert {2, 3} <= set(p.method.tolist())
    for i in range(6):
        taken = (mixed[i] == signals[p.pair[i]]) & (mixed[i] != signals[i])
        assert torch.equal(taken[0], taken[1])  # one segment or mask for both channels
        where = torch.nonzero(taken[0]).reshape(-1)
        assert len(where) == round(50 * (1 - float(p.lam[i])))  # the partner's exact share
        if p.method[i] == 2 and len(where):  # CutMix: one contiguous segment
            assert int(where[-1] - where[0]) + 1 == len(where)
        assert targets[i, p.pair[i]] == pytest.approx(1 - float(p.lam[i]), abs=1e-6)


@pytest.mark.parametrize("placement", ["clip", "inside", "uniform"])
@pytest.mark.parametrize("axes", ["width", "height"])
def test_spectrogram_bands_span_the_other_axis(axes, placement):
    config = MixConfig(mixup_alpha=0.0, cutmix_alpha=1.0, cutmix_axes=axes, mode="elem",
                       box_placement=placement)
    params = gpumix.sample(config, 200, (40, 64), 14)
    h_span = params.box[:, 1] - params.box[:, 0]
    w_span = params.box[:, 3] - params.box[:, 2]
    assert np.all(h_span == 40) if axes == "width" else np.all(w_span == 64)
    assert len(set((w_span if axes == "width" else h_span).tolist())) > 10  # bands of any width
    np.testing.assert_allclose(params.lam, 1 - h_span * w_span / (40 * 64), atol=1e-7)


from hypothesis import given, settings, strategies as st  # noqa: E402

SHARE_METHODS = {
    "cutmix": dict(method_weights={"cutmix": 1}, cutmix_alpha=1.0),
    "band": dict(method_weights={"cutmix": 1}, cutmix_alpha=1.0, cutmix_axes="width"),
    "fmix": dict(method_weights={"fmix": 1}, fmix_alpha=1.0),
    "gridmix": dict(method_weights={"gridmix": 1}),
    "resizemix": dict(method_weights={"resizemix": 1}),
    "saliencymix": dict(method_weights={"saliencymix": 1}, saliencymix_alpha=1.0),
}


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(SHARE_METHODS)), batch=st.integers(2, 6),
       height=st.sampled_from([1, 2, 7, 16]), width=st.integers(2, 30),
       seed=st.integers(0, 2**16))
def test_partner_share_is_exactly_one_minus_lam(name, batch, height, width, seed):
    """Every hard method, on signals (height 1) and images: the share of a
    sample's pixels that come from its partner is exactly 1 - lam."""
    config = MixConfig(mode="elem", pairing="roll", **SHARE_METHODS[name])
    y, x = np.mgrid[0:height, 0:width]
    images = np.stack([np.stack([i * 10000 + y * width + x] * 2) for i in range(batch)])
    images = images.astype(np.float32)  # every pixel of every sample its own value
    params = gpumix.saliency.place_boxes(
        images, gpumix.sample(config, batch, (height, width), seed), "NCHW")
    mixed = mixing.mix_images(images, params, "NCHW")
    for i in range(batch):
        from_partner = (mixed[i, 0] // 10000) == params.pair[i]
        assert np.array_equal(from_partner, (mixed[i, 1] // 10000) == params.pair[i])
        share = from_partner.mean()
        assert share == pytest.approx(1 - float(params.lam[i]), abs=1e-6), (name, i)
