"""Volumes (N, C, D, H, W) and clips mixed across time (N, T, C, H, W):
CutMix cuboids and 3-D FMix masks against independent references (slicing,
the paper's formula evaluated here in NumPy), the exact share property per
rank, isotropy of the 3-D masks, and the torch module's ``five_d``."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import gpumix
from gpumix import fmix, mixing
from gpumix.config import CUTMIX, FMIX, MIXUP, MixConfig
from gpumix.params import sample
from gpumix.torch import Mixup

ALL3 = dict(mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, mode="elem")
LAYOUT_SHAPES = {"NCDHW": (5, 2, 6, 7, 9), "NDHWC": (5, 6, 7, 9, 3), "NTCHW": (5, 4, 3, 7, 9)}


def batch(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------ mixing
@pytest.mark.parametrize("layout", sorted(LAYOUT_SHAPES))
@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32])
def test_volumes_mix_like_the_slicing_reference(layout, dtype):
    shape = LAYOUT_SHAPES[layout]
    x = batch(shape, dtype)
    params = sample(MixConfig(**ALL3), shape[0], mixing.volume_shape(shape, layout), 0)
    assert {MIXUP, CUTMIX, FMIX} <= set(params.method.tolist())
    expected = mixing.reference_mix_images(x, params, layout)
    np.testing.assert_array_equal(gpumix.mix_images(x, params, layout), expected)
    in_place = x.copy()
    assert gpumix.mix_images(in_place, params, layout, out=in_place) is in_place
    np.testing.assert_array_equal(in_place, expected)


def test_a_volume_out_of_another_shape_is_refused_by_its_own_shape():
    x = batch((2, 1, 2, 6, 5), np.float32)
    params = sample(MixConfig(**ALL3), 2, (2, 6, 5), 0)
    wrong = np.zeros((2, 1, 3, 4, 5), np.float32)  # as many planes' rows, other axes
    with pytest.raises(ValueError, match=r"out must have shape \(2, 1, 2, 6, 5\) .* got "
                                         r"\(2, 1, 3, 4, 5\)"):
        gpumix.mix_images(x, params, "NCDHW", out=wrong)


def test_a_cuboid_replaces_exactly_its_voxels_in_every_channel():
    x = batch((2, 3, 8, 8, 8), np.float32)
    params = sample(MixConfig(method_weights={"cutmix": 1}, cutmix_alpha=1.0, mode="elem"),
                    2, (8, 8, 8), 5)
    out = gpumix.mix_images(x, params, "NCDHW")
    for i in range(2):
        z0, z1, y0, y1, x0, x1 = params.box[i]
        inside = np.zeros((8, 8, 8), bool)
        inside[z0:z1, y0:y1, x0:x1] = True
        j = params.pair[i]
        np.testing.assert_array_equal(out[i][:, inside], x[j][:, inside])
        np.testing.assert_array_equal(out[i][:, ~inside], x[i][:, ~inside])


def test_cuboid_sides_follow_the_cube_root_and_lam_is_the_volume_fraction():
    lam = np.array([0.0, 0.3, 0.5, 0.875, 1.0])
    u = np.full((5, 3), 0.5)
    box = gpumix.params.cutmix_boxes(lam, u, (16, 20, 24))
    sides = box[:, 1::2] - box[:, 0::2]
    r = np.cbrt(1 - lam)
    np.testing.assert_array_equal(sides, (np.array([16, 20, 24]) * r[:, None]).astype(int))
    np.testing.assert_allclose(gpumix.params.box_lam(box, (16, 20, 24)),
                               1 - sides.prod(axis=1) / (16 * 20 * 24))
    params = sample(MixConfig(method_weights={"cutmix": 1}, cutmix_alpha=1.0, mode="elem"),
                    64, (5, 6, 7), 2)
    volume = (params.box[:, 1::2] - params.box[:, 0::2]).prod(axis=1)
    np.testing.assert_allclose(params.lam, 1 - volume / 210, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["cutmix", "fmix"]), b=st.integers(1, 5),
       shape=st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(2, 8)),
       seed=st.integers(0, 2**16))
def test_partner_share_of_voxels_is_exactly_one_minus_lam(name, b, shape, seed):
    """In 3-D as in 1-D and 2-D (tests/test_targets.py): the share of a
    sample's voxels taken from its partner is exactly 1 - lam."""
    config = MixConfig(mode="elem", pairing="roll", method_weights={name: 1},
                       **{f"{name}_alpha": 1.0})
    d, h, w = shape
    voxel = np.arange(d * h * w).reshape(shape)
    x = np.stack([np.stack([i * 100000 + voxel] * 2) for i in range(b)]).astype(np.float32)
    params = sample(config, b, shape, seed)
    mixed = gpumix.mix_images(x, params, "NCDHW")
    for i in range(b):
        from_partner = (mixed[i] // 100000) == params.pair[i]
        assert np.array_equal(from_partner[0], from_partner[1])
        if params.pair[i] != i:
            assert from_partner[0].mean() == pytest.approx(1 - float(params.lam[i]), abs=1e-6)


def test_other_methods_and_bands_refuse_volumes():
    with pytest.raises(ValueError, match="resizemix, gridmix mix 2-D images"):
        sample(MixConfig(method_weights={"resizemix": 1, "gridmix": 1}), 2, (4, 4, 4))
    with pytest.raises(ValueError, match="cutmix_axes='width'.*cuboids"):
        sample(MixConfig(cutmix_alpha=1.0, cutmix_axes="width"), 2, (4, 4, 4))
    with pytest.raises(ValueError, match=r"spatial_shape must be \(H, W\) or \(D, H, W\)"):
        sample(MixConfig(), 2, (2, 3, 4, 5))
    params = sample(MixConfig(**ALL3), 2, (3, 4, 5), 0)
    with pytest.raises(ValueError, match="images must be 5-D"):
        gpumix.mix_images(np.zeros((2, 3, 4, 5), np.uint8), params, "NCDHW")
    with pytest.raises(ValueError, match="params.box must have shape"):
        gpumix.mix_images(np.zeros((2, 1, 3, 4), np.uint8), params, "NCHW")


def test_a_volume_table_keeps_the_cuboids_and_marks_them_masked():
    from gpumix.kernels import table

    config = MixConfig(**ALL3)
    params = sample(config, 6, (3, 4, 5), 0)
    rows = gpumix.params.to_table(params, (3, 4, 5), config)
    back = gpumix.params.from_table(rows)
    np.testing.assert_array_equal(back.box, params.box)
    np.testing.assert_array_equal(rows[:, table.MASKED], params.method == CUTMIX)
    assert set(rows[:, table.HEIGHT]) == {12.0} and set(rows[:, table.DEPTH]) == {3.0}


# ------------------------------------------------------------- 3-D FMix
def paper_masks(keys, lam_k, shape, decay_power=3.0):
    """The paper's FMix masks written out here: the isotropic frequency grid
    of every axis, amplitudes 1 / max(|f|, 1 / max(shape)) ** d on the
    keys' normals (the seeded source, gpumix.kernels.normals), a float64
    inverse real FFT, and the k largest values set to 1."""
    axes = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    f = np.sqrt(sum(g ** 2 for g in np.meshgrid(*axes, indexing="ij")))
    scale = 1.0 / np.maximum(f, 1.0 / max(shape)) ** decay_power
    normals = fmix.normals_from_keys(keys, f.shape).astype(np.float64)
    spectra = scale * (normals[..., 0] + 1j * normals[..., 1])
    grey = np.fft.irfftn(spectra, s=shape, axes=tuple(range(1, len(shape) + 1)))
    masks = np.zeros((len(keys), math.prod(shape)))
    for m, g, k in zip(masks, grey.reshape(len(keys), -1), lam_k):
        m[np.argsort(-g, kind="stable")[:k]] = 1
    return masks.reshape(len(keys), *shape)


@pytest.mark.parametrize("shape", [(8, 8, 8), (5, 12, 7), (40,)])
def test_fmix_masks_in_3d_and_1d_follow_the_paper_formula(shape):
    config = MixConfig(method_weights={"fmix": 1}, fmix_alpha=1.0, mode="elem")
    if len(shape) == 1:  # signals are 1 x L images: the 2-D maths with one row is the 1-D one
        params = sample(config, 6, (1, *shape), 3)
        masks = params.mask.reshape(6, *shape)
    else:
        params = sample(config, 6, shape, 3)
        masks = params.mask
    k = np.rint(params.lam * math.prod(shape)).astype(int)
    expected = paper_masks(params.fmix_keys, k, shape)
    assert np.mean(masks != expected) < 2e-3  # float32 vs float64 near-ties only
    np.testing.assert_array_equal(masks.reshape(6, -1).sum(axis=1), k)


def test_3d_masks_are_isotropic_not_banded():
    """The paper's 3-D masks spread their energy alike along the three axes;
    the published code's slice (reference_compatible) leaves one axis with
    nothing beyond frequency 1 (banded masks)."""
    shape = (16, 16, 16)
    rng = np.random.default_rng(7)

    def axis_energy(reference_compatible):
        normals = rng.standard_normal((32, *fmix.frequency_shape(shape, reference_compatible), 2))
        grey = fmix.grey_images(normals, shape, 3.0, reference_compatible=reference_compatible)
        power = np.mean([np.abs(np.fft.fftn(g - g.mean())) ** 2 for g in grey], axis=0)
        return [power[2:6, 0, 0].sum(), power[0, 2:6, 0].sum(), power[0, 0, 2:6].sum()]

    paper = axis_energy(False)
    assert max(paper) / min(paper) < 3
    banded = axis_energy(True)
    assert min(banded) < 1e-9 * max(banded)


# ----------------------------------------------------------- torch module
@pytest.mark.parametrize("five_d,memory_format,layout", [
    ("volume", torch.contiguous_format, "NCDHW"),
    ("volume", torch.channels_last_3d, "NDHWC"),
    ("video_3d", torch.contiguous_format, "NTCHW"),
])
@pytest.mark.parametrize("inplace", [True, False])
def test_torch_module_mixes_volumes_and_clips_across_time(five_d, memory_format, layout,
                                                          inplace):
    x = torch.from_numpy(batch((6, 3, 5, 7, 8), np.uint8, 4)).contiguous(
        memory_format=memory_format)
    before = x.clone()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    mixup = Mixup(num_classes=5, five_d=five_d, seed=1, inplace=inplace, label_smoothing=0.0,
                  **ALL3)
    out, targets = mixup(x, y)
    assert (out is x) == inplace and out.shape == x.shape
    params = mixup.last_params
    assert params.box.shape == (6, 6)
    as_layout = (lambda t: t.permute(0, 2, 3, 4, 1).numpy()) if layout == "NDHWC" \
        else (lambda t: t.numpy())
    expected = mixing.reference_mix_images(np.ascontiguousarray(as_layout(before)), params,
                                           layout)
    np.testing.assert_array_equal(as_layout(out), expected)
    onehot = np.eye(5)[y.numpy()]
    lam = params.lam.astype(np.float64)[:, None]
    np.testing.assert_allclose(targets.numpy(), lam * onehot + (1 - lam) * onehot[params.pair],
                               atol=1e-6)


def test_clips_across_time_cut_a_span_of_frames():
    x = torch.arange(4 * 8, dtype=torch.float32).reshape(4, 8, 1, 1, 1).expand(
        4, 8, 2, 6, 6).contiguous()
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem", num_classes=3,
                  five_d="video_3d", seed=2)
    out, _ = mixup(x.clone(), torch.zeros(4, dtype=torch.int64))
    params = mixup.last_params
    for i in range(4):
        t0, t1 = params.box[i, :2]
        touched = (out[i] != x[i]).flatten(1).any(dim=1).numpy()
        assert not touched[:t0].any() and not touched[t1:].any()
        assert touched[t0:t1].all() == (params.lam[i] < 1)  # each frame of the span is cut


@pytest.mark.parametrize("kwargs,x,match", [
    (dict(five_d="volumes"), torch.zeros(2, 1, 2, 2, 2), "five_d"),
    (dict(five_d="volume"), torch.zeros(2, 2, 3, 4, 4).transpose(3, 4), "contiguous or "
                                                                          "channels_last_3d"),
    (dict(five_d="volume", method_weights={"smoothmix": 1}), torch.zeros(2, 1, 3, 4, 4),
     "smoothmix mix 2-D images"),
])
def test_torch_module_errors_for_volumes(kwargs, x, match):
    with pytest.raises(ValueError, match=match):
        Mixup(num_classes=2, **kwargs)(x, torch.zeros(2, dtype=torch.int64))


@pytest.mark.cuda
def test_cuda_volumes_equal_the_cpu_reference():
    x = torch.from_numpy(batch((6, 3, 5, 7, 8), np.uint8, 4))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    mixup = Mixup(num_classes=5, five_d="volume", seed=1, inplace=False, **ALL3)
    out, targets = mixup(x.cuda(), y.cuda())
    expected = mixing.reference_mix_images(x.numpy(), mixup.last_params, "NCDHW")
    np.testing.assert_array_equal(out.cpu().numpy(), expected)
    reference = mixing.reference_soft_targets(y.numpy(), mixup.last_params, 5, 0.1)
    np.testing.assert_allclose(targets.cpu().numpy(), reference, atol=1e-6)
