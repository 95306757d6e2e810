"""gpumix for PyTorch: a timm-compatible ``Mixup``, and :func:`apply`, the
hand-off from a DALI pipeline that made the params with
:func:`gpumix.dali.mix_params`.

    mixup = gpumix.torch.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=1000)
    for x, y in loader:
        x, targets = mixup(x, y)          # targets: float32 (B, K), rows sum to 1
        loss = torch.sum(-targets * torch.log_softmax(model(x), -1), -1).mean()

Arguments are timm's ``Mixup`` (mixup_alpha, cutmix_alpha, cutmix_minmax,
prob, switch_prob, mode, correct_lam, label_smoothing, num_classes) plus
FMix (fmix_alpha, decay_power, max_soft, reformulate, reference_compatible),
gpumix's pairing, box_placement and method_weights, and as further keywords
every other gpumix.MixConfig option (ResizeMix, SmoothMix, GridMix and
SaliencyMix: ``Mixup(method_weights={"mixup": 1, "resizemix": 1})``).
Differences from timm, on purpose: odd and partial batches work (a batch of
one pairs with itself); mode "pair" is not offered; ``cutmix_minmax`` bounds
lam (docs/semantics.md) rather than box sides.

Tensors: NCHW float32/float16/uint8 with any number of channels, or
channels-last memory format (mixed as NHWC without a copy), or contiguous
video clips (N, T, C, H, W), mixed as (N, T * C, H, W): one box or mask for
every frame of a sample, or signals (N, C, L), mixed as (N, C, 1, L): FMix
masks are then the paper's 1-D masks, and ``cutmix_axes="width"`` makes
CutMix cut segments of length int(L (1 - lam)). Spectrograms (N, C, F, T)
are images; ``cutmix_axes`` "width" / "height" cuts time / frequency bands. CPU tensors run the Numba CPU kernels on their
memory. CUDA tensors: the params are sampled on the host, packed into one
params table (gpumix.kernels.table), uploaded through pinned memory, and ONE
kernel (gpumix.kernels.table_mix) mixes every sample and writes the soft
targets on torch's current stream; masks are made on the GPU first (FMix:
normals kernel, cuFFT, selection; SmoothMix and GridMix: one kernel), and
SaliencyMix boxes placed there (thumbnails, cuFFT, arg-max, one kernel).
Nothing waits for the device: labels are checked by the kernel, which sets
a flag in pinned memory; a later call (the first after the kernel has run)
or :meth:`Mixup.check` (which waits for the stream of the module's last
CUDA call) raises a ValueError for it, and the bad rows of the targets are
NaN. A tensor on another device than the current one is mixed on its own
device (that device is made current for the call).

In place (default, like timm): ``x`` is overwritten and returned. On CUDA
with an involutive pairing (the default "flip") and ResizeMix off the kernel
mixes both samples of a pair in one thread and needs no copy of the batch;
otherwise it mixes from a snapshot kept between calls. With ``inplace=False`` a
new tensor is returned and ``x`` is untouched. The parameters of the last
call are kept in ``last_params`` for inspection (on CUDA its SaliencyMix
boxes are the unplaced sizes: they are placed on the device).

Targets. ``target`` may be class ids (B,) (the soft targets of
docs/semantics.md), or, with ``targets=``: "dense" float (B, K) probabilities
(soft, one-hot or distilled; smoothed towards 1/K, then mixed with lam),
"multi_label" 0/1 (B, K) (timm's ``multi_label=True``: smoothed towards 0.5;
``multi_label=True`` is accepted too), "regression" float (B,) or (B, D)
values (mixed linearly, never smoothed); "auto" (default) takes integer
targets as class ids and float (B, K) ones as "dense". ``split_targets=True``
returns ``(y_a, y_b, lam)`` instead of mixed targets (the targets as given,
their partners', each sample's label weight), for losses mixed per term.
``return_clean=True`` (RegMixup, RankMixup) returns ``(mixed, targets,
clean, clean_targets)``: the mixed batch goes to new memory and the input is
returned as the clean batch, with its plain (smoothed) targets.

Label-aware pairings (``pairing=`` "c-mixup", "cross-class", "weights";
gpumix.config) draw partners from ``target`` (read back from CUDA: one
wait) or from ``pair_weights=``, a (B, B) matrix given with the call.
``label_lam``: the label weight of the mixed samples as a function of the
pixels' lam (an array-to-array callable, values in [0, 1]) or a fixed
number (an unmixed sample keeps its own label); ``mixup_lam=0.5`` fixes
MixUp's own lam (Midpoint Mixup). On CUDA class ids take the one-launch
path; the other kinds take one more launch (the blend kernel), and split
class ids are not range-checked there.

Randomness: one NumPy generator per module, seeded by ``seed`` (or drawn
from ``generator``, a torch.Generator); the same seed gives the same
sequence of batches. Threads may share a module (each keeps its own
in-place snapshot); they then share its sequence, in the order they call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import numpy as np
import torch

from gpumix import mixing, runtime, saliency
from gpumix.config import SALIENCYMIX, MixConfig, _check_choice as check_choice, \
    _check_number as check_number
from gpumix.kernels import mix_normalize as fused, table, table_mix
from gpumix.kernels.soft_targets import smoothing_values
from gpumix.params import as_numpy_generator, check_table, draw, params_from_draws, to_table
from gpumix.kernels._launch import StreamHandle, scratch

__all__ = ["Mixup", "apply", "DALIMixLoader", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def __getattr__(name):
    # The loader pulls in DALI: import it only when asked for.
    if name == "DALIMixLoader":
        from gpumix.loader import DALIMixLoader

        return DALIMixLoader
    raise AttributeError(f"module 'gpumix.torch' has no attribute {name!r}")


FIVE_D = ("video", "video_3d", "volume")


def _layout_view(x: torch.Tensor, five_d: str = "video"):
    """(tensor to mix, layout): NCHW-contiguous as is, channels-last as NHWC;
    5-D: clips as NTCHW, volumes as NCDHW (channels_last_3d: NDHWC)."""
    if x.dim() == 5 and five_d != "video":
        if x.is_contiguous():
            return x, "NTCHW" if five_d == "video_3d" else "NCDHW"
        if five_d == "volume" and x.is_contiguous(memory_format=torch.channels_last_3d):
            return x.permute(0, 2, 3, 4, 1), "NDHWC"
        raise ValueError(f"x: a 5-D batch for five_d={five_d!r} must be contiguous"
                         + (" or channels_last_3d" if five_d == "volume" else ""))
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D images (N, C, H, W), 5-D video (N, T, C, H, W) or "
                         f"3-D signals (N, C, L), got shape {tuple(x.shape)}")
    if x.is_contiguous():
        return x, "NCHW"
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1), "NHWC"
    raise ValueError("x must be contiguous (NCHW) or channels_last; call .contiguous() first")


TARGET_KINDS = ("auto", *mixing.TARGET_KINDS)


def _cuda_stream() -> StreamHandle:
    return StreamHandle(torch.cuda.current_stream().cuda_stream)


def _device_of(tensor: torch.Tensor):
    """A context making a CUDA tensor's device current, so that the stream,
    the compiled kernels, the memory pool and the cached constants used are
    that device's (torch lets a tensor live on another device than the
    current one); nothing for a CPU tensor."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


class Mixup:
    """timm-compatible MixUp / CutMix / FMix for torch batches: ``x, t = mixup(x, y)``."""

    def __init__(self, mixup_alpha=1.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0,
                 switch_prob=0.5, mode="batch", correct_lam=True, label_smoothing=0.1,
                 num_classes=1000, *, fmix_alpha=0.0, decay_power=3.0, max_soft=0.0,
                 reformulate=False, reference_compatible=False, pairing="flip",
                 box_placement="clip", method_weights=None, inplace=True, seed=None,
                 generator=None, multi_label=False, targets="auto", split_targets=False,
                 label_lam=None, return_clean=False, five_d="video", **method_options):
        if mode == "pair":
            raise ValueError("mode 'pair' is not supported; use 'batch' or 'elem'")
        check_choice("targets", targets, TARGET_KINDS)
        check_choice("five_d", five_d, FIVE_D)
        self.five_d = five_d
        if multi_label and targets not in ("auto", "multi_label"):
            raise ValueError(f"multi_label=True means targets='multi_label', got {targets!r}")
        self.target_kind = "multi_label" if multi_label else targets
        self.split_targets = split_targets
        self.return_clean = return_clean
        if label_lam is not None and not callable(label_lam):
            check_number("label_lam", label_lam, 0.0, 1.0)
        self.label_lam = label_lam
        self.config = MixConfig(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax,
            fmix_alpha=fmix_alpha, prob=prob, switch_prob=switch_prob,
            method_weights=method_weights, mode=mode, pairing=pairing, correct_lam=correct_lam,
            label_smoothing=label_smoothing, num_classes=num_classes,
            box_placement=box_placement, decay_power=decay_power, max_soft=max_soft,
            reformulate=reformulate, reference_compatible=reference_compatible,
            **method_options)
        self.inplace = inplace
        self.rng = as_numpy_generator(generator if generator is not None else seed)
        self.mixup_enabled = True  # timm's switch for turning mixing off late in training
        self.last_params = None
        # reused snapshots for in-place CUDA mixing by cycles, one per calling
        # thread (threads may share a module); the CPU's live in gpumix's
        # per-thread scratch store
        self._cuda_scratch = {}
        self._label_flag = None  # pinned int32: set by the CUDA kernel on a bad label
        self._flag_stream = None  # the stream of the last call that may set it

    def check(self) -> None:
        """Wait for this module's last CUDA call (its stream) and raise if a
        label was out of range."""
        if self._label_flag is not None:
            self._flag_stream.synchronize()
            self._raise_label_error()

    def _raise_label_error(self) -> None:
        flag = self._label_flag
        if flag is not None and flag[0]:
            flag[0] = 0
            raise ValueError(f"target holds a class id outside [0, {self.config.num_classes}) "
                             f"(num_classes={self.config.num_classes}) in an earlier CUDA "
                             f"call: its targets rows are NaN")

    def sample_params(self, batch_size: int, spatial_shape, device=None, labels=None,
                      pair_weights=None):
        """Draw this call's parameters; for a CUDA ``device`` the FMix masks
        are left to the launch (made on the GPU from the keys). ``labels`` /
        ``pair_weights``: for the label-aware pairings (host arrays)."""
        config = self.config
        if not self.mixup_enabled:
            config = MixConfig(mixup_alpha=0.0, num_classes=config.num_classes,
                               label_smoothing=config.label_smoothing, pairing=config.pairing)
        draws = draw(config, batch_size, spatial_shape, self.rng)
        # 2-D images on CUDA: masks made at launch, on the device.
        on_cuda = device is not None and device.type == "cuda" and len(spatial_shape) == 2
        return params_from_draws(config, spatial_shape, draws, batch_size,
                                 make_masks=not on_cuda, labels=labels,
                                 pair_weights=pair_weights)

    def _kind_of(self, target: torch.Tensor, batch_size: int) -> str:
        """What ``target`` holds ("classes", "dense", "multi_label" or
        "regression"), checked against its dtype and shape."""
        k = self.config.num_classes
        kind = self.target_kind
        floating = target.dtype.is_floating_point
        if kind == "auto":
            if not floating:
                kind = "classes"
            elif target.dim() == 2 and target.shape[1] == k:
                kind = "dense"
            else:
                raise ValueError(f"target: float targets of shape {tuple(target.shape)} are "
                                 f"neither class ids nor ({batch_size}, {k}) probabilities; "
                                 f"pass targets='regression' to mix them as values")
        if kind == "classes":
            if target.dim() != 1 or target.shape[0] != batch_size:
                raise ValueError(f"target must be class ids of shape ({batch_size},), "
                                 f"got {tuple(target.shape)}")
            if floating or target.dtype == torch.bool:
                raise TypeError(f"target must be integer class ids, got {target.dtype}")
        elif kind in ("dense", "multi_label"):
            if not floating or tuple(target.shape) != (batch_size, k):
                raise ValueError(f"target must be float ({batch_size}, {k}) for "
                                 f"targets={kind!r}, got {target.dtype} {tuple(target.shape)}")
        elif not floating or target.dim() not in (1, 2) or target.shape[0] != batch_size:
            raise ValueError(f"target must be float ({batch_size},) or ({batch_size}, D) for "
                             f"targets='regression', got {target.dtype} {tuple(target.shape)}")
        return kind

    def _pairing_inputs(self, target: torch.Tensor, pair_weights):
        """(labels, pair_weights) on the host for a label-aware pairing."""
        pairing = self.config.pairing
        if pair_weights is not None and pairing != "weights":
            raise ValueError(f"pair_weights is for pairing='weights', not {pairing!r}")
        if pairing == "weights":
            if pair_weights is None:
                raise ValueError("pairing='weights' needs pair_weights=, a (B, B) matrix")
            if isinstance(pair_weights, torch.Tensor):
                pair_weights = pair_weights.detach().cpu().numpy()
            return None, pair_weights
        if pairing in ("c-mixup", "cross-class"):  # a CUDA target is read back: one wait
            return target.detach().cpu().numpy(), None
        return None, None

    def __call__(self, x: torch.Tensor, target: torch.Tensor, pair_weights=None):
        if not isinstance(x, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError("x and target must be torch tensors")
        if x.dim() == 3:  # signals (N, C, L), mixed as 1 x L images: segments and 1-D masks
            n, c, length = x.shape
            result = self(x.reshape(n, c, 1, length), target, pair_weights)
            return tuple(r.view(n, c, length) if k in (0, 2) else r for k, r in enumerate(result))
        if x.dim() == 5 and self.five_d == "video":  # one box or mask for every frame
            if not x.is_contiguous():
                raise ValueError("x: a video batch (N, T, C, H, W) must be contiguous")
            n, t, c, h, w = x.shape
            result = self(x.view(n, t * c, h, w), target, pair_weights)
            frames = [r.view(n, t, c, h, w) if k in (0, 2) else r for k, r in enumerate(result)]
            return tuple(frames)
        if x.requires_grad:
            raise ValueError("x must not require grad: mixing is a data transform")
        view, layout = _layout_view(x, self.five_d)
        kind = self._kind_of(target, x.shape[0])
        if kind != "classes" and not self.split_targets:  # values mixed through NumPy / CuPy
            if target.requires_grad:
                raise ValueError("target must not require grad: mixing is a data transform "
                                 "(detach it first)")
            if target.dtype == torch.bfloat16:  # neither NumPy nor CuPy has bfloat16
                target = target.float()
        if target.device != x.device:
            raise ValueError(f"target is on {target.device} but x on {x.device}")
        shape = mixing.check_images(view, layout, "x")
        with _device_of(x):
            return self._mix(x, target, view, layout, shape, kind, pair_weights)

    def _mix(self, x, target, view, layout, shape, kind, pair_weights):
        """__call__ once its inputs are checked (on x's device when CUDA)."""
        labels, pair_weights = self._pairing_inputs(target, pair_weights)
        params = self.sample_params(x.shape[0], shape, x.device, labels, pair_weights)
        if not x.is_cuda:
            params = saliency.place_boxes(view.numpy(), params, layout,
                                          self.config.saliencymix_saliency)
        self.last_params = params
        label_params = params if self.label_lam is None else dataclasses.replace(
            params, lam=mixing.label_weights(self.label_lam, params))
        if x.is_cuda and len(shape) == 2:
            out, targets = self._call_cuda(x, view, layout, shape, target, params, kind,
                                           label_params)
            return self._with_clean(out, targets, x, target, kind)
        # Targets first: their label check fails before x is written in place.
        if x.is_cuda:
            targets = self._targets_cuda(target, kind, label_params)
        else:
            targets = self._targets_cpu(target, kind, label_params)
        out = x if self._in_place else torch.empty_like(x)
        out_view = out.permute(*_permutation(layout)) if layout.endswith("C") else out
        if x.is_cuda:  # volumes and clips across time: gpumix.mix_images's kernels
            mixing.mix_images(view, params, layout, out=view if self._in_place else out_view,
                              stream=_cuda_stream())
            return self._with_clean(out, targets, x, target, kind)
        source = view.numpy()
        mixing.mix_images(source, params, layout,
                          out=source if self._in_place else out_view.numpy(),
                          scratch=scratch("gpumix.torch.Mixup snapshot", source.shape,
                                          source.dtype) if self._in_place else None)
        return self._with_clean(out, targets, x, target, kind)

    @property
    def _in_place(self) -> bool:
        """Whether ``x`` is overwritten: ``inplace``, unless the clean batch is returned."""
        return self.inplace and not self.return_clean

    def _with_clean(self, out, targets, x, target, kind):
        """``(out, targets)``, or with ``return_clean`` also the untouched
        input and its own targets (each sample paired with itself): the
        mixed batch was written to new memory, so no pass is repeated."""
        if not self.return_clean:
            return out, targets
        return out, targets, x, self._clean_targets(target, kind)

    def _clean_targets(self, target: torch.Tensor, kind: str):
        if self.split_targets or kind == "regression":
            return target if self.split_targets else target.float()
        smoothing, toward = self._smoothing(kind)
        if kind != "classes":
            return target.float() * (1.0 - smoothing) + smoothing * toward
        k, smoothing = self.config.num_classes, self.config.label_smoothing
        off = smoothing / k
        clean = torch.full((target.shape[0], k), off, dtype=torch.float32, device=target.device)
        # Clamped: a bad label is reported by the mixed targets' check, never by a device assert.
        return clean.scatter_(1, target.long().clamp(0, k - 1)[:, None], 1.0 - smoothing + off)

    def _smoothing(self, kind: str):
        """(smoothing, toward) for the dense kinds (gpumix.mixing.target_smoothing)."""
        return mixing.target_smoothing(kind, self.config.label_smoothing,
                                       self.config.num_classes)

    def _split(self, target: torch.Tensor, label_params):
        """(y_a, y_b, lam): the targets as given, their partners', the label weights."""
        pair = torch.from_numpy(label_params.pair)
        lam = torch.from_numpy(np.ascontiguousarray(label_params.lam, np.float32))
        if target.is_cuda:  # pinned, then non-blocking: no wait for the device
            pair = pair.pin_memory().to(target.device, non_blocking=True)
            lam = lam.pin_memory().to(target.device, non_blocking=True)
        return target, target.index_select(0, pair), lam

    def _targets_cpu(self, target: torch.Tensor, kind: str, label_params):
        if self.split_targets:
            if kind == "classes":
                mixing.check_labels(target.numpy(), target.shape[0], self.config.num_classes)
            return self._split(target, label_params)
        if kind == "classes":
            return torch.from_numpy(mixing.soft_targets(
                target.numpy(), label_params, self.config.num_classes,
                self.config.label_smoothing))
        smoothing, toward = self._smoothing(kind)
        return torch.from_numpy(mixing.mix_targets(target.numpy(), label_params,
                                                   smoothing=smoothing, toward=toward))

    def _call_cuda(self, x, view, layout, spatial_shape, target, params, kind, label_params):
        """One pinned upload of the table, one launch (after the masks with FMix)
        that writes class-id targets too; other targets take one more launch."""
        self._raise_label_error()  # a bad label met by an earlier call
        launcher = runtime.active_launcher()
        if self._label_flag is None:
            self._label_flag = launcher.flag()
            self._label_flag_view = runtime.DeviceArray.on_host(self._label_flag)
        self._flag_stream = torch.cuda.current_stream()  # where this call's kernel runs
        b = x.shape[0]
        rows = to_table(params, spatial_shape, self.config, label_lam=label_params.lam)
        with_labels = kind == "classes" and not self.split_targets
        targets = torch.empty((b, self.config.num_classes) if with_labels else (0, 1),
                              dtype=torch.float32, device=x.device)
        out = x if self._in_place else torch.empty_like(x)
        out_view = out if layout == "NCHW" else out.permute(0, 2, 3, 1)
        by_pairs = self._in_place and not self.config.on("resizemix") and (
            self.config.pairing == "flip" or table_mix.is_involution(params.pair))  # i <-> j
        source = view
        if self._in_place and not by_pairs:  # cycles longer than two: mix from a snapshot
            snapshot = self._cuda_scratch.get(threading.get_ident())
            if snapshot is None or snapshot.shape != view.shape or snapshot.dtype != view.dtype \
                    or snapshot.device != x.device:
                snapshot = self._cuda_scratch[threading.get_ident()] = torch.empty_like(
                    view, memory_format=torch.contiguous_format)
            snapshot.copy_(view)
            source = snapshot
        labels = target if with_labels else torch.zeros(1, dtype=torch.int64, device=x.device)
        masks = mix_cuda(runtime.DeviceArray.of(source), runtime.DeviceArray.of(out_view),
                         rows, params, layout, runtime.DeviceArray.of(labels),
                         runtime.DeviceArray.of(targets), self._label_flag_view, self.config,
                         by_pairs, _cuda_stream().ptr, x.device, launcher)
        if masks is not None:
            self.last_params = dataclasses.replace(params, mask=masks.owner)
        if with_labels:
            return out, targets
        return out, self._targets_cuda(target, kind, label_params)

    def _targets_cuda(self, target: torch.Tensor, kind: str, label_params):
        """CUDA targets other than the one-launch path's: split, dense kinds,
        or class ids (one wait, for their range check)."""
        if self.split_targets:
            return self._split(target, label_params)
        if kind == "classes":
            mixed = torch.empty((target.shape[0], self.config.num_classes), dtype=torch.float32,
                                device=target.device)
            return mixing.soft_targets(target, label_params, self.config.num_classes,
                                       self.config.label_smoothing, out=mixed,
                                       stream=_cuda_stream())
        smoothing, toward = self._smoothing(kind)
        mixed = torch.empty(tuple(target.shape), dtype=torch.float32, device=target.device)
        mixing.mix_targets(target, label_params, smoothing=smoothing, toward=toward, out=mixed,
                           stream=_cuda_stream())
        return mixed


def _permutation(layout: str) -> tuple[int, ...]:
    """The permute that shows an NC... tensor in a channels-last ``layout``."""
    return (0, 2, 3, 1) if layout == "NHWC" else (0, 2, 3, 4, 1)


def mix_cuda(x, out, rows, params, layout, labels, targets, flag, config, by_pairs, stream,
             device, launcher):
    """The host path of a CUDA ``Mixup`` call on DeviceArrays (``flag``: the
    pinned label-error flag seen as one): upload the table, make the FMix
    masks, launch gpumix.kernels.table_mix once with the targets; returns the
    masks (a DeviceArray) or None."""
    device_rows = launcher.upload(rows, device)
    saliency.place_device_rows(x, device_rows, rows, layout, stream, device, launcher)
    masks = mixing.launch_masks(rows, device_rows,
                                x.shape[1:3] if layout == "NHWC" else x.shape[2:], stream,
                                launcher)
    off, on = smoothing_values(config.num_classes, config.label_smoothing)
    mixing.launch_table_mix(x, out, device_rows, masks, layout, stream, launcher, by_pairs,
                            targets=(labels, targets, flag, off, on))
    return masks


def _host_table(table_like) -> np.ndarray:
    """The params table as a NumPy (B, N_COLUMNS) float64 array (a view of a
    CPU tensor or array; CUDA tables are refused: FMix needs the keys on the
    host, and reading them back would wait for the device)."""
    if isinstance(table_like, torch.Tensor):
        if table_like.is_cuda:
            raise ValueError("table must be on the CPU (gpumix.dali.mix_params makes it there; "
                             "do not move it to the GPU)")
        table_like = table_like.numpy()
    rows = np.asarray(table_like)
    if rows.dtype != np.float64 or rows.ndim != 2 or rows.shape[1] != table.N_COLUMNS:
        raise ValueError(f"table must be float64 of shape (B, {table.N_COLUMNS}) "
                         f"(gpumix.dali.mix_params), got {rows.dtype} {rows.shape}")
    return rows


_CONSTANTS: dict = {}


def _as_values(values) -> np.ndarray:
    """A number, sequence, array or tensor (such as torch's (C, 1, 1)) as flat float32."""
    if isinstance(values, torch.Tensor):
        if values.is_cuda:  # reading it back would wait for the device at every call
            raise ValueError("mean and std must be numbers, sequences or CPU tensors, not "
                             "CUDA tensors")
        values = values.detach().numpy()
    return np.asarray(values, np.float32).reshape(-1)


def _normalization(mean, std, channels: int):
    """(mean, 1 / std) as float32 arrays of one or ``channels`` values, checked."""
    mean32, std32 = _as_values(mean), _as_values(std)
    key = (mean32.tobytes(), std32.tobytes(), channels)
    if key not in _CONSTANTS:
        if mean32.shape != std32.shape or mean32.size not in (1, channels):
            raise ValueError(f"mean and std must hold one value or one per channel "
                             f"({channels}), got {mean32.tolist()} and {std32.tolist()}")
        if not np.all(np.isfinite(mean32)) or not np.all(std32 > 0):
            raise ValueError(f"mean must be finite and std positive, got {mean32.tolist()} "
                             f"and {std32.tolist()}")
        _CONSTANTS[key] = (mean32, (np.float32(1.0) / std32).astype(np.float32))
    return _CONSTANTS[key]


def identity_table(batch_size: int, size) -> np.ndarray:
    """A params table that mixes nothing (every sample its own partner, no
    method): :func:`apply` with it only normalises. ``size``: H or (H, W)."""
    size = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 0 or len(size) != 2 \
            or min(size) < 1:
        raise ValueError(f"identity_table needs batch_size >= 0 and size H or (H, W) >= 1, "
                         f"got {batch_size!r} and {size!r}")
    rows = np.zeros((batch_size, table.N_COLUMNS), np.float64)
    rows[:, table.PAIR] = np.arange(batch_size)
    rows[:, table.LAM] = 1.0
    rows[:, table.HEIGHT:table.WIDTH + 1] = size
    return rows


def apply(images: torch.Tensor, table_like, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
          channels_last: bool = False, dtype=torch.float32, return_applied: bool = False):
    """Mix and normalise a batch at the hand-off from DALI: the CUDA twin of
    gpumix.dali.mix_normalize.

    ``images``: (B, H, W, C) uint8, CPU or CUDA (e.g. DALI's output through
    its torch iterator); ``table_like``: the (B, N_COLUMNS) float64 params
    table from :func:`gpumix.dali.mix_params` (CPU tensor or array). Returns
    a (B, C, H, W) ``dtype`` (float32 or float16) tensor on the images'
    device, ``(mixed - mean) / std`` per channel, contiguous or (with
    ``channels_last``) in channels-last memory. With ``return_applied``:
    ``(mixed, masks, boxes)``, the masks (B, H, W) float32 of FMix, SmoothMix
    and GridMix (zeros for other samples; None without them) and the boxes
    (B, 4) int64 as applied (SaliencyMix's placed on the images), on the
    images' device.

    On CUDA it is one launch of gpumix.kernels.mix_normalize on torch's
    current stream (after the masks and the SaliencyMix boxes, when a sample
    needs them), with the
    table uploaded through pinned memory: no host synchronisation. DALI's
    torch iterator has already made torch's stream wait for the images, and
    keeps their memory until the tensor is freed and the device is idle
    (docs/design.md), so the launch needs nothing more. On the CPU it runs
    the CPU twin on every core. Both store exactly what
    ``gpumix.dali.mix_normalize`` stores.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4 or not images.is_contiguous():
        raise ValueError(f"images must be a contiguous (B, H, W, C) uint8 tensor, got "
                         f"{images.dtype} of shape {tuple(images.shape)}")
    if dtype not in (torch.float32, torch.float16):
        raise TypeError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    b, h, w, c = images.shape
    if min(h, w, c) < 1:
        raise ValueError(f"images must have at least one row, column and channel, got shape "
                         f"{tuple(images.shape)}")
    rows = _host_table(table_like)
    if rows.shape[0] != b:
        raise ValueError(f"table has {rows.shape[0]} rows for a batch of {b} images")
    check_table(rows, (h, w))
    mean32, inv_std32 = _normalization(mean, std, c)
    chw = not channels_last
    shape = (b, c, h, w) if chw else (b, h, w, c)
    if b == 0:  # nothing to mix: an empty batch of the output's shape
        out = torch.empty(shape, dtype=dtype, device=images.device)
        result = out if chw else out.permute(0, 3, 1, 2)
        empty_boxes = torch.empty((0, 4), dtype=torch.int64, device=images.device)
        return (result, None, empty_boxes) if return_applied else result
    if images.is_cuda:
        launcher = runtime.active_launcher()
        out = torch.empty(shape, dtype=dtype, device=images.device)
        with _device_of(images):
            masks, device_rows = handoff_cuda(runtime.DeviceArray.of(images), rows, mean32,
                                              inv_std32, chw, runtime.DeviceArray.of(out),
                                              _cuda_stream().ptr, images.device, launcher)
        masks = None if masks is None else torch.as_tensor(masks.owner, device=images.device)
        applied = device_rows.owner.view(torch.float64).reshape(b, table.N_COLUMNS)
    else:
        out, masks, applied = _handoff_cpu(images.numpy(), rows, mean32, inv_std32, chw, shape,
                                           dtype)
        applied = torch.from_numpy(applied)
    result = out if chw else out.permute(0, 3, 1, 2)
    if return_applied:
        return result, masks, applied[:, table.Y0:table.X1 + 1].long()
    return result


def _handoff_cpu(images, rows, mean32, inv_std32, chw, shape, dtype):
    if table.uses(rows, SALIENCYMIX) and saliency.unplaced(
            rows[:, table.METHOD], rows[:, table.Y0:table.X1 + 1]).size:
        rows = rows.copy()  # the caller's table stays as it was
        saliency.place_rows(images, rows, "NHWC")
    masks = mixing.masks_from_table(rows, images.shape[1:3])
    wide = torch.empty(shape, dtype=torch.float32)
    fused.cpu(images, rows, masks if masks is not None else np.zeros((1, 1, 1), np.float32),
              mean32, inv_std32, chw, out=wide.numpy())
    out = wide if dtype == torch.float32 else wide.to(dtype)
    return out, None if masks is None else torch.from_numpy(masks), rows


def handoff_cuda(images, rows, mean32, inv_std32, chw, out, stream, device, launcher):
    """The host path of :func:`apply` on CUDA, on DeviceArrays: returns the
    masks DeviceArray (None without masks) and the device table."""
    b, h, w, _ = images.shape
    constants = runtime.kept(launcher, f"normalization {mean32.tobytes()} {inv_std32.tobytes()}",
                             lambda: (launcher.upload(mean32, device),
                                      launcher.upload(inv_std32, device)))
    device_rows = launcher.upload(rows, device)
    saliency.place_device_rows(images, device_rows, rows, "NHWC", stream, device, launcher)
    masks = mixing.launch_masks(rows, device_rows, (h, w), stream, launcher)
    grid, block = fused.cuda_grid(b, h, w)
    runtime.launch(fused.cuda_kernel, grid, block, stream,
                   (images, device_rows, mixing.no_mask(launcher) if masks is None else masks,
                    *constants, chw, out), launcher)
    return masks, device_rows
