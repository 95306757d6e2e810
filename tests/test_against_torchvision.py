"""Dense (B, K) targets against torchvision's v2 MixUp and CutMix, the
other library that mixes probability rows: with lam (and CutMix's box)
pinned, and gpumix pairing like torchvision (``roll``: sample i takes
sample i - 1), images and targets agree."""

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import gpumix
from gpumix.config import CUTMIX
from gpumix.params import MixParams
from gpumix.torch import Mixup

B, K = 5, 7
LAM = 0.375  # exact in float32, as is 1 - LAM: both libraries weigh alike


class PinnedMixUp(v2.MixUp):
    def make_params(self, flat_inputs):
        return dict(lam=LAM)


class PinnedCutMix(v2.CutMix):
    box = (3, 2, 11, 7)  # torchvision's (x1, y1, x2, y2)

    def make_params(self, flat_inputs):
        x1, y1, x2, y2 = self.box
        h, w = flat_inputs[0].shape[-2:]
        return dict(box=self.box, lam_adjusted=1.0 - (x2 - x1) * (y2 - y1) / (w * h))


def batch(seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.random((B, 3, 9, 13), np.float32))
    y = torch.from_numpy(rng.dirichlet(np.ones(K), B).astype(np.float32))
    return x, y


def test_dense_mixup_equals_torchvision_with_lam_pinned():
    x, y = batch()
    theirs_x, theirs_y = PinnedMixUp(num_classes=K)(x.clone(), y.clone())
    ours = Mixup(mixup_alpha=1.0, mixup_lam=LAM, pairing="roll", targets="dense",
                 label_smoothing=0.0, num_classes=K, inplace=False, seed=0)
    ours_x, ours_y = ours(x, y)
    np.testing.assert_array_equal(ours.last_params.pair, (np.arange(B) - 1) % B)
    # torchvision adds lam * a to (1 - lam) * b without gpumix's a == b shortcut
    np.testing.assert_allclose(ours_x.numpy(), theirs_x.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours_y.numpy(), theirs_y.numpy(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("labels", ["dense", "class ids"])
def test_cutmix_equals_torchvision_with_the_box_pinned(labels):
    x, y = batch(1)
    if labels == "class ids":
        y = torch.tensor([0, 3, 6, 3, 1])
    theirs_x, theirs_y = PinnedCutMix(num_classes=K)(x.clone(), y.clone())
    x1, y1, x2, y2 = PinnedCutMix.box
    lam = np.float32(1.0 - (x2 - x1) * (y2 - y1) / (9 * 13))
    params = MixParams(pair=(np.arange(B) - 1) % B, lam=np.full(B, lam, np.float32),
                       method=np.full(B, CUTMIX, np.int8),
                       box=np.tile(np.array([[y1, y2, x1, x2]]), (B, 1)))
    np.testing.assert_array_equal(gpumix.mix_images(x.numpy(), params, "NCHW"), theirs_x.numpy())
    if labels == "class ids":
        ours_y = gpumix.soft_targets(y.numpy(), params, K)
    else:
        ours_y = gpumix.mix_targets(y.numpy(), params)
    np.testing.assert_allclose(ours_y, theirs_y.numpy(), rtol=0, atol=1e-6)
