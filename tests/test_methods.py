"""ResizeMix, SmoothMix, GridMix and SaliencyMix against independent
references: torch's interpolate, their mask formulas evaluated here in
NumPy, OpenCV's spectral residual saliency, and the label contract (the
partner's target weight is the mask mean or pixel fraction); plus choosing
methods by name."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import gpumix
from gpumix import mixing, saliency
from gpumix.config import CUTMIX, GRIDMIX, SALIENCYMIX, MixConfig
from gpumix.kernels import table
from gpumix.params import from_table, sample, to_table

NEW = {"resizemix": {}, "smoothmix": {}, "gridmix": {}, "saliencymix": {"saliencymix_alpha": 1.0}}


def only(name, **options):
    return MixConfig(method_weights={name: 1.0}, mode="elem", num_classes=5,
                     **{**NEW.get(name, {}), **options})


# ---------------------------------------------------------- choosing methods
def test_weights_by_name_turn_on_exactly_the_named_methods():
    config = MixConfig(method_weights={"cutmix": 3, "gridmix": 1}, cutmix_alpha=1.0)
    assert config.enabled == (False, True, False, False, False, True, False)
    np.testing.assert_allclose(config.method_probabilities(), [0, 0.75, 0, 0, 0, 0.25, 0])
    params = sample(MixConfig(method_weights={"cutmix": 3, "gridmix": 1}, cutmix_alpha=1.0,
                              mode="elem"), 4000, (8, 8), 0)
    share = np.mean(params.method == GRIDMIX)
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)
    assert set(params.method.tolist()) == {CUTMIX, GRIDMIX}


def test_timm_style_arguments_are_unchanged():
    config = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.3)
    np.testing.assert_allclose(config.method_probabilities()[:3], [0.7, 0.3, 0])
    assert not any(config.enabled[3:])
    three = MixConfig(mixup_alpha=1.0, fmix_alpha=1.0, method_weights=(1, 0, 3))
    np.testing.assert_allclose(three.method_probabilities()[:3], [0.25, 0, 0.75])


@pytest.mark.parametrize("options,error,match", [
    (dict(method_weights={"mixupp": 1}), ValueError, "method_weights key"),
    (dict(method_weights={"resizemix": -1}), ValueError, "method_weights\\['resizemix'\\]"),
    (dict(method_weights={"cutmix": 1}), ValueError, "cutmix_alpha is 0"),
    (dict(method_weights={"saliencymix": 1}), ValueError, "saliencymix_alpha is 0"),
    (dict(resizemix_scale=(0.9, 0.2)), ValueError, "resizemix_scale must have lo <= hi"),
    (dict(resizemix_scale=(0.1, 1.5)), ValueError, "resizemix_scale\\[1\\]"),
    (dict(resizemix_interpolation="cubic"), ValueError, "resizemix_interpolation"),
    (dict(smoothmix_sigma=(0.0, 0.5)), ValueError, "smoothmix_sigma must be positive"),
    (dict(smoothmix_shape="star"), ValueError, "smoothmix_shape"),
    (dict(gridmix_grid=(2, 9)), ValueError, "gridmix_grid\\[1\\]"),
    (dict(gridmix_grid=(2.5, 4)), TypeError, "gridmix_grid\\[0\\] must be an int"),
    (dict(gridmix_prob=1.5), ValueError, "gridmix_prob"),
    (dict(saliencymix_alpha=-1.0), ValueError, "saliencymix_alpha"),
    (dict(saliencymix_saliency="itti"), ValueError, "saliencymix_saliency"),
])
def test_method_options_are_validated(options, error, match):
    with pytest.raises(error, match=match):
        MixConfig(**options)


@pytest.mark.parametrize("codes", [(), (0,), (2,), (1, 4), (3, 5, 6), (0, 1, 2, 3, 4, 5, 6, 7),
                                   (9,), (2, 200)])
@pytest.mark.parametrize("dtype", [np.int8, np.int64])
def test_samples_lists_exactly_the_samples_of_the_given_methods(codes, dtype):
    method = np.random.default_rng(len(codes)).integers(-1, 9, 257).astype(dtype)
    params = dataclasses.replace(sample(MixConfig(), 257, (4, 4), 0), method=method)
    got = params.samples(*codes)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, np.flatnonzero(np.isin(method, codes)))


# ------------------------------------------------------------------ ResizeMix
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_resizemix_pastes_torch_interpolate_of_the_partner(interpolation, dtype, layout):
    rng = np.random.default_rng(0)
    h, w = 23, 31
    config = only("resizemix", resizemix_interpolation=interpolation, pairing="permutation")
    params = sample(config, 6, (h, w), rng)
    nchw = (rng.random((6, 3, h, w)) * 255).astype(dtype)
    x = nchw if layout == "NCHW" else np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
    out = mixing.mix_images(x, params, layout)
    out = out if layout == "NCHW" else out.transpose(0, 3, 1, 2)
    for i in range(6):
        y0, y1, x0, x1 = params.box[i]
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        partner = torch.from_numpy(nchw[params.pair[i]][None].astype(np.float32))
        resized = torch.nn.functional.interpolate(
            partner, (y1 - y0, x1 - x0), mode=interpolation,
            **({"align_corners": False} if interpolation == "bilinear" else {}))[0].numpy()
        patch = out[i][:, y0:y1, x0:x1].astype(np.float32)
        if interpolation == "nearest":
            np.testing.assert_array_equal(patch, resized)
        elif dtype == np.uint8:
            assert np.abs(patch - resized).max() <= 1.0
        else:
            np.testing.assert_allclose(patch, resized, rtol=0, atol=1e-3)
        outside = np.ones((h, w), bool)
        outside[y0:y1, x0:x1] = False
        np.testing.assert_array_equal(out[i][:, outside], nchw[i][:, outside])
        assert params.lam[i] == np.float32(1 - (y1 - y0) * (x1 - x0) / (h * w))


def test_resizemix_scale_follows_its_range():
    params = sample(only("resizemix", resizemix_scale=(0.25, 0.5)), 2000, (40, 80), 1)
    sides = params.box[:, 1] - params.box[:, 0], params.box[:, 3] - params.box[:, 2]
    assert sides[0].min() == 10 and sides[0].max() in (19, 20)
    assert sides[1].min() == 20 and sides[1].max() in (39, 40)
    # placed uniformly where it fits: every row can start a box of the smallest side
    small = sides[0] == 10
    assert set(params.box[small, 0].tolist()) == set(range(0, 31))


# ------------------------------------------------------------ SmoothMix / GridMix
def smooth_formula(row, h, w):
    """1 - G, evaluated directly (float64, then float32) from the table row."""
    y, x = np.mgrid[0:h, 0:w]
    dy = (y - row[table.CENTRE_Y]) ** 2 / row[table.SIGMA_Y] ** 2
    dx = (x - row[table.CENTRE_X]) ** 2 / row[table.SIGMA_X] ** 2
    g = np.exp(-np.maximum(dy, dx) / 2) if row[table.SQUARE] else np.exp(-(dy + dx) / 2)
    return 1 - g


def grid_formula(row, h, w):
    n = int(row[table.GRID])
    cells = int(row[table.CELLS_LOW]) + (int(row[table.CELLS_HIGH]) << 32)
    mask = np.ones((h, w), np.float32)
    for y in range(h):
        for x in range(w):
            cell = (y * n // h) * n + x * n // w
            if cells >> cell & 1:
                mask[y, x] = 0
    return mask


@pytest.mark.parametrize("shape", ["circle", "square"])
def test_smoothmix_masks_are_the_gaussian_and_lam_their_mean(shape):
    h, w = 30, 44
    config = only("smoothmix", smoothmix_shape=shape, smoothmix_sigma=(0.2, 0.4))
    params = sample(config, 8, (h, w), 3)
    rows = to_table(params, (h, w), config)
    for i in range(8):
        np.testing.assert_allclose(params.mask[i], smooth_formula(rows[i], h, w), atol=2e-7)
        assert 0.2 * h <= rows[i, table.SIGMA_Y] <= 0.4 * h
        assert rows[i, table.SIGMA_X] / rows[i, table.SIGMA_Y] == pytest.approx(w / h)
    np.testing.assert_allclose(params.lam, params.mask.mean(axis=(1, 2), dtype=np.float64),
                               atol=2e-7)


def test_smoothmix_masks_from_any_table_row_equal_the_formula():
    """Each distinct distance's exp is shared by both sides of an integral
    centre and by both axes of equal sigma; fractional centres, centres
    outside the image and unequal sigmas take the value per pixel. All equal
    the NumPy formula bit for bit."""
    from gpumix.kernels import shape_mask

    rng = np.random.default_rng(23)
    rows = np.zeros((12, table.N_COLUMNS))
    rows[:, table.METHOD] = shape_mask.SMOOTHMIX
    rows[:, table.CENTRE_Y] = [0, 31, 15, 40, -3, 7.5, 12, 3, 30, 0, 16, 20.25]
    rows[:, table.CENTRE_X] = [0, 31, 16, -2, 35, 9, 0.5, 31, 3, 16, 16, 8]
    rows[:, table.SIGMA_Y] = rng.uniform(2, 16, 12)
    rows[:, table.SIGMA_X] = np.where(np.arange(12) % 2, rows[:, table.SIGMA_Y], 9.5)
    rows[:, table.SQUARE] = np.arange(12) % 3 == 0
    for shape in ((32, 32), (20, 33)):
        out = np.empty((12, *shape), np.float32)
        np.testing.assert_array_equal(shape_mask.cpu(rows, out), shape_mask.reference(rows, shape))


def test_gridmix_masks_are_the_cells_and_lam_the_exact_pixel_fraction():
    h, w = 29, 37  # cells of unequal sizes
    config = only("gridmix", gridmix_grid=(2, 8), gridmix_prob=0.3)
    params = sample(config, 40, (h, w), 4)
    rows = to_table(params, (h, w), config)
    for i in range(40):
        np.testing.assert_array_equal(params.mask[i], grid_formula(rows[i], h, w))
        assert params.lam[i] == np.float32(params.mask[i].sum(dtype=np.int64) / (h * w))
    assert set(rows[:, table.GRID].astype(int).tolist()) <= set(range(2, 9))
    taken = [bin(int(r[table.CELLS_LOW]) + (int(r[table.CELLS_HIGH]) << 32)).count("1")
             / int(r[table.GRID]) ** 2 for r in rows]
    assert abs(np.mean(taken) - 0.3) < 0.06


@pytest.mark.parametrize("name", ["smoothmix", "gridmix", "resizemix", "saliencymix"])
def test_targets_give_the_partner_its_share(name):
    h, w = 24, 20
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (6, 3, h, w), np.uint8)
    params = sample(only(name, pairing="roll"), 6, (h, w), rng)
    params = saliency.place_boxes(images, params, "NCHW")
    labels = np.arange(6)  # every partner of another class
    targets = mixing.soft_targets(labels, params, 6, 0.0)
    if params.mask is not None:
        share = 1 - params.mask.mean(axis=(1, 2), dtype=np.float64)
    else:  # boxes: the partner's pixels
        share = (params.box[:, 1] - params.box[:, 0]) * (params.box[:, 3] - params.box[:, 2]) \
            / (h * w)
    partner = labels[params.pair]
    np.testing.assert_allclose(targets[np.arange(6), partner], share, atol=2e-7)


# ---------------------------------------------------------------- SaliencyMix
def blob_image(rng, centre, size=64):
    y, x = np.mgrid[0:size, 0:size]
    d2 = (y - centre[0]) ** 2 + (x - centre[1]) ** 2
    return np.clip(90 + 30 * rng.random((size, size)) + 120 * np.exp(-d2 / 40), 0, 255)


def test_spectral_residual_equals_opencv():
    import cv2  # a test extra: installed wherever the tests run
    detector = cv2.saliency.StaticSaliencySpectralResidual_create()
    rng = np.random.default_rng(6)
    for _ in range(4):
        grey = blob_image(rng, rng.integers(8, 56, 2)).astype(np.uint8)
        ok, expected = detector.computeSaliency(grey)
        assert ok
        ours = saliency.spectral_residual(grey[None].astype(np.float32))[0]
        # OpenCV's phase goes through a fast atan2 (about 0.3 degrees): a few 1e-3.
        np.testing.assert_allclose(ours, expected, rtol=0, atol=5e-3)
        assert np.unravel_index(ours.argmax(), ours.shape) == \
            np.unravel_index(expected.argmax(), expected.shape)


def test_saliencymix_box_is_centred_on_the_partners_peak_and_inside():
    rng = np.random.default_rng(7)
    h, w = 96, 128
    centres = [(30, 40), (50, 60), (70, 100), (60, 25)]
    y, x = np.mgrid[0:h, 0:w]
    images = np.stack([np.stack([90 + 30 * rng.random((h, w)) + 150 * np.exp(
        -((y - cy) ** 2 + (x - cx) ** 2) / 60)] * 3) for cy, cx in centres])
    images = np.clip(images, 0, 255).astype(np.uint8)
    params = sample(only("saliencymix", pairing="roll"), 4, (h, w), 8)
    assert np.all(params.box[:, 1] <= 0)  # unplaced: sizes only
    placed = saliency.place_boxes(images, params, "NCHW")
    assert saliency.place_boxes(images, placed, "NCHW") is placed  # idempotent
    maps = saliency.spectral_residual(
        gpumix.kernels.saliency.reference(images, "NCHW", placed.pair, saliency.THUMBNAIL))
    peaks = saliency.peaks(maps, (h, w))
    for i in range(4):
        y0, y1, x0, x1 = placed.box[i]
        size = (params.box[i, 1] - params.box[i, 0], params.box[i, 3] - params.box[i, 2])
        assert (y1 - y0, x1 - x0) == size and 0 <= y0 and y1 <= h and 0 <= x0 and x1 <= w
        py, px = peaks[i]
        assert abs(py - centres[placed.pair[i]][0]) <= 3 and abs(px - centres[placed.pair[i]][1]) <= 3
        want_y0 = min(max(py - size[0] // 2, 0), h - size[0])
        want_x0 = min(max(px - size[1] // 2, 0), w - size[1])
        assert (y0, x0) == (want_y0, want_x0)
        assert placed.lam[i] == np.float32(1 - size[0] * size[1] / (h * w))


def test_saliency_thumbnail_kernel_equals_its_reference():
    from gpumix.kernels import saliency as thumbs
    from gpumix.kernels._launch import row_view

    rng = np.random.default_rng(9)
    for layout, shape in (("NCHW", (3, 3, 50, 70)), ("NHWC", (3, 50, 70, 3)),
                          ("NCHW", (3, 1, 33, 20))):
        x = rng.integers(0, 256, shape).astype(np.uint8)
        view = row_view(x, layout)
        channels = shape[1] if layout == "NCHW" else shape[3]
        out = np.empty((2, 64, 64), np.float32)
        thumbs.cpu(view.rows, [2, 0], view.height, view.cstride, channels, out=out)
        np.testing.assert_array_equal(out, thumbs.reference(x, layout, [2, 0], 64))


def test_fine_grained_saliency_uses_opencv():
    import cv2  # a test extra: installed wherever the tests run

    rng = np.random.default_rng(10)
    images = rng.integers(0, 256, (3, 40, 48, 3), np.uint8)
    params = sample(only("saliencymix", saliencymix_saliency="fine_grained"), 3, (40, 48), 11)
    placed = saliency.place_boxes(images, params, "NHWC", "fine_grained")
    detector = cv2.saliency.StaticSaliencyFineGrained_create()
    for i in np.flatnonzero(params.method == SALIENCYMIX):  # OpenCV's map, evaluated here
        rgb = images[params.pair[i]].astype(np.float32)
        grey = np.float32(0.299) * rgb[..., 0] + np.float32(0.587) * rgb[..., 1] \
            + np.float32(0.114) * rgb[..., 2]
        ok, found = detector.computeSaliency(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
        peak_y, peak_x = np.unravel_index(np.argmax(found), found.shape)
        cut_h, cut_w = -params.box[i, 0], -params.box[i, 2]
        y0 = min(max(peak_y - cut_h // 2, 0), 40 - cut_h)
        x0 = min(max(peak_x - cut_w // 2, 0), 48 - cut_w)
        assert ok and placed.box[i].tolist() == [y0, y0 + cut_h, x0, x0 + cut_w]
    # mix_images places the params' unplaced boxes by the map they were sampled with
    assert params.saliency == "fine_grained"
    np.testing.assert_array_equal(mixing.mix_images(images, params, "NHWC"),
                                  mixing.mix_images(images, placed, "NHWC"))
    assert not np.array_equal(placed.box, saliency.place_boxes(images, params, "NHWC").box)


def test_dense_maps_need_placed_saliency_boxes():
    params = sample(only("saliencymix"), 2, (8, 8), 0)
    with pytest.raises(ValueError, match="place_boxes"):
        mixing.mix_dense(np.zeros((2, 8, 8), np.int64), params)


# ------------------------------------------------------- every method, CPU paths
ALL_NEW = dict(method_weights={"mixup": 1, "cutmix": 1, "fmix": 1, "resizemix": 2,
                               "smoothmix": 2, "gridmix": 2, "saliencymix": 2},
               cutmix_alpha=1.0, fmix_alpha=1.0, saliencymix_alpha=1.0, mode="elem",
               num_classes=5, pairing="permutation")


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_mix_images_equals_reference_for_every_method(dtype, layout):
    rng = np.random.default_rng(12)
    shape = (12, 3, 17, 21) if layout == "NCHW" else (12, 17, 21, 3)
    x = (rng.random(shape) * 255).astype(dtype)
    config = MixConfig(**ALL_NEW, resizemix_interpolation="bilinear")
    params = saliency.place_boxes(x, sample(config, 12, (17, 21), rng), layout)
    assert len(set(params.method.tolist())) >= 5
    np.testing.assert_array_equal(mixing.mix_images(x, params, layout),
                                  mixing.reference_mix_images(x, params, layout))
    inplace = x.copy()
    mixing.mix_images(inplace, params, layout, out=inplace)
    np.testing.assert_array_equal(inplace, mixing.reference_mix_images(x, params, layout))


@pytest.mark.parametrize("channels", [1, 2, 4, 6])
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_resizemix_any_channel_count_and_the_whole_scale_range(channels, interpolation):
    """ResizeMix pairs each value with its right-hand pixel's (the step is the
    channel count) and packs up to four byte planes to a gather: every count,
    and boxes from a sliver to the whole image."""
    rng = np.random.default_rng(22)
    config = only("resizemix", resizemix_interpolation=interpolation, resizemix_scale=(0.05, 1.0))
    params = sample(config, 16, (19, 26), rng)
    x = (rng.random((16, 19, 26, channels)) * 255).astype(np.uint8)
    for data, layout in ((x, "NHWC"), (x.astype(np.float32), "NHWC"),
                         (np.ascontiguousarray(x.transpose(0, 3, 1, 2)), "NCHW")):
        np.testing.assert_array_equal(mixing.mix_images(data, params, layout),
                                      mixing.reference_mix_images(data, params, layout))


@pytest.mark.parametrize("shape", [(3, 5), (9, 2), (17, 23)])
def test_gridmix_cells_narrower_than_a_pixel_and_any_channel_count(shape):
    """GridMix takes whole cell segments: grids finer than the image (empty
    cells), 4 and 1 channels, images and dense maps, all as the mask says."""
    rng = np.random.default_rng(21)
    params = sample(only("gridmix", gridmix_grid=(6, 8)), 9, shape, rng)
    for x, layout in ((rng.integers(0, 256, (9, *shape, 4), np.uint8), "NHWC"),
                      (rng.random((9, 1, *shape), np.float32), "NCHW")):
        np.testing.assert_array_equal(mixing.mix_images(x, params, layout),
                                      mixing.reference_mix_images(x, params, layout))
    maps = rng.integers(0, 9, (9, *shape)).astype(np.int64)
    np.testing.assert_array_equal(mixing.mix_dense(maps, params),
                                  mixing.reference_mix_dense(maps, params))


def test_table_round_trip_keeps_every_field():
    config = MixConfig(**ALL_NEW, resizemix_interpolation="bilinear")
    params = sample(config, 16, (9, 11), 13)
    back = from_table(to_table(params, (9, 11), config), params.mask)
    for name in ("pair", "lam", "method", "box", "smooth", "grid", "fmix_keys", "fmix_ranks"):
        np.testing.assert_array_equal(getattr(back, name), getattr(params, name), err_msg=name)
    assert back.bilinear


def test_torch_module_mixes_every_method_like_the_reference():
    from gpumix.torch import Mixup

    mixup = Mixup(**{k: v for k, v in ALL_NEW.items() if k != "num_classes"}, num_classes=5,
                  label_smoothing=0.1, seed=14)
    x = torch.randint(0, 256, (10, 3, 20, 24), dtype=torch.uint8)
    y = torch.randint(0, 5, (10,))
    original = x.numpy().copy()
    out, targets = mixup(x, y)
    params = mixup.last_params
    assert saliency.unplaced(params.method, params.box).size == 0
    np.testing.assert_array_equal(out.numpy(), mixing.reference_mix_images(original, params,
                                                                           "NCHW"))
    np.testing.assert_allclose(targets.numpy(), mixing.reference_soft_targets(
        y.numpy(), params, 5, 0.1), atol=1e-7)


def test_hand_off_apply_mixes_every_method_like_the_reference():
    from gpumix.kernels import mix_normalize
    from gpumix.torch import apply

    rng = np.random.default_rng(15)
    images = rng.integers(0, 256, (16, 18, 22, 3), np.uint8)
    config = MixConfig(**ALL_NEW)
    params = sample(config, 16, (18, 22), rng)
    rows = to_table(params, (18, 22), config)
    before = rows.copy()
    out = apply(torch.from_numpy(images), rows)
    np.testing.assert_array_equal(rows, before)  # the caller's table is left as it was
    placed = rows.copy()
    saliency.place_rows(images, placed, "NHWC")
    masks = mixing.masks_from_table(placed, (18, 22))
    expected = mix_normalize.reference(images, placed, masks, gpumix.torch.IMAGENET_MEAN,
                                       gpumix.torch.IMAGENET_STD, True)
    np.testing.assert_array_equal(out.numpy(), expected)
    assert len(set(params.method.tolist())) >= 5


@pytest.mark.parametrize("name", ["gridmix", "resizemix", "smoothmix"])
def test_dense_maps_take_the_same_cells_boxes_and_masks(name):
    rng = np.random.default_rng(16)
    config = only(name, resizemix_interpolation="bilinear")
    params = sample(config, 7, (13, 19), rng)
    maps = rng.integers(0, 21, (7, 13, 19)).astype(np.int64)
    out = mixing.mix_dense(maps, params)
    np.testing.assert_array_equal(out, mixing.reference_mix_dense(maps, params))
    assert set(np.unique(out)) <= set(np.unique(maps))  # labels are never blended
