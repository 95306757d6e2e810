"""Against timm (a real library): soft targets, CutMix boxes and lam, and the
torch module's batch-mode output, with timm's random draws pinned to ours."""

import numpy as np
import pytest
import torch
from timm.data import mixup as timm_mixup

import gpumix
import gpumix.torch
from gpumix.config import CUTMIX, MIXUP
from gpumix.params import MixParams, box_lam, cutmix_boxes


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 0.8125, 1.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_targets_match_timm_mixup_target(lam, smoothing):
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6])  # includes y_i == y_pair[i] (flip of 1s)
    b = len(labels)
    params = MixParams(pair=np.arange(b)[::-1].copy(), lam=np.full(b, lam, np.float32),
                       method=np.full(b, MIXUP, np.int8), box=np.zeros((b, 4), np.int64))
    ours = gpumix.soft_targets(labels, params, 10, smoothing)
    theirs = timm_mixup.mixup_target(torch.from_numpy(labels), 10, lam, smoothing).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-7)


@pytest.mark.parametrize("shape", [(224, 224), (37, 91), (90, 17)])
@pytest.mark.parametrize("correct_lam", [True, False])
def test_cutmix_boxes_and_lam_match_timm(monkeypatch, shape, correct_lam):
    rng = np.random.default_rng(0)
    h, w = shape
    for lam in rng.random(40):
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        centres = iter([cy, cx])
        monkeypatch.setattr(timm_mixup.np.random, "randint",
                            lambda low, high, size=None: next(centres))
        (yl, yu, xl, xu), timm_lam = timm_mixup.cutmix_bbox_and_lam(
            (8, 3, h, w), lam, correct_lam=correct_lam)
        box_u = np.array([[(cy + 0.5) / h, (cx + 0.5) / w]])
        box = cutmix_boxes(np.array([lam]), box_u, shape)[0]
        assert tuple(box) == (yl, yu, xl, xu)
        ours = box_lam(box[None], shape)[0] if correct_lam else lam
        assert ours == pytest.approx(timm_lam, abs=1e-12)


def timm_with_our_draws(params, x, y, monkeypatch, **kwargs):
    """Run timm's Mixup with its draws replaced by the ones our params record."""
    lam = float(params.lam[0])
    # timm draws rand() twice: mix at all (< prob), then CutMix (< switch_prob)
    uniforms = iter([0.0, 0.0 if params.method[0] == CUTMIX else 0.999999])
    monkeypatch.setattr(timm_mixup.np.random, "rand", lambda *a: next(uniforms))
    if params.method[0] == CUTMIX:
        box = tuple(int(v) for v in params.box[0])
        monkeypatch.setattr(timm_mixup, "cutmix_bbox_and_lam",
                            lambda *a, **k: (box, lam))
        monkeypatch.setattr(timm_mixup.np.random, "beta", lambda *a: 0.5)
    else:
        monkeypatch.setattr(timm_mixup.np.random, "beta", lambda *a: lam)
    timm = timm_mixup.Mixup(**kwargs)
    return timm(x.clone(), y)


@pytest.mark.parametrize("seed", range(6))
def test_torch_module_batch_mode_equals_timm(monkeypatch, seed):
    kwargs = dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    ours = gpumix.torch.Mixup(**kwargs, seed=seed)
    x = torch.rand(8, 3, 32, 24)
    y = torch.randint(0, 10, (8,))
    mixed, targets = ours(x.clone(), y)
    params = ours.last_params
    timm_x, timm_targets = timm_with_our_draws(params, x, y, monkeypatch, **kwargs)
    if params.method[0] == CUTMIX:
        torch.testing.assert_close(mixed, timm_x, rtol=0, atol=0)
    else:  # MixUp: the partner weight 1 - lam is rounded in float32 vs float64
        np.testing.assert_array_max_ulp(mixed.numpy(), timm_x.numpy(), 2)
    torch.testing.assert_close(targets, timm_targets, rtol=0, atol=1e-7)


def test_odd_batch_works_where_timm_asserts():
    x = torch.rand(5, 3, 8, 8)
    y = torch.randint(0, 10, (5,))
    with pytest.raises(AssertionError):
        timm_mixup.Mixup(num_classes=10)(x.clone(), y)
    mixed, targets = gpumix.torch.Mixup(num_classes=10, seed=0)(x.clone(), y)
    assert mixed.shape == x.shape and targets.shape == (5, 10)
    # the middle sample of an odd flip pairs with itself and is unchanged
    torch.testing.assert_close(mixed[2], x[2], rtol=0, atol=0)
