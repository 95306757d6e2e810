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
from gpumix.kernels import mix_normalize, table, table_mix
from gpumix.kernels._launch import row_view
from gpumix.params import sample, to_table
from gpumix.torch import identity_table

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


@pytest.mark.parametrize("chw,dtype", [(True, np.float32), (False, np.float16)],
                         ids=["CHW-float32", "HWC-float16"])
def test_handoff_kernel_on_a_resumed_pipelines_padded_batches(tmp_path, chw, dtype):
    """The loader's GPU graph (gpumix.pipelines.train_graph with the hand-off)
    on real JPEGs, 10 files in batches of 4, so every epoch ends in a batch
    padded by the reader ("fill"): resumed from a DALI checkpoint it makes the
    same crops and tables, and the simulated hand-off kernel mixes each batch
    exactly as its CPU twin and the NumPy oracle; the padding samples pair
    with themselves, so they come out unmixed."""
    from nvidia.dali import pipeline_def, types

    from gpumix.datasets import make_image_folder
    from gpumix.pipelines import train_graph

    folder = make_image_folder(tmp_path, num_classes=2, per_class=5, size=(30, 26))
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    size = (11, 9)

    def build(checkpoint=None):
        @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=8,
                      enable_checkpointing=True, exec_dynamic=True)
        def pipe():
            return train_graph(files, list(range(len(files))), num_classes=len(files),
                               size=size, device="cpu", mixing="gpumix", dtype=types.FLOAT,
                               mix_options=dict(ALL, pairing="permutation"), handoff=True)

        p = pipe(checkpoint=checkpoint) if checkpoint is not None else pipe()
        p.build()
        return p

    def batches(p, n):
        return [tuple(np.stack([np.array(s) for s in o]) for o in p.run()) for _ in range(n)]

    first = build()
    batches(first, 1)
    state = first.checkpoint()
    expected = batches(first, 5)  # batches 2-6: both epochs' padded last batches
    resumed = batches(build(state), 5)
    mean = np.asarray(MEAN, np.float32)
    inv_std = (np.float32(1) / np.asarray(STD, np.float32)).astype(np.float32)
    padded = 0
    for (images, targets, rows), (r_images, r_targets, r_rows) in zip(expected, resumed):
        np.testing.assert_array_equal(r_images, images)
        np.testing.assert_array_equal(r_rows, rows)
        np.testing.assert_array_equal(r_targets, targets)
        b, h, w, c = images.shape
        masks = mixing.masks_from_table(rows, (h, w))
        out = np.zeros((b, c, h, w) if chw else (b, h, w, c), dtype)
        mix_normalize.cuda_kernel.kernel[GRID, BLOCK](
            images, rows, masks if masks is not None else np.zeros((1, 1, 1), np.float32),
            mean, inv_std, chw, out)
        twin = np.zeros(out.shape, np.float32)
        mix_normalize.cpu(images, rows, masks, mean, inv_std, chw, out=twin)
        np.testing.assert_array_equal(out, twin.astype(dtype))
        np.testing.assert_array_equal(
            out, mix_normalize.reference(images, rows, masks, MEAN, STD, chw, dtype))
        pair, label = rows[:, table.PAIR].astype(np.int64), rows[:, table.LABEL]
        repeats = np.flatnonzero(label[1:] == label[:-1]) + 1  # every file its own label
        if repeats.size:  # the reader's padding: the epoch's last sample, repeated
            padded += 1
            pads = np.arange(repeats[0], b)
            assert np.all(pair[pads] == pads)
            assert np.all(pair[:repeats[0]] < repeats[0])  # the real samples pair among themselves
            plain = mix_normalize.reference(images, identity_table(b, (h, w)), None, MEAN, STD,
                                            chw, dtype)
            np.testing.assert_array_equal(out[pads], plain[pads])  # unmixed
    assert padded == 2
