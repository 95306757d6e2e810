"""ResizeMix, SmoothMix, GridMix and SaliencyMix on the CUDA kernels under
the simulator, bit for bit against their CPU twins and the NumPy oracles:
the table-driven mix (with targets), the hand-off, the resize paste, the
formula masks, the saliency thumbnails and the box placement."""

import numba
import numpy as np
import pytest

import gpumix
from gpumix import mixing, saliency
from gpumix.kernels import (mix_normalize, resize_paste, saliency as thumbs, shape_mask, table,
                            table_mix)
from gpumix.kernels._launch import row_view
from gpumix.params import sample, to_table

assert numba.config.ENABLE_CUDASIM, "collected only in the simulator process"

GRID, BLOCK = (2, 3), 8  # forces both grid-stride loops to wrap
MORE = dict(method_weights={"mixup": 1, "cutmix": 1, "resizemix": 2, "smoothmix": 2,
                            "gridmix": 2, "saliencymix": 2},
            cutmix_alpha=1.0, saliencymix_alpha=1.0, mode="elem", num_classes=4)


def batch_and_table(rng, b=7, h=9, w=11, pairing="permutation", **options):
    images = rng.integers(0, 256, (b, h, w, 3), np.uint8)
    config = gpumix.MixConfig(pairing=pairing, **{**MORE, **options})
    params = saliency.place_boxes(images, sample(config, b, (h, w), rng), "NHWC")
    labels = rng.integers(0, 4, b)
    return images, params, to_table(params, (h, w), config, labels), labels


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("chw", [True, False], ids=["CHW", "HWC"])
def test_handoff_kernel_equals_its_cpu_twin(interpolation, chw):
    rng = np.random.default_rng(20)
    images, params, rows, _ = batch_and_table(rng, resizemix_interpolation=interpolation)
    assert len(set(params.method.tolist())) >= 4
    b, h, w, c = images.shape
    mean = np.asarray([120.0, 110.0, 100.0], np.float32)
    inv_std = (np.float32(1) / np.asarray([50.0, 60.0, 70.0], np.float32)).astype(np.float32)
    out = np.zeros((b, c, h, w) if chw else (b, h, w, c), np.float32)
    mix_normalize.cuda_kernel.kernel[GRID, BLOCK](images, rows, params.mask, mean, inv_std, chw,
                                                  out)
    twin = np.zeros_like(out)
    mix_normalize.cpu(images, rows, params.mask, mean, inv_std, chw, out=twin)
    np.testing.assert_array_equal(out, twin)
    np.testing.assert_array_equal(out, mix_normalize.reference(
        images, rows, params.mask, [120.0, 110.0, 100.0], [50.0, 60.0, 70.0], chw))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("pairing,resize", [("flip", False), ("permutation", True),
                                            ("flip", True)])
def test_table_mix_kernel_equals_reference(layout, dtype, pairing, resize):
    """In place by pairs exactly when the pairing is an involution and no
    sample uses ResizeMix."""
    rng = np.random.default_rng(21)
    weights = dict(MORE["method_weights"], resizemix=4 if resize else 0)
    images, params, rows, labels = batch_and_table(rng, b=12, pairing=pairing,
                                                   method_weights=weights,
                                                   resizemix_interpolation="bilinear")
    assert bool(np.any(params.method == 4)) == resize
    by_pairs = table_mix.pairs_in_place(params.pair, params.method)
    assert by_pairs == (pairing == "flip" and not resize)
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2)) if layout == "NCHW" else images
    x = x.astype(dtype)
    expected = mixing.reference_mix_images(x, params, layout)
    view = row_view(x.copy(), layout)
    out = view.rows if by_pairs else np.zeros_like(view.rows)
    targets = np.zeros((len(labels), 4), np.float32)
    error = np.zeros(1, np.int32)
    table_mix.cuda_kernel.kernel[GRID, BLOCK](
        view.rows, out, rows, params.mask, labels, targets, error, view.height, view.cstride,
        dtype == np.uint8, by_pairs, np.float32(0.025), np.float32(0.925))
    np.testing.assert_array_equal(out.reshape(x.shape), expected)
    np.testing.assert_allclose(targets, mixing.reference_soft_targets(labels, params, 4, 0.1),
                               rtol=0, atol=1e-7)
    assert error[0] == 0


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_resize_paste_kernel_equals_its_cpu_twin(bilinear, dtype):
    rng = np.random.default_rng(22)
    x = (rng.random((4, 3, 13, 10)) * 255).astype(dtype)
    box = np.array([[2, 9, 1, 8], [0, 13, 0, 10], [5, 6, 3, 4], [0, 0, 0, 0]], np.int64)
    pair = np.array([3, 2, 1, 0], np.int64)
    view = row_view(x, "NCHW")
    out = np.zeros_like(view.rows)
    samples = np.arange(4, dtype=np.int64)
    resize_paste.cuda_kernel.kernel[GRID, BLOCK](view.rows, pair, box, samples, view.height,
                                                 view.cstride, bilinear, dtype == np.uint8, out)
    twin = np.zeros_like(view.rows)
    resize_paste.cpu(view.rows, pair, box, samples, view.height, view.cstride, bilinear, out=twin)
    np.testing.assert_array_equal(out, twin)
    np.testing.assert_array_equal(out.reshape(x.shape),  # and the NumPy oracle
                                  resize_paste.reference(x, pair, box, "NCHW", bilinear))


@pytest.mark.parametrize("shape", ["circle", "square"])
def test_shape_mask_kernel_equals_its_cpu_twin(shape):
    rng = np.random.default_rng(23)
    config = gpumix.MixConfig(**{**MORE, "smoothmix_shape": shape})
    params = sample(config, 9, (10, 14), rng)
    rows = to_table(params, (10, 14), config)
    assert shape_mask.uses_shape_masks(rows)
    out = np.full((9, 10, 14), -1.0, np.float32)
    shape_mask.cuda_kernel.kernel[GRID, BLOCK](rows, out)
    twin = np.full_like(out, -1.0)
    shape_mask.cpu(rows, twin)
    np.testing.assert_array_equal(out, twin)
    np.testing.assert_array_equal(out, np.where(np.isin(params.method, (5, 6))[:, None, None],
                                                shape_mask.reference(rows, (10, 14)), -1.0))


def test_saliency_thumbnails_and_placement_equal_their_cpu_twins():
    rng = np.random.default_rng(24)
    x = rng.integers(0, 256, (4, 3, 21, 30)).astype(np.float32)
    view = row_view(x, "NCHW")
    samples = np.array([3, 0, 2], np.int64)
    out = np.zeros((3, 16, 16), np.float32)
    thumbs.cuda_kernel.kernel[GRID, BLOCK](view.rows, samples, view.height, view.cstride, 3, out)
    twin = np.zeros_like(out)
    thumbs.cpu(view.rows, samples, view.height, view.cstride, 3, out=twin)
    np.testing.assert_array_equal(out, twin)
    np.testing.assert_array_equal(out, thumbs.reference(x, "NCHW", samples, 16))

    rows = np.zeros((5, table.N_COLUMNS))
    sizes = np.array([[4, 6], [21, 30], [1, 1]])
    rows[[1, 2, 4], table.Y0] = -sizes[:, 0]
    rows[[1, 2, 4], table.X0] = -sizes[:, 1]
    todo = np.array([1, 2, 4], np.int64)
    centres = np.array([[0, 29], [10, 15], [20, 0]], np.int64)
    thumbs.place_kernel.kernel[1, 4](rows, todo, centres, 21, 30)
    np.testing.assert_array_equal(rows[todo, table.Y0:table.X1 + 1],
                                  thumbs.boxes_at(centres, sizes, (21, 30)))


def test_table_mix_targets_use_the_label_lam_column():
    rng = np.random.default_rng(25)
    images, params, _, labels = batch_and_table(rng, b=6, pairing="roll")
    config = gpumix.MixConfig(pairing="roll", **MORE)
    label_lam = (params.lam ** 2).astype(np.float32)
    rows = to_table(params, images.shape[1:3], config, labels, label_lam=label_lam)
    view = row_view(images.copy(), "NHWC")
    targets = np.zeros((6, 4), np.float32)
    table_mix.cuda_kernel.kernel[GRID, BLOCK](
        view.rows, np.zeros_like(view.rows), rows, params.mask, labels, targets,
        np.zeros(1, np.int32), view.height, view.cstride, True, False, np.float32(0),
        np.float32(1))
    relabelled = mixing.MixParams(pair=params.pair, lam=label_lam, method=params.method,
                                  box=params.box)
    np.testing.assert_allclose(targets, mixing.reference_soft_targets(labels, relabelled, 4, 0.0),
                               rtol=0, atol=1e-7)


def test_table_mix_kernel_applies_a_volumes_cuboids_through_their_masks():
    """A volume's table (D * H rows, CutMix rows marked masked) on the CUDA
    kernel equals the slicing reference, as the CPU appliers do in DALI."""
    rng = np.random.default_rng(23)
    b, d, h, w = 6, 3, 5, 7
    x = rng.integers(0, 256, (b, 2, d, h, w), np.uint8)  # NCDHW
    config = gpumix.MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, mode="elem",
                              pairing="permutation", num_classes=4)
    params = sample(config, b, (d, h, w), rng)
    assert 2 in params.method  # a cuboid
    rows = to_table(params, (d, h, w), config)
    planes = x.reshape(b, 2 * d * h, w)
    out = np.zeros_like(planes)
    targets, error = np.zeros((0, 1), np.float32), np.zeros(1, np.int32)
    table_mix.cuda_kernel.kernel[GRID, BLOCK](
        planes, out, rows, params.mask.reshape(b, d * h, w), np.zeros(1, np.int64), targets,
        error, d * h, 1, True, False, np.float32(0), np.float32(0))
    np.testing.assert_array_equal(out.reshape(x.shape),
                                  mixing.reference_mix_images(x, params, "NCDHW"))
