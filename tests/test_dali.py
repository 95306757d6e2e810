"""gpumix inside real DALI pipelines (CPU-only DALI here, real JPEG decoding):
the operator against the NumPy reference on the params it returns, the
loader's epoch accounting, determinism, checkpoints, faults, training."""

import os

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types
from scipy import stats

import gpumix.dali as gdali
from gpumix import mixing, pipelines
from gpumix.config import FMIX, MIXUP
from gpumix.datasets import make_image_folder
from gpumix.params import MixParams
from gpumix.torch import DALIMixLoader

N_FILES = 21  # 3 classes x 7: batches of 4 leave a partial batch of 1


@pytest.fixture(scope="session")
def jpeg_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("jpegs"), num_classes=3, per_class=7,
                             size=(40, 52))


@pytest.fixture(scope="session")
def id_file_list(jpeg_folder, tmp_path_factory):
    """Every file its own label, so a label names a sample."""
    files = sorted(str(p) for p in jpeg_folder.rglob("*.jpg"))
    path = tmp_path_factory.mktemp("lists") / "files.txt"
    path.write_text("".join(f"{f} {i}\n" for i, f in enumerate(files)))
    return path


# ------------------------------------------------------------------ operator
METHODS = {
    "mixup": dict(mixup_alpha=1.0),
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "fmix": dict(mixup_alpha=0.0, fmix_alpha=1.0, max_soft=0.1),
    "all": dict(mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, prob=0.9,
                pairing="permutation"),
    "more": dict(method_weights={"mixup": 1, "resizemix": 1, "smoothmix": 1, "gridmix": 1,
                                 "saliencymix": 1}, saliencymix_alpha=1.0,
                 pairing="permutation"),
}


def run_operator(batch, labels, layout, options, seed=7, iterations=3, return_params=True):
    """Outputs of ``iterations`` runs of gdali.mix on ``batch`` (NumPy)."""
    b = len(batch)
    h, w = batch.shape[1:3] if layout == "HWC" else batch.shape[2:4]

    @pipeline_def(batch_size=b, num_threads=1, device_id=None, seed=seed)
    def pipe():
        images = fn.external_source(source=lambda: list(batch), batch=True, layout=layout)
        label = fn.external_source(source=lambda: [np.array([y], np.int32) for y in labels],
                                   batch=True)
        dtype = types.FLOAT16 if batch.dtype == np.float16 else None
        return gdali.mix(images, label, num_classes=5, layout=layout, size=(h, w), dtype=dtype,
                         return_params=return_params, label_smoothing=0.1, **options)

    p = pipe()
    p.build()
    # Every iteration's outputs are held until the end: the step reuses its
    # buffers, so an output that aliased them would show the last batch.
    held = [p.run() for _ in range(iterations)]
    return [[np.stack([np.array(s) for s in out]) for out in outputs] for outputs in held]


# uint8 and float32 are mixed by the numba_function applier, float16 by the
# apply python_function (the GPU pipelines' mechanism, run on the CPU).
@pytest.mark.parametrize("layout,dtype", [("HWC", np.uint8), ("CHW", np.float32),
                                          ("CHW", np.float16)])
@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("method", METHODS)
def test_operator_equals_reference_on_its_params(layout, dtype, mode, method):
    rng = np.random.default_rng(0)
    shape = (5, 12, 10, 3) if layout == "HWC" else (5, 3, 12, 10)
    batch = (rng.random(shape) * 255).astype(dtype)
    labels = rng.integers(0, 5, 5)
    seen_methods = set()
    for outputs in run_operator(batch, labels, layout, dict(mode=mode, **METHODS[method])):
        images, targets, label_out, pair, lam, method_out, box, *mask = outputs
        params = MixParams(pair=pair.reshape(-1).astype(np.int64), lam=lam.reshape(-1),
                           method=method_out.reshape(-1), box=box.astype(np.int64),
                           mask=mask[0] if mask else None)
        seen_methods |= set(params.method.tolist())
        np.testing.assert_array_equal(label_out.reshape(-1), labels)
        reference = mixing.reference_mix_images(batch, params, "NHWC" if layout == "HWC"
                                                else "NCHW")
        np.testing.assert_array_equal(images, reference)
        np.testing.assert_allclose(targets, mixing.reference_soft_targets(labels, params, 5, 0.1),
                                   rtol=0, atol=1e-7)
        if mode == "batch":
            assert len(set(params.method.tolist())) == 1
        if np.any(params.method == FMIX):
            fm = params.method == FMIX
            np.testing.assert_allclose(params.mask[fm].mean(axis=(1, 2)), params.lam[fm],
                                       atol=1e-6)
    assert seen_methods - {0}, "nothing was mixed"


@pytest.mark.parametrize("layout,dtype", [("HWC", np.uint8), ("CHW", np.float16)])
def test_appliers_make_smoothmix_and_gridmix_masks_as_the_params_step(layout, dtype):
    """Without return_params the params step makes no SmoothMix or GridMix
    masks and the appliers make them from the rows: the same images."""
    rng = np.random.default_rng(2)
    batch = (rng.random((6, 12, 10, 3) if layout == "HWC" else (6, 3, 12, 10)) * 255).astype(dtype)
    labels = rng.integers(0, 5, 6)
    options = dict(mode="elem", method_weights={"smoothmix": 1, "gridmix": 1, "fmix": 1},
                   fmix_alpha=1.0)
    with_params = run_operator(batch, labels, layout, options)
    without = run_operator(batch, labels, layout, options, return_params=False)
    for (images, targets, *params), (images_alone, targets_alone) in zip(with_params, without):
        np.testing.assert_array_equal(images_alone, images)
        np.testing.assert_array_equal(targets_alone, targets)
    methods = {m for run in with_params for m in run[5].reshape(-1).tolist()}
    assert {3, 5, 6} <= methods


MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def crop_mirror_normalize(batch, output_layout, mean=MEAN, std=STD):
    """DALI's own crop_mirror_normalize (no crop, no mirror) of a NumPy HWC batch."""
    @pipeline_def(batch_size=len(batch), num_threads=1, device_id=None)
    def pipe():
        images = fn.external_source(source=lambda: list(batch), batch=True, layout="HWC")
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=output_layout,
                                        mean=mean, std=std)

    p = pipe()
    p.build()
    return np.stack([np.array(s) for s in p.run()[0]])


# The fused CPU applier against DALI's own operators: the core reference mix
# on the params it returns, then DALI's crop_mirror_normalize. RGB to CHW has
# its own loops; HWC output and grey images take the row-by-row path.
@pytest.mark.parametrize("output_layout,channels", [("CHW", 3), ("HWC", 3), ("CHW", 1)])
@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("method", METHODS)
def test_mix_normalize_equals_reference_then_crop_mirror_normalize(output_layout, channels, mode,
                                                                   method):
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (5, 12, 10, channels), np.uint8)
    labels = rng.integers(0, 5, 5)
    mean, std = (MEAN, STD) if channels == 3 else ([127.5], [64.0])

    @pipeline_def(batch_size=5, num_threads=1, device_id=None, seed=11)
    def pipe():
        images = fn.external_source(source=lambda: list(batch), batch=True, layout="HWC")
        label = fn.external_source(source=lambda: [np.array([y], np.int32) for y in labels],
                                   batch=True)
        return gdali.mix_normalize(images, label, num_classes=5, mean=mean, std=std,
                                   output_layout=output_layout, size=(12, 10),
                                   return_params=True, label_smoothing=0.1, mode=mode,
                                   **METHODS[method])

    p = pipe()
    p.build()
    seen_methods = set()
    for _ in range(3):
        images, targets, _, pair, lam, method_out, box, *mask = [
            np.stack([np.array(s) for s in out]) for out in p.run()]
        params = MixParams(pair=pair.reshape(-1).astype(np.int64), lam=lam.reshape(-1),
                           method=method_out.reshape(-1), box=box.astype(np.int64),
                           mask=mask[0] if mask else None)
        seen_methods |= set(params.method.tolist())
        expected = crop_mirror_normalize(mixing.reference_mix_images(batch, params, "NHWC"),
                                         output_layout, mean, std)
        assert images.dtype == np.float32 and images.shape == expected.shape
        # One grey level is 1/57 here: a tolerance of 1e-5 lets no mixing error through.
        np.testing.assert_allclose(images, expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(targets, mixing.reference_soft_targets(labels, params, 5, 0.1),
                                   rtol=0, atol=1e-7)
    assert seen_methods - {0}, "nothing was mixed"


def split_and_fused(options, names, labels, num_classes=5):
    """Per run: (fused images, targets, table) from mix_normalize with the
    params as outputs, and (images, targets, table) from mix_params, the
    split API, with the same pipeline seed and inputs."""
    batch = np.random.default_rng(3).integers(0, 256, (len(labels), 12, 10, 3), np.uint8)
    runs = []
    for split in (False, True):
        @pipeline_def(batch_size=len(labels), num_threads=2, device_id=None, seed=5,
                      exec_dynamic=True)
        def pipe():
            images = fn.external_source(source=lambda: list(batch), batch=True, layout="HWC")
            label = fn.external_source(source=lambda: [np.array([y], np.int32) for y in labels],
                                       batch=True)
            info = fn.external_source(source=lambda: [np.frombuffer(n, np.uint8) for n in names],
                                      batch=True)
            if split:
                targets, rows = gdali.mix_params(label, num_classes=num_classes, size=(12, 10),
                                                 source_info=info, label_smoothing=0.1,
                                                 **options)
                return images, targets, rows
            return gdali.mix_normalize(images, label, num_classes=num_classes, mean=MEAN,
                                       std=STD, size=(12, 10), source_info=info,
                                       return_params=True, label_smoothing=0.1, **options)

        p = pipe()
        p.build()
        runs.append([[np.stack([np.array(s) for s in out]) for out in p.run()]
                     for _ in range(3)])
    return batch, runs


@pytest.mark.parametrize("method", ["all", "mixup", "more"])
def test_mix_params_then_apply_equals_mix_normalize(method):
    """The split API (params in the pipeline, gpumix.torch.apply at the
    hand-off) stores exactly what the in-graph operator stores. The last two
    samples are padding (the same file twice): partners stay among the real
    samples, and padding pairs with itself."""
    from gpumix.kernels import table as columns
    from gpumix.torch import apply

    names = [b"a.jpg", b"b.jpg", b"c.jpg", b"d.jpg", b"e.jpg", b"e.jpg"]
    batch, (fused, split) = split_and_fused(dict(mode="elem", **METHODS[method]), names,
                                            [0, 1, 2, 3, 4, 4])
    for (images, targets, labels, pair, lam, method_out, box, *_), (raw, t_split, rows) in \
            zip(fused, split):
        np.testing.assert_array_equal(raw, batch)
        np.testing.assert_array_equal(rows[:, columns.PAIR], pair.reshape(-1))
        np.testing.assert_array_equal(rows[:, columns.LAM].astype(np.float32), lam.reshape(-1))
        np.testing.assert_array_equal(t_split, targets)
        mixed, _, applied = apply(torch.from_numpy(raw), torch.from_numpy(rows), mean=MEAN,
                                  std=STD, return_applied=True)
        np.testing.assert_array_equal(applied.numpy(), box)  # SaliencyMix's placed alike
        np.testing.assert_array_equal(mixed.numpy(), images)
        assert set(pair.reshape(-1)[:5]) <= set(range(5)) and pair.reshape(-1)[5] == 5
    assert not np.array_equal(fused[0][0], fused[1][0])  # the batches do differ
    assert set(np.concatenate([run[5].reshape(-1) for run in fused])) - {0}, "nothing mixed"


def test_params_operator_reports_bad_labels():
    batch = np.zeros((3, 12, 10, 3), np.uint8)

    @pipeline_def(batch_size=3, num_threads=1, device_id=None, seed=5)
    def pipe():
        images = fn.external_source(source=lambda: list(batch), batch=True, layout="HWC")
        label = fn.external_source(source=lambda: [np.array([y], np.int32) for y in (0, 7, 1)],
                                   batch=True)
        return gdali.mix_normalize(images, label, num_classes=5, mean=MEAN, std=STD,
                                   size=(12, 10), mixup_alpha=1.0)

    p = pipe()
    p.build()
    _, targets = p.run()
    assert np.isnan(np.stack([np.array(t) for t in targets])).all()
    with pytest.raises(ValueError, match="labels"):
        gdali.raise_pending(p)
    gdali.raise_pending(p)  # reported once


def test_a_collected_step_fails_its_batch_instead_of_raising():
    """A pipeline dropped while DALI still runs an iteration it prefetched:
    its params step is gone, and the compiled operator must get a failed
    batch back, not an exception (one raised there ended the process)."""
    from gpumix import dali_cpu

    unknown = max(dali_cpu._STEPS.keys(), default=0) + 1000
    targets, rows, masks, ok = dali_cpu._step_outputs(unknown, np.zeros((2, 6)), 2, None,
                                                      None, False)
    assert ok == 0 and targets.size == rows.size == masks.size == 0
    # The ctypes callback the compiled operator calls: 0 for a failed batch,
    # and the result addresses left alone.
    draws, shapes, addresses = np.zeros((2, 6)), np.zeros((2, 3), np.int64), np.zeros(2, np.int64)
    results = np.full(3, -1, np.int64)
    assert dali_cpu._RUN_STEP(unknown, 2, 6, draws.ctypes.data, 2, shapes.ctypes.data,
                              addresses.ctypes.data, 0, 10, 0, 0, results.ctypes.data) == 0
    assert (results == -1).all()


def test_the_callback_hands_back_the_steps_arrays_or_a_failed_batch():
    """The params operator's callback writes the addresses of the step's
    targets, rows and masks for the compiled side to copy from, and keeps
    the arrays alive on the step; outputs of the wrong shape for DALI's
    buffers fail the batch with an error for raise_pending, not a crash."""
    from gpumix import dali_cpu
    from gpumix.kernels import table as columns

    class Step:
        def __init__(self, n_classes):
            self.errors, self.n_classes = [], n_classes

        def fast_outputs(self, draw_table, n_valid, shapes, addresses):
            n = len(draw_table)
            return (np.full((n, self.n_classes), 0.25, np.float32),
                    np.arange(n * columns.N_COLUMNS, dtype=np.float64).reshape(n, -1),
                    np.ones((n, 4, 5), np.float32))

    step = Step(3)
    index = max(dali_cpu._STEPS.keys(), default=0) + 2000
    dali_cpu._STEPS[index] = step
    draws, shapes, addresses = np.zeros((2, 6)), np.zeros((2, 3), np.int64), np.zeros(2, np.int64)
    results = np.zeros(3, np.int64)

    def call(n_targets, mask_rows, mask_cols):
        return dali_cpu._RUN_STEP(index, 2, 6, draws.ctypes.data, 2, shapes.ctypes.data,
                                  addresses.ctypes.data, 0, n_targets, mask_rows, mask_cols,
                                  results.ctypes.data)

    assert call(3, 4, 5) == 1 and not step.errors
    targets, rows, masks = step.held
    assert list(results) == [a.ctypes.data for a in (targets, rows, masks)]
    assert call(3, 0, 0) == 1 and results[2] == 0  # no masks asked for
    assert call(4, 4, 5) == 0  # DALI's targets are 4 wide, the step's 3
    assert len(step.errors) == 1 and "(2, 4)" in str(step.errors[0])
    step.fast_outputs = lambda *args: (None, None)  # breaks the callback itself
    assert call(3, 4, 5) == 0
    assert len(step.errors) == 2 and isinstance(step.errors[1], ValueError)
    del dali_cpu._STEPS[index]


def test_partner_is_read_only_through_the_buffer_the_step_saw():
    """The per-sample applier follows the partner address only when the own
    address in the row is the buffer it was given; otherwise it mixes nothing
    and sets the row's error flag (gpumix/dali_cpu.py)."""
    from numba import njit

    from gpumix import dali_cpu
    from gpumix.config import MixConfig
    from gpumix.kernels import table as columns
    from gpumix.params import sample, to_table

    images = [np.full((4, 3, 3), value, np.uint8) for value in (10, 20)]
    own = np.array([image.ctypes.data for image in images], np.int64)
    flag = np.zeros(1, np.int64)
    config = MixConfig(num_classes=2)
    rows = to_table(sample(config, 2, (4, 3), np.random.default_rng(0)), (4, 3), config,
                    own_address=own, error_address=flag.ctypes.data)
    partner = njit(lambda image, row: dali_cpu.partner_of(image, row).copy())
    np.testing.assert_array_equal(partner(images[0], rows[0]), images[1])
    assert flag[0] == 0
    stale = rows[0].copy()
    stale[columns.OWN_ADDRESS] += 64  # not this buffer: nothing is mixed, the flag is set
    np.testing.assert_array_equal(partner(images[0], stale), images[0])
    assert flag[0] == 1


@pytest.mark.parametrize("output_layout", ["CHW", "HWC"])
@pytest.mark.parametrize("mean,std", [(MEAN, STD), ([127.5], [64.0])], ids=["rgb", "one-for-all"])
def test_normalize_equals_crop_mirror_normalize(output_layout, mean, std):
    batch = np.random.default_rng(2).integers(0, 256, (3, 9, 7, 3), np.uint8)

    @pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def pipe():
        images = fn.external_source(source=lambda: list(batch), batch=True, layout="HWC")
        return gdali.normalize(images, mean=mean, std=std, output_layout=output_layout)

    p = pipe()
    p.build()
    (out,) = p.run()
    assert out.layout() == output_layout
    np.testing.assert_allclose(np.stack([np.array(s) for s in out]),
                               crop_mirror_normalize(batch, output_layout, mean, std),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("options,error,match", [
    (dict(mean=[1, 2, 3], std=[1, 2]), ValueError, "mean and std"),
    (dict(mean=[1, 2, 3], std=[1, 0, 2]), ValueError, "std positive"),
    (dict(mean=[1], std=[1], output_layout="NCHW"), ValueError, "output_layout"),
    (dict(mean=[1], std=[1], dtype=types.UINT8), TypeError, "dtype"),
])
def test_normalize_refuses_bad_options(options, error, match):
    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        images = fn.external_source(source=lambda: [np.zeros((4, 4, 3), np.uint8)],
                                    batch=True, layout="HWC")
        return gdali.normalize(images, **options)

    with pytest.raises(error, match=match):
        pipe().build()


def test_apply_step_refuses_images_of_another_size_than_given():
    batch = np.zeros((3, 3, 12, 10), np.float16)

    @pipeline_def(batch_size=3, num_threads=1, device_id=None, seed=1)
    def pipe():
        images = fn.external_source(source=lambda: list(batch), batch=True, layout="CHW")
        label = fn.external_source(source=lambda: [np.array([0], np.int32)] * 3, batch=True)
        return gdali.mix(images, label, num_classes=2, layout="CHW", size=(10, 12),
                         dtype=types.FLOAT16, mixup_alpha=1.0)

    p = pipe()
    p.build()
    p.run()
    with pytest.raises(ValueError, match=r"images are 12 x 10 but mix\(\) was given size"):
        gdali.raise_pending(p)


def test_gpu_mixing_needs_a_size():
    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        images = fn.external_source(source=lambda: [np.zeros((4, 4, 3), np.uint8)] * 2,
                                    batch=True, layout="HWC")
        label = fn.external_source(source=lambda: [np.array([0], np.int32)] * 2, batch=True)
        return gdali.mix(images, label, num_classes=2, device="gpu")

    with pytest.raises(ValueError, match=r"size=\(H, W\) is required with device='gpu'"):
        pipe()


@pytest.mark.parametrize("options,method,law", [
    (dict(mixup_alpha=0.5), MIXUP, stats.beta(0.5, 0.5)),
    (dict(mixup_alpha=0.0, fmix_alpha=2.0, reformulate=True), FMIX, stats.beta(3.0, 2.0)),
], ids=["mixup", "fmix-reformulated"])
def test_operator_lam_follows_its_law(options, method, law):
    """The DALI draws land in the right columns: lam over many samples of
    one method follows that method's Beta law (KS test; FMix's k / N is lam
    rounded to a pixel of 1/120, far below the test's resolution)."""
    rng = np.random.default_rng(4)
    batch = (rng.random((32, 10, 12, 3)) * 255).astype(np.uint8)
    labels = rng.integers(0, 5, 32)
    lams = []
    for outputs in run_operator(batch, labels, "HWC", dict(mode="elem", **options),
                                iterations=10):
        method_out, lam = outputs[5].reshape(-1), outputs[4].reshape(-1)
        assert np.all(method_out == method)
        lams.extend(lam.tolist())
    assert stats.kstest(lams, law.cdf).pvalue > 1e-3


def test_each_pipeline_seed_is_its_own_stream():
    batch = (np.random.default_rng(0).random((4, 8, 8, 3)) * 255).astype(np.uint8)
    a = run_operator(batch, [0, 1, 2, 3], "HWC", METHODS["all"], seed=1)
    b = run_operator(batch, [0, 1, 2, 3], "HWC", METHODS["all"], seed=1)
    c = run_operator(batch, [0, 1, 2, 3], "HWC", METHODS["all"], seed=2)
    np.testing.assert_array_equal(a[0][0], b[0][0])
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_restrict_pairing_keeps_partners_inside_the_real_samples():
    rng = np.random.default_rng(0)
    for b in range(2, 9):
        for n_valid in range(1, b + 1):
            perm = rng.permutation(b)
            pair = gdali.restrict_pairing(perm, n_valid)
            valid = pair[:n_valid]
            assert sorted(valid) == list(range(n_valid))  # a permutation of the real ones
            if n_valid >= 2:
                assert not np.any(valid == np.arange(n_valid))
            np.testing.assert_array_equal(pair[n_valid:], np.arange(n_valid, b))


# ------------------------------------------------------------------ loader
@pytest.mark.parametrize("policy,expected_len", [("partial", 6), ("drop", 5), ("fill", 6)])
def test_epoch_accounting(id_file_list, policy, expected_len):
    loader = DALIMixLoader(file_list=id_file_list, batch_size=4, size=16, mode="elem",
                           mixup_alpha=1.0, cutmix_alpha=1.0, pairing="permutation",
                           last_batch_policy=policy, return_params=True, seed=1)
    assert len(loader) == expected_len
    for _ in range(2):  # two epochs, reset between them by the iterator
        primaries = []
        batches = 0
        for images, targets, params in loader:
            batches += 1
            b = images.shape[0]
            labels = params["labels"].tolist()
            pair = params["pair"]
            assert targets.shape == (b, N_FILES)
            assert torch.all((pair >= 0) & (pair < b))  # partners from this batch
            n_real = len(dict.fromkeys(labels))  # padding repeats the last sample
            if n_real >= 2:
                assert not torch.any(pair[:n_real] == torch.arange(n_real))
            primaries += labels[:n_real]
            torch.testing.assert_close(targets.sum(1), torch.ones(b), rtol=0, atol=1e-6)
        assert batches == expected_len
        expected = N_FILES - (N_FILES % 4 if policy == "drop" else 0)
        assert len(primaries) == expected == len(set(primaries))  # no loss, no duplicates
        if policy == "partial":
            assert images.shape[0] == N_FILES % 4
        if policy == "fill":
            assert images.shape[0] == 4


@pytest.mark.parametrize("batch_size,expected_len", [(4, 2), (3, 3), (11, 1)])
def test_drop_over_uneven_shards_reads_each_epoch_whole(id_file_list, batch_size, expected_len):
    """21 samples in two shards (10 and 11): every rank makes the same
    number of steps, those of the larger shard, each epoch is read once with
    no repeat, and the next epoch starts where it should (DALI's own DROP
    returned the padding of the smaller shard as the next epoch's batch)."""
    loaders = [DALIMixLoader(file_list=id_file_list, batch_size=batch_size, size=16,
                             mixup_alpha=1.0, mode="elem", last_batch_policy="drop",
                             return_params=True, shard_id=rank, num_shards=2, seed=3)
               for rank in range(2)]
    for epoch_index in range(3):
        seen = []
        for loader in loaders:
            assert len(loader) == expected_len
            batches = [params["labels"].tolist() for _, _, params in loader]
            assert len(batches) == expected_len
            # a batch holds batch_size samples, or one fewer at the smaller shard's end
            assert all(len(b) >= batch_size - 1 for b in batches)
            assert all(len(b) == batch_size for b in batches[:-1])
            seen += [label for b in batches for label in b]
        assert len(seen) == len(set(seen)), f"epoch {epoch_index} repeats a sample"
        assert len(seen) >= 2 * expected_len * batch_size - 1


def test_drop_over_shards_resumes_bit_for_bit(id_file_list):
    """A checkpoint after the first batch: the resumed loader reads the rest
    of the epoch (its short tail left out) and the next, as an unbroken run."""
    options = dict(file_list=id_file_list, batch_size=4, size=16, mixup_alpha=1.0,
                   mode="elem", last_batch_policy="drop", shard_id=1, num_shards=2, seed=5)
    whole = DALIMixLoader(**options)
    expected = [x.clone() for _ in range(2) for x, _ in whole]
    part = DALIMixLoader(**options)
    first, _ = next(iter(part))
    resumed = DALIMixLoader(checkpoint=part.state_dict(), **options)
    got = [first.clone()] + [x.clone() for _ in range(2) for x, _ in resumed]
    assert len(got) == len(expected) == 2 * len(whole)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_file_listed_twice_is_not_taken_for_padding(jpeg_folder, tmp_path):
    """Oversampling: the last file of a full batch listed twice in a row. Its
    repeat is a real sample, mixed with its roll partner, not padding."""
    files = sorted(str(p) for p in jpeg_folder.rglob("*.jpg"))[:7]
    listing = tmp_path / "twice.txt"
    listing.write_text("".join(f"{f} {i}\n" for i, f in enumerate(files + files[-1:])))
    loader = DALIMixLoader(file_list=listing, batch_size=4, size=16, shuffle=False,
                           mixup_alpha=1.0, pairing="roll", return_params=True, seed=0)
    batches = [params for _, _, params in loader]
    assert [b["labels"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for params in batches:
        assert params["pair"].tolist() == [3, 0, 1, 2]


def test_distinct_paths_spell_repeats_apart(jpeg_folder):
    files = [str(p) for p in sorted(jpeg_folder.rglob("*.jpg"))[:2]]
    a, b = files
    spelled = pipelines.distinct_paths([a, a, b, a])
    assert len(set(spelled)) == 4
    assert spelled[0] == a and spelled[2] == b
    assert all(os.path.samefile(p, q) for p, q in zip(spelled, [a, a, b, a]))


@pytest.mark.parametrize("size", [(16, 24), (24, 16)])
def test_validation_crops_any_shape(jpeg_folder, size):
    loader = DALIMixLoader(jpeg_folder, batch_size=4, size=size, train=False)
    images, labels = next(iter(loader))
    assert tuple(images.shape) == (4, 3, *size)


def test_empty_class_folders_keep_their_target_columns(tmp_path):
    root = make_image_folder(tmp_path / "data", num_classes=2, per_class=2, size=(16, 16))
    (root / "zz_empty").mkdir()
    loader = DALIMixLoader(root, batch_size=4, size=16, mixup_alpha=1.0)
    assert loader.classes[-1] == "zz_empty" and loader.num_classes == 3
    _, targets = next(iter(loader))
    assert tuple(targets.shape) == (4, 3)


def epoch(loader):
    return [(x.clone(), t.clone()) for x, t in loader]


def test_same_seed_same_epochs_and_different_seed_different_mixing(jpeg_folder):
    options = dict(batch_size=8, size=24, mixup_alpha=0.4, cutmix_alpha=1.0, mode="elem")
    a = epoch(DALIMixLoader(jpeg_folder, seed=5, **options))
    b = epoch(DALIMixLoader(jpeg_folder, seed=5, **options))
    c = epoch(DALIMixLoader(jpeg_folder, seed=6, **options))
    for (xa, ta), (xb, tb) in zip(a, b):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ta, tb, rtol=0, atol=0)
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_checkpoint_mid_epoch_restores_bit_for_bit(jpeg_folder):
    options = dict(batch_size=4, size=24, mixup_alpha=1.0, fmix_alpha=1.0, mode="elem",
                   seed=9)
    loader = DALIMixLoader(jpeg_folder, **options)
    stream = iter(loader)
    for _ in range(2):
        next(stream)
    state = loader.state_dict()
    expected = [next(stream) for _ in range(3)]
    resumed = iter(DALIMixLoader(jpeg_folder, checkpoint=state, **options))
    for (x, t), (rx, rt) in zip(expected, (next(resumed) for _ in range(3))):
        torch.testing.assert_close(rx, x, rtol=0, atol=0)
        torch.testing.assert_close(rt, t, rtol=0, atol=0)


@pytest.mark.parametrize("name,damage", [
    ("truncated.jpg", lambda data: data[:200]),
    ("garbage.jpg", lambda data: bytes(range(256)) * 8),
    ("flipped.jpg", lambda data: data[:2] + bytes(b ^ 0xFF for b in data[2:400]) + data[400:]),
], ids=["truncated", "garbage", "corrupt-header"])
def test_corrupt_jpeg_error_names_the_file(jpeg_folder, tmp_path, name, damage):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    good = sorted(jpeg_folder.rglob("*.jpg"))[:3]
    for i, f in enumerate(good):
        (root / "a" / f"{i}.jpg").write_bytes(f.read_bytes())
    (root / "a" / name).write_bytes(damage(good[0].read_bytes()))
    with pytest.raises(RuntimeError, match=name):
        for _ in DALIMixLoader(root, batch_size=2, size=16, shuffle=False):
            pass


def test_empty_and_missing_folders_fail_at_construction(tmp_path):
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        DALIMixLoader(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DALIMixLoader(tmp_path / "nowhere")


def test_loader_refuses_outputs_it_does_not_make(jpeg_folder):
    with pytest.raises(ValueError, match="targets: the loader's labels are its folders'"):
        DALIMixLoader(jpeg_folder, targets="dense")
    with pytest.raises(ValueError, match="return_clean need train=True and mixing='gpumix'"):
        DALIMixLoader(jpeg_folder, mixing="none", return_clean=True)


@pytest.mark.parametrize("split,handoff", [
    (False, False), (True, True),
    pytest.param(False, "gpu", marks=pytest.mark.cuda),
    pytest.param(True, "gpu", marks=pytest.mark.cuda),
], ids=["soft-in-graph", "split-hand-off", "soft-gpu", "split-gpu"])
def test_loader_split_targets_and_clean_batch(jpeg_folder, split, handoff):
    """Split targets are each sample's class, its partner's and the label
    weight (label_lam of lam); soft targets are the reference's on the
    batch's params. The clean batch is the crops the mixed batch was mixed
    from: the reference mix of the clean pixels on those params, normalised
    by DALI's crop_mirror_normalize, is the mixed batch. (The in-graph and
    hand-off loaders give the same batches: test_hand_off_gives_...)"""
    where = dict(device="gpu") if handoff == "gpu" else dict(device="cpu", handoff=handoff)
    loader = DALIMixLoader(jpeg_folder, batch_size=8, size=(20, 16), seed=2, **where,
                           mode="elem", mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0,
                           label_smoothing=0.1, split_targets=split, return_clean=True,
                           label_lam=np.sqrt if split else None, return_params=True)
    mixed_any = False
    for batch in loader:
        mixed, targets, clean, clean_targets, params = to_cpu(batch)
        labels, pair, lam = params["labels"], params["pair"], params["lam"]
        reference = MixParams(pair=pair.numpy(), lam=lam.numpy(), method=params["method"].numpy(),
                              box=params["box"].numpy(), mask=params["mask"].numpy())
        if split:
            y_a, y_b, weight = targets
            assert y_a.dtype == y_b.dtype == torch.int64 and weight.dtype == torch.float32
            torch.testing.assert_close(y_a, labels, rtol=0, atol=0)
            torch.testing.assert_close(y_b, labels[pair], rtol=0, atol=0)
            torch.testing.assert_close(weight, torch.sqrt(lam), rtol=1e-6, atol=0)
            torch.testing.assert_close(clean_targets, labels, rtol=0, atol=0)
        else:
            np.testing.assert_allclose(targets, mixing.reference_soft_targets(
                labels.numpy(), reference, 3, 0.1), rtol=0, atol=1e-7)
            np.testing.assert_allclose(clean_targets, np.eye(3)[labels] * 0.9 + 0.1 / 3,
                                       rtol=0, atol=1e-7)
        pixels = clean.permute(0, 2, 3, 1).numpy() * np.float32(STD) + np.float32(MEAN)
        crops = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        expected = crop_mirror_normalize(mixing.reference_mix_images(crops, reference, "NHWC"),
                                         "CHW")
        np.testing.assert_allclose(mixed.numpy(), expected, rtol=0, atol=1e-4)
        mixed_any |= not torch.equal(mixed, clean)
    assert mixed_any, "nothing was mixed"


def test_validation_mode_yields_labels_unmixed(jpeg_folder):
    loader = DALIMixLoader(jpeg_folder, train=False, batch_size=8, size=24)
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == sorted(labels.tolist())  # unshuffled folder order
    assert torch.bincount(labels).tolist() == [7, 7, 7]


def test_reset_starts_a_new_epoch_after_an_early_break(id_file_list):
    loader = DALIMixLoader(file_list=id_file_list, batch_size=4, size=16, train=False)
    for _, labels in loader:
        break
    assert labels.tolist() == [0, 1, 2, 3]
    assert next(iter(loader))[1].tolist() == [4, 5, 6, 7]  # resumes, like a generator
    loader.reset()
    assert [y.tolist() for _, y in loader][0] == [0, 1, 2, 3]
    loader.reset()  # at an epoch boundary: nothing to skip
    assert len(list(loader)) == 6


def test_channels_last_and_float16(jpeg_folder):
    x, t = next(iter(DALIMixLoader(jpeg_folder, batch_size=4, size=20, channels_last=True,
                                   dtype=torch.float16)))
    assert x.shape == (4, 3, 20, 20) and x.dtype == torch.float16
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert t.dtype == torch.float32


@pytest.mark.parametrize("options", [dict(mixup_alpha=0.8), dict(mixup_alpha=0.0,
                                                                   cutmix_alpha=1.0)])
def test_pure_dali_baseline_gives_soft_targets(jpeg_folder, options):
    from gpumix.benchmarks import baselines

    name = "mixup" if options["mixup_alpha"] > 0 else "cutmix"
    alpha = options["mixup_alpha"] or options.get("cutmix_alpha")
    loader = DALIMixLoader(jpeg_folder, batch_size=4, size=24,
                           mixing=baselines.named(name, alpha=alpha))
    x, t = next(iter(loader))
    assert x.shape == (4, 3, 24, 24)
    torch.testing.assert_close(t.sum(1), torch.ones(4), rtol=0, atol=1e-5)
    assert torch.all(t.max(1).values < 1.0)  # smoothed and mixed, never one-hot


def test_a_tiny_cnn_learns_from_the_loader(jpeg_folder):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    train = DALIMixLoader(jpeg_folder, batch_size=7, size=24, mixup_alpha=0.2,
                          cutmix_alpha=1.0, seed=0)
    val = DALIMixLoader(jpeg_folder, batch_size=21, size=24, train=False)

    def val_loss():
        with torch.no_grad():
            (x, y), = list(val)  # one batch of all 21 images
            return torch.nn.functional.cross_entropy(model(x), y).item()

    before = val_loss()
    for _ in range(8):
        for x, targets in train:
            loss = torch.nn.functional.cross_entropy(model(x), targets)  # soft targets
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert val_loss() < 0.8 * before


# ------------------------------------------------------------------ GPU
@pytest.mark.cuda
def test_gpu_loader_matches_the_cpu_contract(id_file_list):
    loader = DALIMixLoader(file_list=id_file_list, batch_size=4, size=16, device="gpu",
                           mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, mode="elem",
                           return_params=True, seed=1)
    primaries = []
    for images, targets, params in loader:
        assert images.is_cuda and targets.is_cuda
        torch.testing.assert_close(targets.sum(1), torch.ones(len(targets), device="cuda"),
                                   rtol=0, atol=1e-6)
        primaries += params["labels"].tolist()[: len(set(params["labels"].tolist()))]
    assert sorted(primaries) == list(range(N_FILES))


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["mixup", "cutmix", "fmix", "more"])
def test_gpu_operator_equals_reference(method):
    rng = np.random.default_rng(0)
    batch = (rng.random((5, 12, 10, 3)) * 255).astype(np.uint8)

    @pipeline_def(batch_size=5, num_threads=1, device_id=0, seed=3)
    def pipe():
        images = fn.external_source(source=lambda: list(batch), batch=True, layout="HWC")
        label = fn.external_source(source=lambda: [np.array([i], np.int32) for i in range(5)],
                                   batch=True)
        return gdali.mix(images.gpu(), label, num_classes=5, size=(12, 10), return_params=True,
                         device="gpu", mode="elem", **METHODS[method])

    p = pipe()
    p.build()
    images, targets, _, pair, lam, method_out, box, *mask = [
        np.stack([np.array(s) for s in out.as_cpu()]) for out in p.run()]
    params = MixParams(pair=pair.reshape(-1).astype(np.int64), lam=lam.reshape(-1),
                       method=method_out.reshape(-1), box=box.astype(np.int64),
                       mask=mask[0] if mask else None)
    np.testing.assert_array_equal(images, mixing.reference_mix_images(batch, params, "NHWC"))


def test_no_gpu_here_means_auto_picks_cpu_with_a_reason(jpeg_folder):
    loader = DALIMixLoader(jpeg_folder, batch_size=4, size=16)
    assert loader.device == ("gpu" if torch.cuda.is_available() else "cpu")
    assert "cuda" in loader.device_choice.reason.lower()


def test_decode_error_search_starts_where_the_reader_was_and_stops_early(monkeypatch):
    """After a decoding error the loader re-reads the files from the reader's
    position in its first-epoch order, a chunk at a time, and stops at the
    chunk holding the broken file (not 1.28 M decodes on ImageNet)."""
    from PIL import Image

    from gpumix.loader import find_unreadable, suspects

    files = [f"f{i}.jpg" for i in range(1000)]
    order = np.random.default_rng(0).permutation(1000)
    ahead = suspects(files, order, shard_id=1, num_shards=2, read=64, first_epoch=True)
    assert sorted(ahead) == sorted(files)  # nothing is left out
    assert ahead[0] == files[order[500 + 64]]  # shard 1 starts at 500, 64 samples read
    assert suspects(files, order, 1, 2, 64, first_epoch=False) == files
    opened = []

    class Readable:  # a file Pillow decodes
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def load(self):
            return None

    def fake_open(path):
        opened.append(path)
        if path == ahead[10]:
            raise OSError("Truncated File Read")
        return Readable()

    monkeypatch.setattr(Image, "open", fake_open)
    found = find_unreadable(ahead, num_threads=2, chunk=8)
    assert found.startswith(ahead[10]) and "Truncated" in found
    assert len(opened) == 16  # two chunks, not the dataset


@pytest.mark.parametrize("options", [
    dict(mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0),
    dict(method_weights={"resizemix": 1, "smoothmix": 1, "gridmix": 1, "saliencymix": 1},
         saliencymix_alpha=1.0, resizemix_interpolation="bilinear"),
], ids=["mixup-cutmix-fmix", "resizemix-smoothmix-gridmix-saliencymix"])
def test_mix_params_checkpoint_restores_the_tables_and_the_hand_off(jpeg_folder, options):
    """A pipeline with mix_params resumed from a DALI checkpoint makes the
    same tables, so the hand-off mixes the same batches bit for bit."""
    from gpumix.torch import apply

    files = sorted(str(p) for p in jpeg_folder.rglob("*.jpg"))

    def build(checkpoint=None):
        @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=11,
                      enable_checkpointing=True, exec_dynamic=True)
        def pipe():
            jpegs, labels = fn.readers.file(files=files, labels=list(range(len(files))),
                                            random_shuffle=True, seed=3, name="reader")
            images = fn.resize(fn.decoders.image(jpegs), size=(16, 12))
            targets, rows = gdali.mix_params(labels, num_classes=len(files), size=(16, 12),
                                             mode="elem", **options)
            return images, targets, rows

        p = pipe(checkpoint=checkpoint) if checkpoint is not None else pipe()
        p.build()
        return p

    def batches(p, n):
        out = []
        for _ in range(n):
            images, targets, rows = [np.stack([np.array(s) for s in o]) for o in p.run()]
            mixed = apply(torch.from_numpy(images), torch.from_numpy(rows))
            out.append((rows, targets, mixed.numpy()))
        return out

    first = build()
    batches(first, 2)
    state = first.checkpoint()
    expected = batches(first, 3)
    resumed = batches(build(state), 3)
    assert not np.array_equal(expected[0][0], expected[1][0])  # the draws do move on
    for (rows, targets, mixed), (r_rows, r_targets, r_mixed) in zip(expected, resumed):
        np.testing.assert_array_equal(r_rows, rows)
        np.testing.assert_array_equal(r_targets, targets)
        np.testing.assert_array_equal(r_mixed, mixed)


@pytest.mark.parametrize("options", [
    dict(mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, mode="elem", return_params=True),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, channels_last=True, last_batch_policy="fill"),
    dict(mixing="none"),
    dict(method_weights={"cutmix": 1, "resizemix": 1, "smoothmix": 1, "gridmix": 1,
                         "saliencymix": 1}, cutmix_alpha=1.0, saliencymix_alpha=1.0,
         mode="elem", return_params=True),
    dict(method_weights={"smoothmix": 1, "gridmix": 1}, mode="elem"),
    dict(cutmix_alpha=1.0, fmix_alpha=1.0, split_targets=True, return_clean=True,
         channels_last=True, last_batch_policy="fill", return_params=True),
], ids=["all-methods", "channels-last-fill", "no-mixing", "more-methods", "formula-masks",
        "split-clean"])
def test_hand_off_gives_the_batches_of_the_in_graph_loader(jpeg_folder, options):
    """The GPU loader's mechanism (uint8 crops and params table out of DALI,
    gpumix.torch.apply at the hand-off), run here with its CPU twin, yields
    exactly the batches, targets and params of the in-graph loader, through
    an epoch with a partial last batch."""
    common = dict(batch_size=8, size=(20, 16), seed=4, num_threads=2, **options)
    graph = list(DALIMixLoader(jpeg_folder, handoff=False, **common))
    handed = list(DALIMixLoader(jpeg_folder, handoff=True, **common))
    assert len(graph) == len(handed) == 3
    for in_graph, at_hand_off in zip(graph, handed):
        assert len(in_graph) == len(at_hand_off)
        for x, hx in zip(tensors(in_graph), tensors(at_hand_off), strict=True):
            assert hx.stride() == x.stride()  # the same memory format
            torch.testing.assert_close(hx, x, rtol=0, atol=0)


def to_cpu(items):
    """A loader's batch with every tensor copied to the host."""
    if isinstance(items, torch.Tensor):
        return items.cpu()
    if isinstance(items, dict):
        return {k: to_cpu(v) for k, v in items.items()}
    return type(items)(to_cpu(item) for item in items)


def tensors(items) -> list:
    """The tensors of a loader's batch, in order (split targets and the
    params dict spread out)."""
    out = []
    for item in items:
        if isinstance(item, torch.Tensor):
            out.append(item)
        else:
            out += tensors(item.values() if isinstance(item, dict) else item)
    return out
