"""Bad input -> a clear exception naming the argument (table-driven)."""

import dataclasses

import numpy as np
import pytest
import torch

import gpumix
import gpumix.torch

GOOD = np.zeros((2, 3, 4, 4), np.uint8)
PARAMS = gpumix.sample(gpumix.MixConfig(), 2, (4, 4), np.random.default_rng(0))

CONFIG_ERRORS = [
    (dict(mixup_alpha=-0.1), ValueError, "mixup_alpha"),
    (dict(cutmix_alpha=-1), ValueError, "cutmix_alpha"),
    (dict(fmix_alpha=-1), ValueError, "fmix_alpha"),
    (dict(prob=1.5), ValueError, "prob"),
    (dict(prob=-0.1), ValueError, "prob"),
    (dict(switch_prob=2), ValueError, "switch_prob"),
    (dict(num_classes=0), ValueError, "num_classes"),
    (dict(num_classes=2.5), TypeError, "num_classes"),
    (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
    (dict(mode="pair"), ValueError, "mode"),
    (dict(pairing="random"), ValueError, "pairing"),
    (dict(box_placement="centre"), ValueError, "box_placement"),
    (dict(cutmix_minmax=(0.8, 0.2)), ValueError, "cutmix_minmax"),
    (dict(cutmix_minmax=(0.1,)), ValueError, "cutmix_minmax"),
    (dict(cutmix_minmax=0.5), ValueError, r"cutmix_minmax must be a pair \(lo, hi\)"),
    (dict(mixup_alpha=float("inf")), ValueError, r"mixup_alpha must be in \[0.0, inf\)"),
    (dict(cutmix_alpha=float("nan")), ValueError, "cutmix_alpha"),
    (dict(max_soft=0.7), ValueError, "max_soft"),
    (dict(method_weights=(1, 1)), ValueError, "method_weights"),
    (dict(method_weights=(1, -1, 0)), ValueError, "method_weights"),
    (dict(prob="half"), TypeError, "prob"),
]


@pytest.mark.parametrize("options,error,name", CONFIG_ERRORS, ids=[c[2] for c in CONFIG_ERRORS])
def test_config_errors_name_the_argument(options, error, name):
    with pytest.raises(error, match=name):
        gpumix.MixConfig(**options)
    with pytest.raises(error, match=name):  # the torch module validates the same way
        gpumix.torch.Mixup(**{k: v for k, v in options.items() if k != "mode"} or options)


ARRAY_ERRORS = [
    (lambda: gpumix.mix_images(GOOD.astype(np.int32), PARAMS), TypeError, "dtype"),
    (lambda: gpumix.mix_images(GOOD.astype(np.float64), PARAMS), TypeError, "float64"),
    (lambda: gpumix.mix_images(GOOD[0], PARAMS), ValueError, "4-D"),
    (lambda: gpumix.mix_images(np.zeros((2, 0, 6, 6), np.uint8), PARAMS, "NCHW"),
     ValueError, "no channels"),
    (lambda: gpumix.mix_images(GOOD, PARAMS, "CHWN"), ValueError, "layout"),
    (lambda: gpumix.mix_images(np.zeros((3, 3, 4, 4), np.uint8), PARAMS), ValueError, "pair"),
    (lambda: gpumix.mix_images(np.zeros((2, 3, 0, 4), np.uint8)[:0], PARAMS), ValueError,
     "at least one"),
    (lambda: gpumix.soft_targets(np.array([0, 1000]), PARAMS, 1000), ValueError, r"\[0, 1000\)"),
    (lambda: gpumix.soft_targets(np.array([-1, 0]), PARAMS, 10), ValueError, "labels"),
    (lambda: gpumix.soft_targets(np.array([0.0, 1.0]), PARAMS, 10), TypeError, "labels"),
    (lambda: gpumix.soft_targets(np.array([0, 1, 2]), PARAMS, 10), ValueError, "shape"),
    (lambda: gpumix.mix_images(GOOD, dataclasses.replace(PARAMS, lam=np.array([0.5, 1.5],
                                                                              np.float32))),
     ValueError, r"params.lam must lie in \[0, 1\]"),
    (lambda: gpumix.mix_images(GOOD, dataclasses.replace(PARAMS, lam=np.array([np.nan, 0.5],
                                                                              np.float32))),
     ValueError, "lam must lie"),
    (lambda: gpumix.mix_images(GOOD, dataclasses.replace(PARAMS, lam=np.array([0.5, -0.0625],
                                                                              np.float32))),
     ValueError, r"got -0.0625 for sample 1"),
    (lambda: gpumix.mix_images(GOOD, dataclasses.replace(PARAMS, pair=np.array([1, 2]))),
     ValueError, r"params.pair must index the batch \[0, 2\), got 2 for sample 1"),
    (lambda: gpumix.mix_images(GOOD, dataclasses.replace(PARAMS, pair=np.array([-1, 0]))),
     ValueError, "got -1 for sample 0"),
    (lambda: gpumix.mix_images(GOOD, dataclasses.replace(PARAMS, box=np.array(
        [[0, 5, 0, 2], [0, 0, 0, 0]]))), ValueError, r"params.box must .* inside the image"),
    (lambda: gpumix.mix_images(GOOD, dataclasses.replace(PARAMS, box=np.array(
        [[0, 0, 0, 0], [-1, 2, 0, 2]]))), ValueError, r"\[-1, 2, 0, 2\] for sample 1"),
    (lambda: gpumix.mix_images(GOOD, dataclasses.replace(PARAMS, box=np.array(
        [[3, 1, 0, 2], [0, 0, 0, 0]]))), ValueError, "0 <= start <= stop <= size"),
    (lambda: gpumix.mix_images(GOOD, dataclasses.replace(  # a size, as unplaced SaliencyMix
        PARAMS, method=np.array([4, 0], np.int8), box=np.array([[-2, 0, -2, 0], [0, 0, 0, 0]]))),
     ValueError, "for sample 0"),
    (lambda: gpumix.mix_images(GOOD, PARAMS, out=np.zeros((2, 4, 4, 3), np.uint8).transpose(
        0, 3, 1, 2)), ValueError, "out must be C-contiguous"),
    (lambda: gpumix.mix_images(GOOD, PARAMS, out=np.zeros((2, 3, 4, 4), np.float32)),
     ValueError, r"out must have shape \(2, 3, 4, 4\) and dtype uint8"),
    (lambda x=GOOD.copy(): gpumix.mix_images(x, PARAMS, out=x,  # in place
                                             scratch=np.zeros((2, 3, 4, 4), np.float32)),
     ValueError, "scratch must have shape"),
    (lambda: gpumix.soft_targets(np.array([0, 1]), PARAMS, 10, out=np.zeros((1, 10), np.float32)),
     ValueError, r"out must have shape \(2, 10\) and dtype float32"),
    (lambda: gpumix.mix_targets(np.zeros((2, 3), np.float32), PARAMS,
                                out=np.zeros((2, 3), np.float64)), ValueError, "dtype float32"),
    (lambda: gpumix.mix_images(GOOD, dataclasses.replace(PARAMS, method=np.array([9, 0], np.int8))),
     ValueError, "params.method must hold method codes 0 to 7"),
    (lambda: gpumix.mix_images(GOOD, dataclasses.replace(  # a SaliencyMix size over the image
        PARAMS, method=np.array([7, 0], np.int8), box=np.array([[-5, 0, -2, 0], [0, 0, 0, 0]]))),
     ValueError, "inside the image"),
    (lambda: gpumix.mix_images(GOOD, dataclasses.replace(  # placed on y, a size on x
        PARAMS, method=np.array([7, 0], np.int8), box=np.array([[1, 3, -2, 0], [0, 0, 0, 0]]))),
     ValueError, r"\[1, 3, -2, 0\] for sample 0"),
    (lambda: gpumix.mix_images(GOOD, dataclasses.replace(
        PARAMS, method=np.array([6, 0], np.int8), grid=np.array([[0, 1, 0], [0, 0, 0]]))),
     ValueError, r"params.grid must give GridMix samples n in \[1, 8\], got 0"),
    (lambda: gpumix.sample(gpumix.MixConfig(mixup_alpha=0.0, fmix_alpha=1.0,
                                            reference_compatible=True), 2, (1, 7)),
     ValueError, "reference_compatible FMix masks need at least 2 pixels"),
    (lambda: gpumix.sample(gpumix.MixConfig(), 0, (4, 4)), ValueError, "batch_size"),
    (lambda: gpumix.sample(gpumix.MixConfig(), 2, (0, 4)), ValueError, "sizes >= 1"),
    (lambda: gpumix.mix_images(np.zeros((2, 3, 4, 0), np.uint8), PARAMS), ValueError,
     "at least one pixel"),
    (lambda: gpumix.sample(gpumix.MixConfig(), 2, (4, 4), rng="seed"), TypeError, "rng"),
]


@pytest.mark.parametrize("call,error,pattern", ARRAY_ERRORS, ids=[p for _, _, p in ARRAY_ERRORS])
def test_array_errors_are_clear(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_mixup_on_dense_maps_is_refused():
    params = gpumix.sample(gpumix.MixConfig(mixup_alpha=1.0), 2, (4, 4), np.random.default_rng(0))
    with pytest.raises(ValueError, match="MixUp cannot be applied to dense"):
        gpumix.mix_dense(np.zeros((2, 4, 4), np.int64), params)


TORCH_ERRORS = [
    (lambda m: m(torch.zeros(2, 3, 4, 4, dtype=torch.int32), torch.zeros(2, dtype=torch.long)),
     TypeError, "dtype"),
    (lambda m: m(torch.zeros(2, 3, 4, 4), torch.zeros(2)), ValueError, "neither class ids"),
    (lambda m: m(torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.long)), ValueError, "shape"),
    (lambda m: m(torch.zeros(2, 3, 4, 4), torch.tensor([0, 10])), ValueError, r"\[0, 10\)"),
    (lambda m: m(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)), ValueError, "4-D"),
    (lambda m: m(torch.zeros(2, 3, 4, 4).transpose(2, 3), torch.zeros(2, dtype=torch.long)),
     ValueError, "contiguous"),
    (lambda m: m(torch.zeros(2, 3, 4, 4, requires_grad=True), torch.zeros(2, dtype=torch.long)),
     ValueError, "grad"),
    (lambda m: m(np.zeros((2, 3, 4, 4), np.float32), torch.zeros(2, dtype=torch.long)),
     TypeError, "torch tensors"),
    (lambda m: m(torch.zeros(2, 3, 4, 4), torch.full((2, 10), 0.1, requires_grad=True)),
     ValueError, "target must not require grad"),
    (lambda m: m(torch.zeros(2, 3, 0, 4), torch.zeros(2, dtype=torch.long)),
     ValueError, r"x must have at least one pixel on each spatial axis of NCHW"),
]


@pytest.mark.parametrize("call,error,pattern", TORCH_ERRORS, ids=[p for _, _, p in TORCH_ERRORS])
def test_torch_module_errors(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(gpumix.torch.Mixup(num_classes=10, seed=0))


def test_torch_module_refuses_bad_labels_before_mixing_in_place():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    before = x.clone()
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        gpumix.torch.Mixup(num_classes=10, seed=0)(x, torch.tensor([0, 10]))
    assert torch.equal(x, before)


# ------------------------------------------------------------- loader & DALI
@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    from gpumix.datasets import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("errs") / "data", 2, 3, (24, 32))


def loader_errors(folder, tmp):
    from gpumix.torch import DALIMixLoader

    bad_list = tmp / "bad.txt"
    bad_list.write_text("just-a-path-without-label\n")
    return [
        (lambda: DALIMixLoader(folder, batch_size=0), ValueError, "batch_size"),
        (lambda: DALIMixLoader(folder, num_threads=0), ValueError, "num_threads"),
        (lambda: DALIMixLoader(folder, last_batch_policy="pad"), ValueError, "last_batch_policy"),
        (lambda: DALIMixLoader(folder, dtype=torch.int8), TypeError, "dtype"),
        (lambda: DALIMixLoader(folder, size=(0, 5)), ValueError, "size"),
        (lambda: DALIMixLoader(folder, mixing="cutout"), ValueError, "mixing"),
        (lambda: DALIMixLoader(folder, mixup_alpha=-1), ValueError, "mixup_alpha"),
        (lambda: DALIMixLoader(folder, prob=2), ValueError, "prob"),
        (lambda: DALIMixLoader(folder, shard_id=2, num_shards=2), ValueError, "shard_id"),
        (lambda: DALIMixLoader(folder, batch_size=4, num_shards=2, last_batch_policy="drop"),
         ValueError, r"'drop' leaves no batch: batch_size=4 exceeds the 3 samples of a shard"),
        (lambda: DALIMixLoader(folder, num_shards=0), ValueError, "num_shards"),
        (lambda: DALIMixLoader(folder, train=False, mixup_alpha=0.5), ValueError, "train=True"),
        (lambda: DALIMixLoader(folder, file_list=bad_list), ValueError, "exactly one"),
        (lambda: DALIMixLoader(), ValueError, "exactly one"),
        (lambda: DALIMixLoader(tmp / "missing"), FileNotFoundError, "does not exist"),
        (lambda: DALIMixLoader(file_list=tmp / "missing.txt"), FileNotFoundError, "file_list"),
        (lambda: DALIMixLoader(file_list=bad_list), ValueError, "line 1"),
        (lambda: DALIMixLoader(folder, num_classes=1), ValueError, "num_classes=1"),
        (lambda: DALIMixLoader(folder, device="tpu"), ValueError, "device"),
    ]


def test_loader_bad_input_table(small_folder, tmp_path):
    for call, error, pattern in loader_errors(small_folder, tmp_path):
        with pytest.raises(error, match=pattern):
            call()


@pytest.mark.parametrize("options,error,pattern", [
    (dict(layout="NHWC"), ValueError, "layout"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(fmix_alpha=1.0), ValueError, "size=\\(H, W\\)"),
    (dict(cutmix_alpha=-2.0), ValueError, "cutmix_alpha"),
    (dict(mode="pair"), ValueError, "mode"),
    (dict(dtype="uint8"), TypeError, "dtype must be DALI's"),
], ids=["layout", "device", "fmix-size", "alpha", "mode", "dtype"])
def test_dali_operator_bad_arguments(options, error, pattern):
    from nvidia.dali import fn, pipeline_def

    import gpumix.dali

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        images = fn.external_source(source=lambda: [np.zeros((4, 4, 3), np.uint8)] * 2,
                                    batch=True, layout="HWC")
        labels = fn.external_source(source=lambda: [np.array([0], np.int32)] * 2, batch=True)
        return gpumix.dali.mix(images, labels, num_classes=3, **options)

    with pytest.raises(error, match=pattern):
        pipe()


@pytest.mark.parametrize("samples,layout,pattern", [
    ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)], "HWC",
     "same shape to be mixed"),
    ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 5), np.uint8)], "HWC",
     "same shape to be mixed"),
], ids=["ragged", "ragged-channels"])
def test_dali_operator_bad_batches_fail_at_run_time(samples, layout, pattern):
    from nvidia.dali import fn, pipeline_def

    import gpumix.dali

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        images = fn.external_source(source=lambda: samples, batch=True, layout=layout)
        labels = fn.external_source(source=lambda: [np.array([0], np.int32)] * 2, batch=True)
        return gpumix.dali.mix(images, labels, num_classes=3, layout=layout, mixup_alpha=1.0)

    p = pipe()
    p.build()
    p.run()  # the params operator keeps its error; raise_pending raises it
    with pytest.raises(ValueError, match=pattern):
        gpumix.dali.raise_pending(p)


@pytest.mark.parametrize("labels,kind,error,pattern", [
    ([np.array([1.0, 2.0, 3.0], np.float32), np.array([7.0], np.float32)], "regression",
     ValueError, "as many label values"),
    ([np.array([1.7], np.float32), np.array([2.0], np.float32)], "classes",
     TypeError, "integer class ids, got 1.7"),
], ids=["ragged-labels", "fractional-class-ids"])
def test_dali_operator_bad_labels_fail_at_run_time(labels, kind, error, pattern):
    from nvidia.dali import fn, pipeline_def

    import gpumix.dali

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        images = fn.external_source(source=lambda: [np.zeros((4, 4, 3), np.uint8)] * 2,
                                    batch=True, layout="HWC")
        label = fn.external_source(source=lambda: labels, batch=True)
        return gpumix.dali.mix(images, label, num_classes=3, targets=kind, mixup_alpha=1.0)

    p = pipe()
    p.build()
    _, targets = p.run()  # NaN targets, the error kept for raise_pending
    assert all(np.isnan(np.array(t)).all() for t in targets)
    with pytest.raises(error, match=pattern):
        gpumix.dali.raise_pending(p)


def test_fused_normalize_with_a_mean_per_other_channel_count_is_nan():
    from nvidia.dali import fn, pipeline_def

    import gpumix.dali

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        images = fn.external_source(source=lambda: [np.full((4, 4, 4), 200, np.uint8)] * 2,
                                    batch=True, layout="HWC")
        return gpumix.dali.normalize(images, mean=[1.0, 2.0, 3.0], std=[1.0, 1.0, 1.0])

    p = pipe()
    p.build()
    (out,) = p.run()
    assert all(np.isnan(np.array(sample)).all() for sample in out)


def test_gpu_device_without_cuda_is_a_clear_error(small_folder):
    """In a process that sees no GPU (none here; hidden on a CUDA machine)."""
    import os
    import subprocess
    import sys

    code = ("from gpumix.torch import DALIMixLoader\n"
            f"DALIMixLoader({str(small_folder)!r}, device='gpu')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr and "CUDA is not usable" in result.stderr


def test_loader_batch_of_one_is_valid_and_unmixed(small_folder):
    from gpumix.torch import DALIMixLoader

    mixed = DALIMixLoader(small_folder, batch_size=1, size=16, mixup_alpha=1.0,
                          cutmix_alpha=1.0, return_params=True, label_smoothing=0.0)
    plain = DALIMixLoader(small_folder, batch_size=1, size=16, mixing="none",
                          label_smoothing=0.0)
    assert len(mixed) == 6
    for (x, t, params), (px, pt) in zip(mixed, plain):
        assert params["pair"].tolist() == [0]  # a batch of one pairs with itself
        torch.testing.assert_close(x, px, rtol=0, atol=0)  # same seed: same crops, unmixed
        torch.testing.assert_close(t, pt, rtol=0, atol=0)


def test_cli_empty_dataset_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    (tmp_path / "empty" / "class").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "gpumix.cli", "bench", "--quick", "--data",
                             str(tmp_path / "empty")], capture_output=True, text=True)
    assert result.returncode != 0 and "holds no images" in result.stderr
