"""gpumix for existing PyTorch training code: a timm-compatible ``Mixup``.

    mixup = gpumix.torch.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=1000)
    for x, y in loader:
        x, targets = mixup(x, y)          # targets: float32 (B, K), rows sum to 1
        loss = torch.sum(-targets * torch.log_softmax(model(x), -1), -1).mean()

Arguments are timm's ``Mixup`` (mixup_alpha, cutmix_alpha, cutmix_minmax,
prob, switch_prob, mode, correct_lam, label_smoothing, num_classes) plus
FMix (fmix_alpha, decay_power, max_soft, reformulate, reference_compatible)
and gpumix's pairing, box_placement and method_weights (gpumix.config).
Differences from timm, on purpose: odd and partial batches work (a batch of
one pairs with itself); mode "pair" is not offered; ``cutmix_minmax`` bounds
lam (SEMANTICS.md) rather than box sides.

Tensors: NCHW float32/float16/uint8, or channels-last memory format (mixed
as NHWC without a copy). CPU tensors run the Numba CPU kernels on their
memory; CUDA tensors run the Numba CUDA kernels on torch's current stream
through ``__cuda_array_interface__``, and FMix masks are made on the GPU
(cupy.fft + the selection kernel): no image data goes to the host.

In place (default, like timm): ``x`` is overwritten and returned. With
``inplace=False`` a new tensor is returned and ``x`` is untouched. The
parameters of the last call are kept in ``last_params`` for inspection.

Randomness: one NumPy generator per module, seeded by ``seed`` (or drawn
from ``generator``, a torch.Generator); the same seed gives the same
sequence of batches.
"""

from __future__ import annotations

import numpy as np
import torch

from gpumix import fmix, mixing
from gpumix.config import MixConfig
from gpumix.params import as_numpy_generator, draw, params_from_draws
from gpumix.kernels._launch import StreamHandle

__all__ = ["Mixup", "DALIMixLoader"]


def __getattr__(name):
    # The loader pulls in DALI: import it only when asked for.
    if name == "DALIMixLoader":
        from gpumix.loader import DALIMixLoader

        return DALIMixLoader
    raise AttributeError(f"module 'gpumix.torch' has no attribute {name!r}")


def _layout_view(x: torch.Tensor):
    """(tensor to mix, layout): NCHW-contiguous as is, channels-last as NHWC."""
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D image batch (N, C, H, W), got shape {tuple(x.shape)}")
    if x.is_contiguous():
        return x, "NCHW"
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1), "NHWC"
    raise ValueError("x must be contiguous (NCHW) or channels_last; call .contiguous() first")


def _cuda_stream() -> StreamHandle:
    return StreamHandle(torch.cuda.current_stream().cuda_stream)


class Mixup:
    """timm-compatible MixUp / CutMix / FMix for torch batches: ``x, t = mixup(x, y)``."""

    def __init__(self, mixup_alpha=1.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0,
                 switch_prob=0.5, mode="batch", correct_lam=True, label_smoothing=0.1,
                 num_classes=1000, *, fmix_alpha=0.0, decay_power=3.0, max_soft=0.0,
                 reformulate=False, reference_compatible=False, pairing="flip",
                 box_placement="clip", method_weights=None, inplace=True, seed=None,
                 generator=None):
        if mode == "pair":
            raise ValueError("mode 'pair' is not supported; use 'batch' or 'elem'")
        self.config = MixConfig(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax,
            fmix_alpha=fmix_alpha, prob=prob, switch_prob=switch_prob,
            method_weights=method_weights, mode=mode, pairing=pairing, correct_lam=correct_lam,
            label_smoothing=label_smoothing, num_classes=num_classes,
            box_placement=box_placement, decay_power=decay_power, max_soft=max_soft,
            reformulate=reformulate, reference_compatible=reference_compatible)
        self.inplace = inplace
        self.rng = as_numpy_generator(generator if generator is not None else seed)
        self.mixup_enabled = True  # timm's switch for turning mixing off late in training
        self.last_params = None
        self._scratch = None  # reused snapshot buffer for in-place CPU mixing

    def sample_params(self, batch_size: int, spatial_shape, device=None):
        """Draw this call's parameters (masks on ``device`` when it is CUDA)."""
        config = self.config
        if not self.mixup_enabled:
            config = MixConfig(mixup_alpha=0.0, num_classes=config.num_classes,
                               label_smoothing=config.label_smoothing, pairing=config.pairing)
        draws = draw(config, batch_size, spatial_shape, self.rng)
        maker = None
        if device is not None and device.type == "cuda" and config.enabled[2]:
            maker = fmix.cuda_mask_maker(spatial_shape, config.decay_power,
                                         config.reference_compatible, _cuda_stream())
        return params_from_draws(config, spatial_shape, draws, batch_size, fmix_masks=maker)

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        if not isinstance(x, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError("x and target must be torch tensors")
        if x.requires_grad:
            raise ValueError("x must not require grad: mixing is a data transform")
        view, layout = _layout_view(x)
        if target.dim() != 1 or target.shape[0] != x.shape[0]:
            raise ValueError(f"target must be class ids of shape ({x.shape[0]},), "
                             f"got {tuple(target.shape)}")
        if target.dtype.is_floating_point or target.dtype == torch.bool:
            raise TypeError(f"target must be integer class ids, got {target.dtype}")
        if target.device != x.device:
            raise ValueError(f"target is on {target.device} but x on {x.device}")
        h, w = mixing.check_images(view, layout, "x")
        params = self.sample_params(x.shape[0], (h, w), x.device)
        self.last_params = params
        if x.is_cuda:
            return self._call_cuda(x, view, layout, target, params)
        # Targets first: their label check fails before x is written in place.
        targets = mixing.soft_targets(target.numpy(), params, self.config.num_classes,
                                      self.config.label_smoothing)
        out = x if self.inplace else torch.empty_like(x)
        out_view = out if layout == "NCHW" else out.permute(0, 2, 3, 1)
        source = view.numpy()
        mixing.mix_images(source, params, layout, out=source if self.inplace else out_view.numpy(),
                          scratch=self._scratch_like(source) if self.inplace else None)
        return out, torch.from_numpy(targets)

    def _scratch_like(self, array: np.ndarray) -> np.ndarray:
        scratch = self._scratch
        if scratch is None or scratch.shape != array.shape or scratch.dtype != array.dtype:
            scratch = self._scratch = np.empty_like(array)
        return scratch

    def _call_cuda(self, x, view, layout, target, params):
        stream = _cuda_stream()
        # Targets first: their label check (one device-to-host copy) fails
        # before x is written in place.
        targets = torch.empty((x.shape[0], self.config.num_classes), dtype=torch.float32,
                              device=x.device)
        mixing.soft_targets(target, params, self.config.num_classes,
                            self.config.label_smoothing, out=targets, stream=stream)
        out = x if self.inplace else torch.empty_like(x)
        out_view = out if layout == "NCHW" else out.permute(0, 2, 3, 1)
        mixing.mix_images(view, params, layout, out=view if self.inplace else out_view,
                          stream=stream)
        return out, targets
