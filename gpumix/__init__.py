"""gpumix: MixUp, CutMix, FMix, ResizeMix, SmoothMix, GridMix and SaliencyMix
as CUDA kernels with exact CPU twins.

Sample, then apply::

    import numpy as np, gpumix
    config = gpumix.MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10)
    params = gpumix.sample(config, batch_size=len(x), spatial_shape=(224, 224),
                           rng=np.random.default_rng(0))
    mixed = gpumix.mix_images(x, params, layout="NCHW")
    targets = gpumix.soft_targets(y, params, num_classes=10, smoothing=0.1)

For torch training code use :class:`gpumix.torch.Mixup` (timm's arguments).
"""

from gpumix.config import (CUTMIX, FMIX, GRIDMIX, METHODS, MIXUP, NONE, RESIZEMIX, SALIENCYMIX,
                           SMOOTHMIX, MixConfig)
from gpumix.mixing import mix_dense, mix_images, mix_targets, soft_targets
from gpumix.params import Draws, MixParams, draw, params_from_draws, sample

__version__ = "0.1.0"

__all__ = [
    "MixConfig", "MixParams", "Draws", "draw", "params_from_draws", "sample",
    "mix_images", "mix_dense", "mix_targets", "soft_targets", "METHODS", "NONE", "MIXUP", "CUTMIX", "FMIX",
    "RESIZEMIX", "SMOOTHMIX", "GRIDMIX", "SALIENCYMIX",
]
