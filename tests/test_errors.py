"""Bad input -> a clear exception naming the argument (table-driven)."""

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
    (lambda: gpumix.mix_images(np.zeros((2, 6, 6, 3), np.uint8), PARAMS, "NCHW"),
     ValueError, "layout"),
    (lambda: gpumix.mix_images(GOOD, PARAMS, "CHWN"), ValueError, "layout"),
    (lambda: gpumix.mix_images(np.zeros((3, 3, 4, 4), np.uint8), PARAMS), ValueError, "pair"),
    (lambda: gpumix.mix_images(np.zeros((2, 3, 0, 4), np.uint8)[:0], PARAMS), ValueError,
     "at least one"),
    (lambda: gpumix.soft_targets(np.array([0, 1000]), PARAMS, 1000), ValueError, r"\[0, 1000\)"),
    (lambda: gpumix.soft_targets(np.array([-1, 0]), PARAMS, 10), ValueError, "labels"),
    (lambda: gpumix.soft_targets(np.array([0.0, 1.0]), PARAMS, 10), TypeError, "labels"),
    (lambda: gpumix.soft_targets(np.array([0, 1, 2]), PARAMS, 10), ValueError, "shape"),
    (lambda: gpumix.sample(gpumix.MixConfig(), 0, (4, 4)), ValueError, "batch_size"),
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
    (lambda m: m(torch.zeros(2, 3, 4, 4), torch.zeros(2)), TypeError, "integer"),
    (lambda m: m(torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.long)), ValueError, "shape"),
    (lambda m: m(torch.zeros(2, 3, 4, 4), torch.tensor([0, 10])), ValueError, r"\[0, 10\)"),
    (lambda m: m(torch.zeros(3, 4, 4), torch.zeros(3, dtype=torch.long)), ValueError, "4-D"),
    (lambda m: m(torch.zeros(2, 3, 4, 4).transpose(2, 3), torch.zeros(2, dtype=torch.long)),
     ValueError, "contiguous"),
    (lambda m: m(torch.zeros(2, 3, 4, 4, requires_grad=True), torch.zeros(2, dtype=torch.long)),
     ValueError, "grad"),
    (lambda m: m(np.zeros((2, 3, 4, 4), np.float32), torch.zeros(2, dtype=torch.long)),
     TypeError, "torch tensors"),
]


@pytest.mark.parametrize("call,error,pattern", TORCH_ERRORS, ids=[p for _, _, p in TORCH_ERRORS])
def test_torch_module_errors(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(gpumix.torch.Mixup(num_classes=10, seed=0))
