"""gpumix inside NVIDIA DALI pipelines.

Three operators for your own ``@pipeline_def``:

* :func:`mix_params` (labels in; ``targets, table`` out): the params alone,
  made on the CPU stage, for mixing at the hand-off to torch with
  :func:`gpumix.torch.apply` (one fused launch on the GPU: the fastest way).
* :func:`mix` (images and labels in; ``images, targets`` out): mixing inside
  the graph, images in their layout and dtype.
* :func:`mix_normalize` / :func:`normalize`: :func:`mix` and the per-channel
  normalisation in one pass (HWC uint8 in, float CHW or HWC out).

Randomness. Every random number comes from DALI's own random operators
(``random.uniform``, ``random.beta``, ``random.choice`` for the FMix spectrum
keys, ``batch_permutation``), seeded by the pipeline, so DALI's checkpointing
restores the stream bit for bit. They are the fields of
:class:`gpumix.params.Draws`; everything after them is
:func:`gpumix.params.params_from_draws`, the pure code the NumPy path runs.
In mode "batch" the first sample's draws serve the whole batch.

One mechanism per device. The params are always made on the CPU stage by
one batch-mode ``numba_function`` that calls the Python step
(:class:`_ParamsStep`) back through a ctypes callback (gpumix/dali_cpu.py): it
outputs the soft targets and one params-table row per sample
(gpumix.kernels.table), and on CPU pipelines the masks (FMix, SmoothMix,
GridMix) and the SaliencyMix boxes, read off the samples it is given. Then:

* CPU pipelines: per-sample ``numba_function`` appliers (gpumix/dali_cpu.py)
  mix each sample into DALI's output on DALI's thread pool, reading the
  partner through the address in the sample's row.
* GPU pipelines (``device="gpu"``): the table goes to the GPU stage and one
  GPU ``python_function`` (:class:`_GpuMixStep`) launches ONE kernel
  (gpumix.kernels.table_mix) that reads the table on the device; masks and
  SaliencyMix boxes are made there first (the table is copied to the host
  for them: one small copy and a wait per batch). Against the hand-off
  (:func:`mix_params` + :func:`gpumix.torch.apply`) this costs the
  ``python_function``'s per-sample conversions under the GIL, a stack of
  the batch and a second pass over it for the normalisation; prefer the
  hand-off when the batch goes to torch anyway.

Targets. Labels are class ids by default; with ``targets=`` they are one
float vector per sample (dense, multi-label or regression), carried to the
params step at the end of each sample's draw vector and mixed there with
the sample's label weight (gpumix.mix_targets). ``split_targets`` outputs
the partners' labels and the weights instead; ``return_clean`` adds the
input batch and its own targets (built in the graph: ``one_hot`` or
arithmetic on the labels).

Errors. DALI never sees an exception raised inside a ``numba_function``, so
the params step keeps its errors and fills the batch's targets with NaN;
:func:`raise_pending` (``gpumix.dali.raise_pending(pipe)``) raises them, on
CPU and GPU pipelines alike. :class:`gpumix.torch.DALIMixLoader` calls it
after every batch; call it after ``pipe.run()`` or each iterator step.

Partial batches. DALI runs every iteration at full batch size; the reader
pads the epoch's last batch (``pad_last_batch=True``) by repeating its last
sample, and the iterator trims it. Pass ``source_info`` (``fn.get_property(
encoded, key="source_info")``) and the trailing repeats are treated as
padding: they pair with themselves, and the real samples pair only among
themselves (the permutation restricted to them, :func:`restrict_pairing`).
A reader given the same path twice would make real repeats look like
padding: spell repeats apart first (gpumix.pipelines.distinct_paths).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gpumix import dali_cpu, fmix, mixing, runtime, saliency
from gpumix.config import LABEL_PAIRINGS, MAX_GRID, MixConfig, _check_choice as check_choice, \
    _check_number as check_number
from gpumix.dali_cpu import raise_pending
from gpumix.kernels import table
from gpumix.kernels._launch import scratch, upload_many
from gpumix.params import (Draws, check_rank, pairing, pairs_from_weights, params_from_draws,
                           partner_weights, to_table)

__all__ = ["mix_params", "mix", "mix_normalize", "normalize", "raise_pending",
           "param_names", "restrict_pairing"]

PARAM_NAMES = ("labels", "pair", "lam", "method", "box")  # + "mask" with a mask method
PARAM_COLUMNS = {"labels": (table.LABEL, 1), "pair": (table.PAIR, 1), "lam": (table.LAM, 1),
                 "method": (table.METHOD, 1), "box": (table.Y0, 4)}


def param_names(config: MixConfig) -> tuple[str, ...]:
    """Names of the params outputs of :func:`mix` with ``return_params=True``."""
    return PARAM_NAMES + (("mask",) if config.uses_masks else ())


def restrict_pairing(pair: np.ndarray, n_valid: int) -> np.ndarray:
    """Pairing of the first ``n_valid`` samples induced by ``pair`` (a permutation).

    A valid sample's partner is the first valid sample met by following
    ``pair`` (cycles contracted onto the valid set). Samples left as fixed
    points are then re-paired: two or more rotate among themselves, a single
    one is spliced into another cycle; padding (index >= n_valid) pairs with
    itself. With every sample valid this returns ``pair`` unchanged.
    """
    b = pair.shape[0]
    result = np.arange(b, dtype=np.int64)
    if n_valid <= 1:
        return result
    for i in range(n_valid):
        j = int(pair[i])
        while j >= n_valid:
            j = int(pair[j])
        result[i] = j
    fixed = [i for i in range(n_valid) if result[i] == i]
    if len(fixed) >= 2:
        for a, b_ in zip(fixed, fixed[1:] + fixed[:1]):
            result[a] = b_
    elif len(fixed) == 1:
        f = fixed[0]
        j = next(i for i in range(n_valid) if i != f)
        result[f] = result[j]
        result[j] = f
    return result


def draw_columns(config: MixConfig, volume: bool = False) -> dict[str, slice]:
    """Where each draw sits in the per-sample float64 vector of
    :func:`_draw_vectors`: five uniforms in [0, 1) (apply, method, box y and
    x, round up), the lam of each enabled method, with FMix the two 31-bit
    halves of the spectrum key, with pairing "permutation" the partner
    index, with ResizeMix, SmoothMix or GridMix one more uniform (their
    scale), with GridMix one uniform per cell, SaliencyMix's lam, with a
    label-aware pairing the uniform that draws the partner, for volumes the
    box's depth position, and last the
    sample's label: a class id, or its target vector (the rest of the
    vector, "label" is open-ended). A method that is off has no column (its
    lam is 1)."""
    mixup_on, cutmix_on, fmix_on = config.enabled[:3]
    widths = [("apply", 1), ("method", 1), ("box", 2), ("round_up", 1)]
    widths += [(name, 1) for name, on in (("lam_mixup", mixup_on), ("lam_cutmix", cutmix_on),
                                          ("lam_fmix", fmix_on)) if on]
    widths += [("key_halves", 2)] if fmix_on else []
    widths += [("permutation", 1)] if config.pairing == "permutation" else []
    widths += [("scale", 1)] if _uses_scale(config) else []
    widths += [("cells", MAX_GRID ** 2)] if config.on("gridmix") else []
    widths += [("lam_saliencymix", 1)] if config.on("saliencymix") else []
    widths += [("partner", 1)] if config.pairing in LABEL_PAIRINGS else []
    widths += [("box_depth", 1)] if volume else []
    columns, start = {}, 0
    for name, width in widths:
        columns[name] = slice(start, start + width)
        start += width
    columns["label"] = slice(start, None)
    return columns


@dataclasses.dataclass(frozen=True)
class TargetOptions:
    """What the params step makes of the labels: ``kind`` (one of
    gpumix.mixing.TARGET_KINDS: class ids, or per-sample vectors of dense,
    multi-label or regression targets), ``split`` (the partners' labels
    instead of mixed targets) and ``label_lam`` (the targets' weight: a
    number, a function of lam, or None for lam)."""

    kind: str = "classes"
    split: bool = False
    label_lam: object = None

    def __post_init__(self):
        check_choice("targets", self.kind, mixing.TARGET_KINDS)
        if self.label_lam is not None and not callable(self.label_lam):
            check_number("label_lam", self.label_lam, 0.0, 1.0)

    @property
    def soft_classes(self) -> bool:
        """Whether the targets output is (K,) soft targets of class ids;
        otherwise it has the labels' width (mixed vectors or partners)."""
        return self.kind == "classes" and not self.split


def _uses_scale(config: MixConfig) -> bool:
    return config.on("resizemix") or config.on("smoothmix") or config.on("gridmix")


class _ParamsStep:
    """Draws in, params out, called by the params operator
    (:func:`gpumix.dali_cpu.params_operator`) once per batch: the soft
    targets, the table rows and (when it makes them) the masks. On CPU
    pipelines it is given the images' shapes and pixel addresses (pixels are
    read only to place SaliencyMix boxes) and writes the addresses into the
    rows; otherwise it takes
    ``spatial_shape``. ``make_masks``: whether masks are made here (CPU
    pipelines) or later from the rows (the hand-off, GPU pipelines);
    ``shape_masks``: whether those include SmoothMix's and GridMix's (only
    to return them: the CPU appliers make their own from the rows)."""

    def __init__(self, config: MixConfig, layout: str, spatial_shape=None,
                 make_masks: bool = False, shape_masks: bool = False,
                 targets: TargetOptions = TargetOptions(), clips: bool = False):
        self.config = config
        self.targets = targets
        self.clips = clips  # samples are video clips, their frames stacked as rows
        self.volume = spatial_shape is not None and len(spatial_shape) == 3  # D * H rows
        self.layout = "NHWC" if layout == "HWC" else "NCHW"
        self.columns = draw_columns(config, self.volume)
        self.spatial_shape = spatial_shape  # (H, W) given with size=, checked if images come
        self.make_masks = make_masks
        self.shape_masks = shape_masks
        self.images_dtype = None  # NumPy dtype of the images the operator is given, if any
        self.buffers = {}  # kept between calls: DALI runs one iteration at a time
        self.errors: list = []  # raised by dali_cpu.raise_pending
        self.applier_errors = np.zeros(1, np.int64)  # set by the CPU appliers (partner_of)

    def draws(self, table: np.ndarray) -> Draws:
        """Draws from the per-sample draw vectors (rows of ``table``)."""
        units = table if self.config.mode == "elem" else table[:1]
        column = {name: units[:, where] for name, where in self.columns.items()}
        ones = np.ones(units.shape[0])
        keys = None
        if "key_halves" in column:
            halves = column["key_halves"].astype(np.int64)
            keys = (halves[:, 0] << 31) | halves[:, 1]
        box_u = column["box"]
        if "box_depth" in column:  # (z, y, x)
            box_u = np.concatenate([column["box_depth"], box_u], axis=1)
        return Draws(apply_u=column["apply"][:, 0], method_u=column["method"][:, 0],
                     box_u=box_u, round_up_u=column["round_up"][:, 0],
                     lam_mixup=column["lam_mixup"][:, 0] if "lam_mixup" in column else ones,
                     lam_cutmix=column["lam_cutmix"][:, 0] if "lam_cutmix" in column else ones,
                     lam_fmix=column["lam_fmix"][:, 0] if "lam_fmix" in column else ones,
                     normal_keys=keys,
                     scale_u=column["scale"][:, 0] if "scale" in column else None,
                     cells_u=column.get("cells"),
                     lam_saliencymix=column["lam_saliencymix"][:, 0]
                     if "lam_saliencymix" in column else None)

    def _mask_maker(self, shape):
        if not self.make_masks:
            return None
        options = (shape, self.config.decay_power, self.config.reference_compatible)
        make = fmix.cpu_mask_maker(*options, buffers=self.buffers)
        return lambda keys, lo, hi: make(keys, lo, hi, out=scratch(
            "masks", (np.size(keys), *shape), np.float32, self.buffers))

    def _params(self, table, n_valid: int, spatial_shape):
        """(params, label ids) of the batch whose draw vectors are ``table``
        and whose first ``n_valid`` samples are real (the rest padding)."""
        b = table.shape[0]
        labels = self._labels(table[:, self.columns["label"]])
        pair = np.arange(b, dtype=np.int64)
        if self.config.pairing == "permutation":
            pair = restrict_pairing(table[:, self.columns["permutation"]][:, 0].astype(np.int64),
                                    n_valid)
        elif self.config.pairing in LABEL_PAIRINGS:  # among the real samples
            weights = partner_weights(self.config, labels[:n_valid])
            pair[:n_valid] = pairs_from_weights(weights,
                                                table[:n_valid, self.columns["partner"]][:, 0])
        else:
            pair[:n_valid] = pairing(self.config, n_valid)
        params = params_from_draws(self.config, spatial_shape, self.draws(table), b, pair=pair,
                                   fmix_masks=self._mask_maker(spatial_shape),
                                   make_masks=self.make_masks, shape_masks=self.shape_masks)
        return params, labels

    def _labels(self, values: np.ndarray) -> np.ndarray:
        """The batch's labels from their draw columns: int64 class ids (B,),
        checked, or float (B, D) target vectors."""
        k, kind = self.config.num_classes, self.targets.kind
        if kind == "classes":
            if values.shape[1] != 1:
                raise ValueError(f"labels must be one class id per sample for "
                                 f"targets='classes', got {values.shape[1]} values")
            ids = values[:, 0]  # the draw vector holds them as float64
            fractional = ids != np.floor(ids)  # NaN too
            if fractional.any():
                raise TypeError(f"labels must be integer class ids, got {ids[fractional][0]}")
            return mixing.check_labels(ids.astype(np.int64), len(values), k)
        if kind in ("dense", "multi_label") and values.shape[1] != k:
            raise ValueError(f"labels must be {k} values per sample (num_classes) for "
                             f"targets={kind!r}, got {values.shape[1]}")
        return values

    def _targets(self, labels: np.ndarray, label_params) -> np.ndarray:
        """The targets output: soft targets of class ids, mixed target
        vectors, or (split) the partners' labels, float32 (B, width)."""
        config, kind = self.config, self.targets.kind
        if self.targets.split:
            return labels[label_params.pair].reshape(len(labels), -1).astype(np.float32)
        if kind == "classes":
            return mixing.soft_targets(labels, label_params, config.num_classes,
                                       config.label_smoothing)
        smoothing, toward = mixing.target_smoothing(kind, config.label_smoothing,
                                                    config.num_classes)
        return mixing.mix_targets(labels.astype(np.float32), label_params,
                                  smoothing=smoothing, toward=toward)

    def _spatial_shape(self, shapes, dtype) -> tuple[int, int]:
        """(H, W) of a batch of samples of these shapes and dtype, checked like
        mixing.check_images, and against ``size=`` when it was given."""
        shapes = sorted(set(shapes))
        if len(shapes) != 1:
            raise ValueError(f"images: every sample of a batch must have the same shape to be "
                             f"mixed, got {shapes}")
        mixing.check_image_dtype(dtype, "images")
        shape = shapes[0]
        if len(shape) != 3:
            raise ValueError(f"images must be 3-D per sample ({self.layout[1:]}), got sample "
                             f"shape {shape}")
        c, h, w = shape if self.layout == "NCHW" else (shape[2], shape[0], shape[1])
        if c < 1:
            raise ValueError(f"images have no channels in layout {self.layout[1:]} (sample "
                             f"shape {shape})")
        if self.volume:  # D slices of H rows, stacked
            depth, height, width = self.spatial_shape
            if (h, w) != (depth * height, width):
                raise ValueError(f"volumes must be {tuple(self.spatial_shape)} (D, H, W) as "
                                 f"given by size=, got {h // max(depth, 1)} x {w} slices")
            return depth, height, width
        if self.clips:  # F frames of the given size, stacked
            frame_h, frame_w = self.spatial_shape
            if w != frame_w or h % frame_h:
                raise ValueError(f"video frames are {w} wide and {h} rows in all, not frames "
                                 f"of size={tuple(self.spatial_shape)}")
            return int(frame_h), int(frame_w)
        if self.spatial_shape is not None and (h, w) != tuple(self.spatial_shape):
            raise ValueError(f"images are {h} x {w} but mix() was given size="
                             f"{tuple(self.spatial_shape)}")
        return int(h), int(w)

    def fast_outputs(self, draw_table, n_valid, shapes=None, addresses=None):
        """(targets, table rows, masks) of one batch: draw vectors
        ``draw_table``, ``n_valid`` real samples, and on CPU pipelines the
        samples' shapes and pixel addresses (None: no images)."""
        if shapes is None:
            spatial = self.spatial_shape
            if spatial is None:
                raise ValueError("size=(H, W) is required when the params operator is not "
                                 "given the images")
        else:
            dtype = np.uint8 if self.layout == "NHWC" else np.float32
            spatial = self._spatial_shape([tuple(int(n) for n in s) for s in shapes], dtype)
        params, labels = self._params(draw_table, n_valid, spatial)
        label_params = dataclasses.replace(
            params, lam=mixing.label_weights(self.targets.label_lam, params))
        targets = self._targets(labels, label_params)
        rows = to_table(params, spatial, self.config,
                        labels if self.targets.kind == "classes" else None,
                        own_address=addresses, error_address=self.applier_errors.ctypes.data,
                        label_lam=label_params.lam)
        if addresses is not None and self.config.on("saliencymix"):
            shape = tuple(int(n) for n in shapes[0])
            samples = [_sample_at(int(a), shape, self.images_dtype) for a in addresses]
            saliency.place_rows(samples, rows, self.layout, self.config.saliencymix_saliency)
        masks = np.zeros((0, 0, 0), np.float32)
        if self.make_masks:
            masks = params.mask if params.mask is not None else self._no_masks(
                draw_table.shape[0], spatial)
            masks = masks.reshape(len(masks), -1, spatial[-1])  # a volume's: D * H rows
        return (np.ascontiguousarray(targets, np.float32), rows,
                np.ascontiguousarray(masks, np.float32))

    def _no_masks(self, b, spatial_shape):
        zeros = scratch("no_masks", (b, *spatial_shape), np.float32, self.buffers)
        zeros.fill(0.0)
        return zeros


def _sample_at(address: int, shape, dtype) -> np.ndarray:
    """A read-only NumPy view of the sample DALI holds at ``address`` (valid
    while the operator runs: DALI keeps its inputs alive until then)."""
    view = dali_cpu.view_at(address, shape, dtype)
    view.flags.writeable = False
    return view


class _GpuMixStep:
    """The GPU ``python_function`` of :func:`mix` with ``device="gpu"``:
    images and table rows in (on the device), the mixed batch out, by one
    launch of gpumix.kernels.table_mix on CuPy's current stream (the one DALI
    sets for the operator). Masks are made from the rows (FMix: the keys and
    cuFFT) and SaliencyMix boxes placed on the device; both need the table on
    the host too, so it is copied there first. With ``return_params`` it
    also outputs the masks and the table as applied."""

    def __init__(self, layout: str, spatial_shape, masks_on: bool, saliency_on: bool,
                 return_params: bool, clips: bool = False):
        self.layout = "NHWC" if layout == "HWC" else "NCHW"
        self.spatial_shape = spatial_shape  # (H, W), or a volume's (D, H, W)
        self.clips = clips  # video clips, their frames stacked as rows
        self.masks_on = masks_on  # without masks or SaliencyMix nothing is read back
        self.saliency_on = saliency_on
        self.with_masks_output = return_params and masks_on
        self.with_rows_output = return_params

    def __call__(self, images, rows, given_masks=None):
        """``given_masks``: a volume's masks (D * H rows), made by the params
        step on the CPU stage; otherwise masks are made here from the rows."""
        import cupy as cp

        batch = _stack(images, cp)
        h, w = mixing.check_images(batch, self.layout)
        if self.clips and w == self.spatial_shape[1] and h % self.spatial_shape[0] == 0:
            h = self.spatial_shape[0]
        expected = self.spatial_shape
        if len(expected) == 3:  # a volume: images of D * H rows
            expected = (expected[0] * expected[1], expected[2])
        if (h, w) != expected:
            raise ValueError(f"images are {h} x {w} but mix() was given size="
                             f"{self.spatial_shape}: the params were made for that size")
        rows = _stack(rows, cp)
        stream = cp.cuda.get_current_stream().ptr
        launcher = runtime.active_launcher()
        made_here = self.masks_on and given_masks is None
        host_rows = rows.get() if made_here or self.saliency_on else None
        if self.saliency_on:  # placed in a copy: the input stays as DALI made it
            rows = rows.copy()
        device_rows = runtime.DeviceArray.of(rows)
        if self.saliency_on:
            saliency.place_device_rows(
                runtime.DeviceArray.of(batch), device_rows, host_rows, self.layout, stream, None,
                launcher, upload=lambda host: runtime.DeviceArray.of(
                    upload_many([(host, np.int64)], cp.cuda.get_current_stream())[0]))
        masks = None
        if given_masks is not None:
            masks = runtime.DeviceArray.of(cp.ascontiguousarray(_stack(given_masks, cp)))
        elif self.masks_on:
            masks = mixing.launch_masks(host_rows, device_rows, (h, w), stream, launcher)
        out = cp.empty_like(batch)
        mixing.launch_table_mix(runtime.DeviceArray.of(batch), runtime.DeviceArray.of(out),
                                device_rows, masks, self.layout, stream, launcher,
                                frame_height=h if self.clips else None)
        outputs = [list(out)]
        if self.with_masks_output:
            outputs.append(list(masks.owner if masks is not None else
                                cp.zeros((len(images), h, w), cp.float32)))
        if self.with_rows_output:
            outputs.append(list(rows))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _stack(batch, xp):
    """The samples as one (B, ...) array: a zero-copy view when DALI laid them
    out back to back (uniform shapes usually are), else a stacked copy."""
    samples = [xp.asarray(s) for s in batch]
    first = samples[0]
    uniform = all(s.shape == first.shape and s.dtype == first.dtype for s in samples)
    if uniform and first.flags.c_contiguous and len(samples) > 1:
        address = (lambda a: a.ctypes.data) if xp is np else (lambda a: a.data.ptr)
        step = first.nbytes
        start = address(first)
        if all(address(s) == start + i * step for i, s in enumerate(samples)):
            return xp.lib.stride_tricks.as_strided(
                first, shape=(len(samples), *first.shape), strides=(step, *first.strides))
    return xp.stack(samples)


def _draw_vectors(config: MixConfig, spatial_shape, batch_size: int, labels):
    """DALI random operators for the draws this config uses and the label,
    as one float64 vector per sample in :func:`draw_columns` order (one input
    for python_function, which converts every input sample by sample; each
    DALI operator costs about 60 us of CPU per batch, so the draws are made
    in float64 and shape [n] directly, with no casts or stacks between)."""
    from nvidia.dali import fn, types

    f64 = types.FLOAT64
    mixup_on, cutmix_on, fmix_on = config.enabled[:3]
    parts = [fn.random.uniform(range=[0.0, 1.0], shape=[5], dtype=f64)]
    if mixup_on:
        parts.append(fn.random.beta(alpha=config.mixup_alpha, beta=config.mixup_alpha,
                                    shape=[1], dtype=f64))
    if cutmix_on and config.cutmix_minmax is not None:
        parts.append(fn.random.uniform(range=list(config.cutmix_minmax), shape=[1], dtype=f64))
    elif cutmix_on:
        parts.append(fn.random.beta(alpha=config.cutmix_alpha, beta=config.cutmix_alpha,
                                    shape=[1], dtype=f64))
    if fmix_on:
        a = config.fmix_alpha
        parts.append(fn.random.beta(alpha=a + 1 if config.reformulate else a, beta=a,
                                    shape=[1], dtype=f64))
    if fmix_on:
        if spatial_shape is None:
            raise ValueError("size=(H, W) is required when fmix_alpha > 0: FMix spectra are "
                             "drawn with a fixed shape")
        parts.append(fn.cast(fn.random.choice(2**31 - 1, shape=[2]), dtype=f64))
    if config.pairing == "permutation":
        permutation = fn.batch_permutation(no_fixed_points=batch_size != 1)
        parts.append(fn.reshape(fn.cast(permutation, dtype=f64), shape=[1]))
    uniforms = (1 if _uses_scale(config) else 0) + (MAX_GRID ** 2 if config.on("gridmix") else 0)
    if uniforms:
        parts.append(fn.random.uniform(range=[0.0, 1.0], shape=[uniforms], dtype=f64))
    if config.on("saliencymix"):
        a = config.saliencymix_alpha
        parts.append(fn.random.beta(alpha=a, beta=a, shape=[1], dtype=f64))
    if config.pairing == "weights":
        raise ValueError("pairing='weights' takes a matrix with each batch: use "
                         "gpumix.torch.Mixup; in DALI pipelines use 'c-mixup' or 'cross-class'")
    if config.pairing in LABEL_PAIRINGS:
        parts.append(fn.random.uniform(range=[0.0, 1.0], shape=[1], dtype=f64))
    if spatial_shape is not None and len(spatial_shape) == 3:  # a volume's box depth
        parts.append(fn.random.uniform(range=[0.0, 1.0], shape=[1], dtype=f64))
    parts.append(fn.reshape(fn.cast(labels, dtype=f64), shape=[-1]))  # last: any width
    return fn.cat(*parts)


def _spatial(size):
    """``size=`` as an (H, W) tuple of ints, or None."""
    return None if size is None else tuple(int(n) for n in size)


def _params_stage(config: MixConfig, labels, *, images=None, images_type=None,
                  layout: str = "HWC", size=None, source_info=None,
                  return_params: bool = False, targets: TargetOptions = TargetOptions(),
                  clips: bool = False):
    """The params operator's (targets, table, masks or None) nodes on the CPU
    stage. Given the images (CPU pipelines, of DALI type ``images_type``) it
    reads their shapes, addresses and (SaliencyMix) pixels and makes the
    FMix masks (all masks with ``return_params``); otherwise it needs
    ``size``."""
    from nvidia.dali import types
    from nvidia.dali.pipeline import Pipeline

    with_images = images is not None
    volume = size is not None and len(size) == 3  # cuboids are applied through masks too
    # Masks need the images' shape, or a volume's size (the GPU stage takes them from here).
    masks_on = (with_images or volume) and (
        config.on("fmix") or (volume and config.on("cutmix"))
        or (return_params and config.uses_masks))
    step = _ParamsStep(config, layout, spatial_shape=_spatial(size), make_masks=masks_on,
                       shape_masks=return_params, targets=targets, clips=clips)
    step.images_dtype = {types.UINT8: np.uint8, types.FLOAT: np.float32,
                         types.UINT16: np.float16}.get(images_type)
    batch_size = Pipeline.current().max_batch_size
    inputs = [_draw_vectors(config, size, batch_size, labels)] + ([images] * with_images)
    inputs += [] if source_info is None else [source_info]
    operator = dali_cpu.params_operator(
        step, num_classes=config.num_classes, with_masks=masks_on,
        with_names=source_info is not None, images_type=images_type if with_images else None,
        layout=layout,
        labels_from=None if targets.soft_classes else step.columns["label"].start,
        mask_shape=_spatial(size) if clips else
        (size[0] * size[1], size[2]) if volume else None)
    mixed_targets, rows, *masks = operator(*inputs)
    return mixed_targets, rows, (masks[0] if masks else None)


def _target_outputs(labels, targets_node, rows, config: MixConfig, targets: TargetOptions,
                    images=None, device: str = "cpu") -> tuple:
    """The targets part of an operator's outputs: ``(targets,)`` or, split,
    ``((y_a, y_b, lam),)``; then with ``images`` (return_clean) the clean
    images and their own targets. On ``device="gpu"`` targets go to the GPU."""
    from nvidia.dali import fn, types

    move = (lambda node: node.gpu()) if device == "gpu" else (lambda node: node)
    if targets.split:
        partner = fn.cast(targets_node, dtype=types.INT64 if targets.kind == "classes"
                          else types.FLOAT)
        lam = fn.cast(rows[table.LABEL_LAM:table.LABEL_LAM + 1], dtype=types.FLOAT)
        out = ((move(labels), move(partner), move(lam)),)
    else:
        out = (move(targets_node),)
    if images is None:
        return out
    return out + (images, move(_clean_targets(labels, config, targets)))


def smoothed_one_hot(labels, num_classes: int, smoothing: float):
    """float32 targets (K,) of class ids: 1 - smoothing + smoothing / K on
    the label, smoothing / K off."""
    from nvidia.dali import fn

    off = smoothing / num_classes
    return fn.one_hot(labels, num_classes=num_classes, on_value=1.0 - smoothing + off,
                      off_value=off)


def _clean_targets(labels, config: MixConfig, targets: TargetOptions):
    """The unmixed batch's own targets, as the mixed ones are made: smoothed
    one-hots of class ids, smoothed vectors, values as given (split: the
    labels themselves)."""
    from nvidia.dali import fn, types

    k, s = config.num_classes, config.label_smoothing
    if targets.split:
        return labels
    if targets.kind == "classes":
        return smoothed_one_hot(labels, k, s)
    values = fn.cast(labels, dtype=types.FLOAT)
    smoothing, toward = mixing.target_smoothing(targets.kind, s, k)
    if not smoothing:
        return values
    keep = types.Constant(np.float32(1.0 - smoothing))
    pull = types.Constant(np.float32(smoothing * toward))
    return values * keep + pull


def _param_outputs(rows, masks, config: MixConfig, volume: bool = False) -> tuple:
    """labels, pair, lam, method, box[, mask] nodes, sliced from the table
    (a volume's box: z0, z1, y0, y1, x0, x1)."""
    from nvidia.dali import fn, types

    dtypes = {"labels": types.INT64, "pair": types.INT64, "lam": types.FLOAT,
              "method": types.INT8, "box": types.INT64}
    outputs = [fn.cast(rows[start:start + width], dtype=dtypes[name])
               for name, (start, width) in PARAM_COLUMNS.items()]
    if volume:
        outputs[-1] = fn.cast(fn.cat(rows[table.Z0:table.Z1 + 1], rows[table.Y0:table.X1 + 1]),
                              dtype=types.INT64)
    if config.uses_masks:
        outputs.append(masks)
    return tuple(outputs)


def mix_params(labels, *, num_classes: int, size, source_info=None, targets="classes",
               split_targets: bool = False, label_lam=None, return_clean: bool = False,
               **options):
    """The params alone: ``targets[, clean_targets], table`` for
    :func:`gpumix.torch.apply`.

    ``labels``: integer class ids in [0, num_classes), or with ``targets``
    per-sample vectors (see :func:`mix`). ``size=(H, W)``: the images' size
    (boxes and masks are made for it; ``apply`` checks it). ``options``:
    every :class:`gpumix.MixConfig` option. Outputs, per sample: float32
    targets (soft targets ``(K,)`` of class ids; split: ``(y_a, y_b, lam)``),
    with ``return_clean`` the unmixed samples' own targets (the clean images
    are the ones you hand to ``apply``: normalise them with an identity
    table, :func:`gpumix.torch.identity_table`), and one float64 table row
    ``(N_COLUMNS,)`` (gpumix.kernels.table). All are CPU nodes; errors are
    raised by :func:`raise_pending`.
    """
    if size is None:
        raise ValueError("size=(H, W) is required: the params are made for that size")
    config = MixConfig(num_classes=num_classes, **options)
    kinds = TargetOptions(targets, split_targets, label_lam)
    mixed, rows, _ = _params_stage(config, labels, size=size, source_info=source_info,
                                   targets=kinds)
    clean = (_clean_targets(labels, config, kinds),) if return_clean else ()
    return (*_target_outputs(labels, mixed, rows, config, kinds), *clean, rows)


def mix(images, labels, *, num_classes: int, layout: str = "HWC", size=None,
        source_info=None, return_params: bool = False, device: str = "cpu", dtype=None,
        targets: str = "classes", split_targets: bool = False, label_lam=None,
        return_clean: bool = False, **options):
    """Mix a DALI batch inside ``pipeline_def``; returns ``(images, targets[, clean,
    clean_targets][, params...])``.

    ``images``: HWC (uint8, from decoders/crops) or CHW (float32/float16, from
    crop_mirror_normalize) -- say which with ``layout``; ``dtype`` (a DALI
    type) is uint8 for HWC and float32 for CHW unless given. ``labels``:
    integer class ids in [0, num_classes) (``targets="classes"``), or one
    float vector per sample: ``"dense"`` (K,) probabilities (smoothed
    towards 1 / K), ``"multi_label"`` (K,) 0/1 targets (towards 0.5, timm's
    ``multi_label``), ``"regression"`` values (D,) (never smoothed), each
    mixed with its sample's lam as gpumix.mix_targets does.
    ``split_targets``: ``(y_a, y_b, lam)`` in place of the targets (the
    labels, their partners', each sample's label weight, float32 (1,)).
    ``label_lam``: the label weight of the mixed samples, a number or a
    function of the pixels' lam (NumPy arrays in and out, values in [0, 1]).
    ``return_clean`` (RegMixup): the unmixed
    images (the input node) and their own targets follow the targets.
    ``size=(H, W)`` is required with ``device="gpu"`` (the CPU stage cannot
    read the GPU images' shapes) and for FMix. ``options``: every
    :class:`gpumix.MixConfig` option. With ``return_params`` the per-sample
    labels, pair (int64), lam (float32), method (int8), box (int64 x 4, as
    applied) and, with a mask method, mask (float32 H x W) follow.
    ``device``: "cpu" or "gpu" (images already on the GPU stage).

    Video: ``layout="FHWC"`` (DALI's video readers) mixes clips with one
    box or mask for every frame of a clip; ``size=(H, W)`` (a frame's) is
    required, and ResizeMix and SaliencyMix, which read whole images, are
    refused. The clip's frames are seen as one image of F * H rows.
    Volumes: ``layout="DHWC"`` or ``"CDHW"`` with ``size=(D, H, W)``: MixUp,
    CutMix cuboids and 3-D FMix masks (docs/semantics.md), the masks made on
    the CPU stage (for ``device="gpu"`` too); the returned box is (z0, z1,
    y0, y1, x0, x1) and the mask D * H x W.
    FHWC clips with ``size=(T, H, W)`` are mixed so, across time.
    Spectrograms ``layout="FT"`` (F x T, as ``fn.spectrogram`` makes them)
    and signals ``"T"`` (L samples) are one-channel images, F x T and 1 x L
    (float32 unless ``dtype``): ``cutmix_axes="width"`` cuts time bands or
    segments, and FMix masks on a signal are the paper's 1-D masks.
    """
    check_choice("layout", layout, ("HWC", "CHW", "FHWC", "DHWC", "CDHW", "FT", "T"))
    check_choice("device", device, ("cpu", "gpu"))
    config = MixConfig(num_classes=num_classes, **options)
    kinds = TargetOptions(targets, split_targets, label_lam)
    common = dict(size=size, source_info=source_info, return_params=return_params,
                  device=device, dtype=dtype, return_clean=return_clean)
    if layout in ("FHWC", "DHWC", "CDHW", "FT", "T"):
        return _mix_reshaped(images, labels, config, kinds, layout=layout, **common)
    return _mix_frames(images, labels, config, kinds, layout=layout, **common)


def _mix_reshaped(images, labels, config: MixConfig, kinds: TargetOptions, *, layout, size,
                  return_clean: bool, device, dtype, **common):
    """:func:`mix` of the layouts seen as images: each sample reshaped to an
    HWC (CDHW: CHW) image, mixed, and reshaped back. FHWC clips and DHWC /
    CDHW volumes become images of F * H (D * H) rows: a clip's rows repeat
    every H (one box or mask for every frame), a volume's masks have D * H
    rows and its cuboids are applied through them. A spectrogram (F, T) is
    a one-channel F x T image, a signal (L,) a one-channel 1 x L image."""
    from nvidia.dali import fn, types

    volume = layout in ("DHWC", "CDHW") or (layout == "FHWC" and size is not None
                                            and len(size) == 3)  # clips: across time
    if volume:
        if size is None or len(size) != 3:
            raise ValueError(f"size=(D, H, W) is required for volumes (layout={layout!r})")
        check_rank(config, size)
    elif layout == "FHWC":
        if size is None:
            raise ValueError("size=(H, W) of a frame is required for video clips "
                             "(layout='FHWC')")
        whole = [name for name in ("resizemix", "saliencymix") if config.on(name)]
        if whole:
            raise ValueError(f"{', '.join(whole)} read whole images: video clips "
                             f"(layout='FHWC') take the other methods")
    elif size is not None and len(size) != len(layout):
        raise ValueError(f"size must be {'(F, T)' if layout == 'FT' else '(L,)'} for "
                         f"layout={layout!r}, got {tuple(size)}")
    shape = images.shape(dtype=types.INT32)
    if layout == "CDHW":  # (C, D * H, W)
        flat = fn.cat(shape[0:1], shape[1:2] * shape[2:3], shape[3:4])
    elif layout == "FT":  # (F, T, 1)
        flat = fn.cat(shape[0:2], shape[0:1] * 0 + 1)
    elif layout == "T":  # (1, L, 1)
        one = shape[0:1] * 0 + 1
        flat = fn.cat(one, shape[0:1], one)
    else:  # FHWC, DHWC: (F * H, W, C)
        flat = fn.cat(shape[0:1] * shape[1:2], shape[2:4])
    if layout in ("FT", "T"):  # spectrograms and signals: float unless told
        dtype = types.FLOAT if dtype is None else dtype
        size = None if size is None else (1, *size) if layout == "T" else size
    plane_layout = "CHW" if layout == "CDHW" else "HWC"
    planes = fn.reshape(images, shape=flat, layout=plane_layout)
    mixed, *rest = _mix_frames(planes, labels, config, kinds, layout=plane_layout, size=size,
                               return_clean=return_clean, clips=layout == "FHWC" and not volume,
                               device=device, dtype=dtype, **common)
    if return_clean:  # the clean batch: the input node, in its layout
        rest[1] = images
    return (fn.reshape(mixed, shape=shape, layout=layout), *rest)


def _mix_frames(images, labels, config: MixConfig, kinds: TargetOptions, *, layout, size,
                source_info, return_params, device, dtype, return_clean, clips=False):
    """:func:`mix` of HWC or CHW images (``clips``: HWC images that stack a
    clip's frames of ``size``)."""
    from nvidia.dali import fn, types

    dtype = (types.UINT8 if layout == "HWC" else types.FLOAT) if dtype is None else dtype
    if dtype not in (types.UINT8, types.FLOAT16, types.FLOAT):
        raise TypeError(f"dtype must be DALI's UINT8, FLOAT16 or FLOAT, got {dtype!r}")
    if device == "gpu":
        if size is None:
            raise ValueError("size=(H, W) is required with device='gpu': the params are made "
                             "on the CPU stage, which cannot read the GPU images' shapes")
        mixed_targets, rows, host_masks = _params_stage(
            config, labels, layout=layout, size=size, source_info=source_info, targets=kinds,
            return_params=return_params)
        step = _GpuMixStep(layout, _spatial(size), config.uses_masks or host_masks is not None,
                           config.on("saliencymix"), return_params, clips)
        extra = step.with_masks_output + step.with_rows_output
        inputs = [images, rows.gpu()] + ([host_masks.gpu()] if host_masks is not None else [])
        outputs = fn.python_function(*inputs, function=step, batch_processing=True,
                                     num_outputs=1 + extra, device="gpu",
                                     output_layouts=[layout] + [""] * extra)
        mixed, *rest = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        params = ()
        if return_params:  # every output on the GPU, like the images; boxes as applied
            applied = rest[-1]
            params = _param_outputs(applied, rest[0] if step.with_masks_output else None, config,
                                    volume=len(size) == 3)
        return (mixed, *_target_outputs(labels, mixed_targets, rows, config, kinds,
                                        images if return_clean else None, device), *params)
    half = dtype == types.FLOAT16  # Numba has no CPU float16: its bits, as uint16
    source = fn.reinterpret(images, dtype=types.UINT16) if half else images
    mixed_targets, rows, masks = _params_stage(config, labels, images=source,
                                               images_type=types.UINT16 if half else dtype,
                                               layout=layout, size=size,
                                               source_info=source_info,
                                               return_params=return_params, targets=kinds,
                                               clips=clips)
    applier = dali_cpu.applier("mix", layout=layout, dtype=dtype, with_masks=masks is not None)
    mixed = applier(source, rows, *([masks] if masks is not None else []))
    if half:
        mixed = fn.reinterpret(mixed, dtype=types.FLOAT16)
    params = _param_outputs(rows, masks, config, volume=len(size or ()) == 3) \
        if return_params else ()
    return (fn.reshape(mixed, layout=layout),
            *_target_outputs(labels, mixed_targets, rows, config, kinds,
                             images if return_clean else None), *params)


def _normalize_options(mean, std, output_layout, dtype, device):
    """(fused, mean, std): the options checked, mean and std as lists of
    floats, and whether the fused CPU applier serves them."""
    from nvidia.dali import types

    check_choice("output_layout", output_layout, ("CHW", "HWC"))
    check_choice("device", device, ("cpu", "gpu"))
    if dtype not in (types.FLOAT, types.FLOAT16):
        raise TypeError(f"dtype must be DALI's FLOAT or FLOAT16, got {dtype!r}")
    mean, std = np.atleast_1d(np.asarray(mean, float)), np.atleast_1d(np.asarray(std, float))
    if mean.ndim != 1 or mean.shape != std.shape:
        raise ValueError(f"mean and std must be equal-length lists (one value per channel, "
                         f"or one for all), got {mean.tolist()} and {std.tolist()}")
    if not np.all(np.isfinite(mean)) or not np.all(std > 0):
        raise ValueError(f"mean must be finite and std positive, got mean={mean.tolist()}, "
                         f"std={std.tolist()}")
    return device == "cpu" and dtype == types.FLOAT, mean.tolist(), std.tolist()


def normalize(images, *, mean, std, output_layout: str = "CHW", dtype=None,
              device: str = "cpu"):
    """``(images - mean) / std`` per channel, HWC uint8 in, ``output_layout``
    out: ``crop_mirror_normalize`` with no crop and no mirror (mirror in
    ``fn.resize`` instead, with a reversed ROI: free there, see
    :func:`gpumix.pipelines.train_graph`). On the CPU with float32 output it
    is the applier of :func:`mix_normalize` with mixing off, which took 1.4
    against 5.6 ms per batch of 64 at 224 px for ``crop_mirror_normalize``
    here; otherwise DALI's own operator (``device="gpu"``: on the GPU, CPU
    images moved there first). One mean and std, or one per channel: the
    fused applier writes NaN for any other count (DALI's operator raises).
    """
    from nvidia.dali import fn, types

    dtype = types.FLOAT if dtype is None else dtype
    fused, mean, std = _normalize_options(mean, std, output_layout, dtype, device)
    if not fused:
        return fn.crop_mirror_normalize(images.gpu() if device == "gpu" else images,
                                        dtype=dtype, output_layout=output_layout,
                                        mean=mean, std=std)
    applier = dali_cpu.applier("normalize", layout=output_layout, mean=mean, std=std)
    return fn.reshape(applier(images), layout=output_layout)


def mix_normalize(images, labels, *, num_classes: int, mean, std, output_layout: str = "CHW",
                  dtype=None, size=None, source_info=None, return_params: bool = False,
                  device: str = "cpu", targets: str = "classes", split_targets: bool = False,
                  label_lam=None, return_clean: bool = False, **options):
    """:func:`mix` then :func:`normalize`: HWC uint8 images in, ``(images,
    targets[, clean, clean_targets][, params...])`` out with the images
    mixed, then ``(x - mean) / std`` per channel, float in ``output_layout``
    (the clean images normalised alike). On the CPU with float32 output the
    two are one per-sample ``numba_function``, with no mixed copy of the
    batch in between; otherwise :func:`mix`, then ``crop_mirror_normalize``.
    Arguments as in :func:`mix`."""
    from nvidia.dali import fn, types

    dtype = types.FLOAT if dtype is None else dtype
    fused, mean, std = _normalize_options(mean, std, output_layout, dtype, device)
    target_options = dict(targets=targets, split_targets=split_targets, label_lam=label_lam)
    if not fused:
        mixed, *rest = mix(images, labels, num_classes=num_classes, layout="HWC", size=size,
                           source_info=source_info, return_params=return_params,
                           device=device, return_clean=return_clean, **target_options,
                           **options)
        if return_clean:  # rest: targets, clean, clean targets, params...
            rest[1] = fn.crop_mirror_normalize(rest[1], dtype=dtype, output_layout=output_layout,
                                               mean=mean, std=std)
        return (fn.crop_mirror_normalize(mixed, dtype=dtype, output_layout=output_layout,
                                         mean=mean, std=std), *rest)
    config = MixConfig(num_classes=num_classes, **options)
    kinds = TargetOptions(targets, split_targets, label_lam)
    mixed_targets, rows, masks = _params_stage(config, labels, images=images,
                                               images_type=types.UINT8, layout="HWC", size=size,
                                               source_info=source_info,
                                               return_params=return_params, targets=kinds)
    applier = dali_cpu.applier("mix_normalize", layout=output_layout, mean=mean, std=std,
                               with_masks=masks is not None)
    mixed = applier(images, rows, *([masks] if masks is not None else []))
    clean = normalize(images, mean=mean, std=std, output_layout=output_layout) \
        if return_clean else None
    params = _param_outputs(rows, masks, config) if return_params else ()
    return (fn.reshape(mixed, layout=output_layout),
            *_target_outputs(labels, mixed_targets, rows, config, kinds, clean), *params)
