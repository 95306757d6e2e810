"""gpumix inside NVIDIA DALI pipelines: ``images, targets = gpumix.dali.mix(...)``.

Call :func:`mix` inside your own ``@pipeline_def`` on the decoded/cropped
batch (HWC uint8, or CHW float after ``crop_mirror_normalize``) and the
labels; it returns the mixed images (same layout and dtype) and float32 soft
targets ``(K,)`` per sample, optionally the params too.

Randomness. Every random number comes from DALI's own random operators
(``random.uniform``, ``random.beta``, ``random.choice`` for FMix spectrum
keys, ``batch_permutation``), seeded by the pipeline, so DALI's checkpointing
restores the stream bit for bit and each pipeline seed is its own stream.
They are the fields of :class:`gpumix.params.Draws` (FMix spectra as one
key per sample, expanded by the counter-based normals kernel,
kernels/normals.py: DALI's own ``random.normal`` tripled the cost of a batch
of 224 x 224 spectra, and its values would have to cross to the GPU); all
after them is ``gpumix.params.params_from_draws``, the same pure code the NumPy
path runs. In mode "batch" the first sample's draws serve the whole batch.

Mechanism (two small classes here and the appliers of gpumix/dali_cpu.py,
so it can be swapped):

* Every pipeline makes its params on the CPU stage: a ``python_function``
  (:class:`_ParamsStep`, ``batch_processing=True``) turns the draws into
  params and makes the soft targets, one apply vector per sample (partner,
  lam, method, box) and the FMix masks (numbers in, numbers out: NumPy, the
  Numba kernels and ducc0's FFT). The step takes one float64 vector per
  sample (its draws and label, :func:`_draw_vectors`: python_function
  converts every input sample by sample) and, on CPU pipelines, the images
  themselves, for their shape and buffer addresses (no pixel is read). It
  keeps its masks, spectra and grey images in buffers it reuses
  (``gpumix.kernels._launch.scratch``): fresh ones cost 1600 page faults per FMix
  batch here, and 27 ms instead of 16. With ``mix_normalize(...,
  fast_params=True)`` (what the loader runs) the same step is called from a
  batch-mode ``numba_function`` through Numba's objmode instead
  (gpumix/dali_cpu.py), without the python_function's per-sample
  conversions; its errors then surface through ``dali_cpu.raise_pending``.
* CPU pipelines (``device_id=None``), uint8 or float32 images: DALI's CPU
  ``numba_function`` in per-sample mode (gpumix/dali_cpu.py) mixes each
  sample straight into DALI's output buffer with the CPU kernels'
  per-sample bodies, on DALI's thread pool: no Python, no GIL, no copy of
  the batch, and no thread left idle (DALI runs CPU operators one at a
  time). A sample reads its partner through the address the params step
  put in its apply vector. History: mixing inside the python_function cost
  5.9 ms of CPU per batch of 64 at 224 px against 4.8 for a batch-mode
  ``numba_function`` (which copies nothing: python_function copies every
  output it returns); a per-sample ``numba_function`` fed the partners by
  ``permute_batch`` (a copy of the batch) ran at 0.89 and 0.86 of the
  no-mixing pipeline against 0.95 and 0.98.
* :func:`mix_normalize` on the CPU (what the loader runs): the applier also
  normalises, HWC uint8 in, float32 CHW (or HWC) out, each mixed value
  normalised as it is made, so neither the mixed copy of the batch nor
  ``crop_mirror_normalize``'s pass over it is left. Per batch of 64 at 224
  px on one thread here: normalising alone 1.2-1.5 ms against 5.6-7 ms for
  ``crop_mirror_normalize``; mixing and normalising 2.0-2.5 ms (MixUp,
  CutMix), 2.9 ms (FMix). What mixing adds to the loader is then mostly
  the params step (its ``python_function``, about 1 ms of CPU per batch,
  and the random operators).
* GPU pipelines: the apply vectors go to the GPU stage with ``.gpu()`` and
  :class:`_ApplyStep`, a GPU ``python_function``, launches the CUDA kernels
  on CuPy's current stream (the one DALI sets for the operator); no image
  data goes to the host. ``size=(H, W)`` is required, since the CPU stage
  cannot read the GPU images' shapes. With FMix on, the whole step runs on
  the GPU stage instead (:class:`_GpuMixStep`), for its masks come from
  cuFFT and the CUDA selection kernel there. DALI's GPU ``numba_function``
  launches one kernel per sample, needs uniform shapes and cannot call an
  FFT, so it was not chosen. Measured on an H100 (benchmarks/GPU.md, 4
  threads, batch 64 at 224 px): with the whole step on the GPU stage,
  MixUp/CutMix ran at 0.44 of the no-mixing pipeline's throughput (about
  3 ms of host work per batch, kernels well under 1 ms); with the params on
  the CPU stage, where they overlap the GPU's work, at 0.49-0.59, and at
  0.66-0.70 with those params made by the objmode ``numba_function``
  (``fast_params``, what the loader runs: the CPU stage's
  ``python_function`` held the GIL the GPU stage's needs). FMix's masks
  made on the CPU stage held it to 0.10 of it against 0.37-0.52 on the GPU
  stage. Next: FMix keys in the apply vectors and the masks made in
  _ApplyStep.
* float16 CPU images (Numba has no CPU float16): :class:`_ApplyStep` as a
  CPU ``python_function``.

Partial batches. DALI runs every iteration at full batch size; the reader
pads the epoch's last batch (``pad_last_batch=True``) by repeating its last
sample, and the iterator trims it. Pass ``source_info`` (``fn.get_property(
encoded, key="source_info")``) and :func:`mix` treats the trailing repeats as
padding: they pair with themselves, and the real samples pair only among
themselves (the permutation restricted to them, :func:`restrict_pairing`).
"""

from __future__ import annotations

import numpy as np

from gpumix import dali_cpu, fmix, mixing
from gpumix.config import MixConfig
from gpumix.params import Draws, MixParams, pairing, params_from_draws
from gpumix.kernels._launch import scratch

PARAM_NAMES = ("labels", "pair", "lam", "method", "box")  # + "mask" when FMix is on


def param_names(config: MixConfig) -> tuple[str, ...]:
    """Names of the params outputs of :func:`mix` with ``return_params=True``."""
    return PARAM_NAMES + (("mask",) if config.enabled[2] else ())


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


def _host(value) -> np.ndarray:
    """A NumPy copy of a per-sample DALI value (NumPy already, or CuPy on the GPU stage)."""
    return value.get() if hasattr(value, "get") and not isinstance(value, np.ndarray) \
        else np.asarray(value)


def _table(vectors, xp=np) -> np.ndarray:
    """The per-sample float64 vectors of a batch as one host array (B, n):
    one copy from the device, not one per sample."""
    return _host(_stack(vectors, xp))


def count_valid(source_info, batch_size: int) -> int:
    """Number of real samples: the batch less the trailing repeats of its
    last one (all ``batch_size`` of them without ``source_info``).
    gpumix.dali_cpu.count_valid_cpu is its compiled twin."""
    if source_info is None:
        return batch_size
    def name(i):
        return bytes(_host(source_info[i]).astype(np.uint8))

    n = len(source_info)
    last = name(n - 1) if n else b""
    while n > 1 and name(n - 2) == last:  # usually one comparison: no padding
        n -= 1
    return n


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


def draw_columns(config: MixConfig) -> dict[str, slice]:
    """Where each draw sits in the per-sample float64 vector of
    :func:`_draw_vectors`: five uniforms in [0, 1) (apply, method, box y and
    x, round up), the lam of each enabled method, the label, with FMix the
    two 31-bit halves of the spectrum key, and with pairing "permutation"
    the partner index. A method that is off has no column (its lam is 1)."""
    mixup_on, cutmix_on, fmix_on = config.enabled
    widths = [("apply", 1), ("method", 1), ("box", 2), ("round_up", 1)]
    widths += [(name, 1) for name, on in (("lam_mixup", mixup_on), ("lam_cutmix", cutmix_on),
                                          ("lam_fmix", fmix_on)) if on]
    widths += [("label", 1)] + ([("key_halves", 2)] if fmix_on else [])
    widths += [("permutation", 1)] if config.pairing == "permutation" else []
    columns, start = {}, 0
    for name, width in widths:
        columns[name] = slice(start, start + width)
        start += width
    return columns


class _ParamsStep:
    """Draws in, params out: the CPU stage's ``python_function``. Outputs the
    soft targets, one apply vector per sample (:data:`APPLY_COLUMNS`, then on
    CPU pipelines the partner's and the sample's own pixel addresses,
    :data:`gpumix.dali_cpu.ADDRESS_COLUMNS`), the FMix masks when FMix is
    on, then the params when asked. ``reads_images``: the CPU pipelines'
    step is also given the images (their shape and buffers: no pixel is
    read); a GPU pipeline's step is not, and takes ``spatial_shape``."""

    def __init__(self, config: MixConfig, layout: str, return_params: bool,
                 reads_images: bool = True, spatial_shape=None):
        self.config = config
        self.layout = "NHWC" if layout == "HWC" else "NCHW"
        self.return_params = return_params
        self.columns = draw_columns(config)
        self.reads_images = reads_images
        self.spatial_shape = spatial_shape  # (H, W) given with size=, checked if images come
        self.buffers = {}  # kept between calls: DALI runs one iteration at a time
        self.errors: list = []  # met as a fast params operator: dali_cpu.raise_pending

    def draws(self, table: np.ndarray) -> Draws:
        """Draws from the per-sample draw vectors (rows of ``table``)."""
        units = table if self.config.mode == "elem" else table[:1]
        column = {name: units[:, where] for name, where in self.columns.items()}
        ones = np.ones(units.shape[0])
        keys = None
        if "key_halves" in column:
            halves = column["key_halves"].astype(np.int64)
            keys = (halves[:, 0] << 31) | halves[:, 1]
        return Draws(apply_u=column["apply"][:, 0], method_u=column["method"][:, 0],
                     box_u=column["box"], round_up_u=column["round_up"][:, 0],
                     lam_mixup=column["lam_mixup"][:, 0] if "lam_mixup" in column else ones,
                     lam_cutmix=column["lam_cutmix"][:, 0] if "lam_cutmix" in column else ones,
                     lam_fmix=column["lam_fmix"][:, 0] if "lam_fmix" in column else ones,
                     normal_keys=keys)

    def _mask_maker(self, shape):
        if not self.config.enabled[2]:
            return None
        options = (shape, self.config.decay_power, self.config.reference_compatible)
        make = fmix.cpu_mask_maker(*options, buffers=self.buffers)
        return lambda keys, lo, hi: make(keys, lo, hi, out=scratch(
            "masks", (np.size(keys), *shape), np.float32, self.buffers))

    def _params(self, table, n_valid: int, spatial_shape):
        """(params, label ids) of the batch whose draw vectors are ``table``
        and whose first ``n_valid`` samples are real (the rest padding)."""
        b = table.shape[0]
        if self.config.pairing == "permutation":
            pair = restrict_pairing(table[:, self.columns["permutation"]][:, 0].astype(np.int64),
                                    n_valid)
        else:
            pair = np.arange(b, dtype=np.int64)
            pair[:n_valid] = pairing(self.config, n_valid)
        params = params_from_draws(self.config, spatial_shape, self.draws(table), b, pair=pair,
                                   fmix_masks=self._mask_maker(spatial_shape))
        label_ids = table[:, self.columns["label"]][:, 0].astype(np.int64)
        mixing.check_labels(label_ids, b, self.config.num_classes)
        return params, label_ids

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
        if c not in mixing.VALID_CHANNELS:
            raise ValueError(f"images have {c} channels in layout {self.layout[1:]} (sample "
                             f"shape {shape}); expected 1, 3 or 4 - is the layout right?")
        if self.spatial_shape is not None and (h, w) != tuple(self.spatial_shape):
            raise ValueError(f"images are {h} x {w} but mix() was given size="
                             f"{tuple(self.spatial_shape)}")
        return int(h), int(w)

    def compute(self, table, n_valid: int, shapes=None, dtype=None, addresses=None):
        """(targets, apply vectors, masks or None, params, label ids) of one
        batch: draw vectors ``table``, ``n_valid`` real samples, and on CPU
        pipelines the samples' shapes, dtype and pixel addresses."""
        spatial = self.spatial_shape if shapes is None else self._spatial_shape(shapes, dtype)
        params, label_ids = self._params(table, n_valid, spatial)
        targets = mixing.soft_targets(label_ids, params, self.config.num_classes,
                                      self.config.label_smoothing)
        vectors = apply_vectors(params)
        if addresses is not None:
            vectors = np.concatenate([vectors, _address_columns(addresses, params.pair)], axis=1)
        masks = self._masks(params, table.shape[0], spatial) if self.config.enabled[2] else None
        return targets, vectors, masks, params, label_ids

    def _masks(self, params, b, spatial_shape, xp=np):
        """Every sample's FMix mask (zeros where the batch has none)."""
        if params.mask is not None:
            return params.mask
        if xp is not np:
            return xp.zeros((b, *spatial_shape), xp.float32)
        zeros = scratch("no_masks", (b, *spatial_shape), np.float32, self.buffers)
        zeros.fill(0.0)
        return zeros

    def _param_outputs(self, params, label_ids, xp=np) -> list:
        """Labels, pairs, lams, methods and boxes, one list of samples each
        (CuPy arrays, ``xp=cupy``, for a GPU step)."""
        b = params.batch_size
        columns = (label_ids.reshape(b, 1), params.pair.reshape(b, 1), params.lam.reshape(b, 1),
                   params.method.reshape(b, 1), params.box)
        return [list(xp.asarray(c)) for c in columns]

    def __call__(self, draw_vectors, *inputs):
        images = inputs[0] if self.reads_images else None
        source_info = inputs[-1] if len(inputs) > self.reads_images else None
        table = _table(draw_vectors)
        n_valid = count_valid(source_info, table.shape[0])
        if images is None:
            targets, vectors, masks, params, label_ids = self.compute(table, n_valid)
        else:
            targets, vectors, masks, params, label_ids = self.compute(
                table, n_valid, [tuple(im.shape) for im in images], images[0].dtype,
                np.array([im.ctypes.data for im in images], np.int64))
        outputs = [list(targets), list(vectors)] + ([] if masks is None else [list(masks)])
        if self.return_params:
            outputs += self._param_outputs(params, label_ids)
        return tuple(outputs)

    def fast_outputs(self, table, n_valid, shapes=None, addresses=None):
        """:meth:`compute` for the numba_function params operator
        (gpumix/dali_cpu.py): targets, vectors and masks (empty without FMix).
        ``shapes`` and ``addresses`` None: no images (a GPU pipeline)."""
        if shapes is not None:
            shapes = [tuple(int(n) for n in shape) for shape in shapes]
        targets, vectors, masks, _, _ = self.compute(table, n_valid, shapes, np.uint8, addresses)
        if masks is None:
            masks = np.zeros((0, 0, 0), np.float32)
        return (np.ascontiguousarray(targets, np.float32), np.ascontiguousarray(vectors),
                np.ascontiguousarray(masks, np.float32))


class _GpuMixStep(_ParamsStep):
    """The whole step in one GPU ``python_function`` (draws and images in,
    mixed batch and targets out), for GPU pipelines with FMix on: their
    masks come from cuFFT and the CUDA selection kernel on the GPU stage. On
    an H100, FMix masks made on the CPU stage instead (ducc0, the selection
    kernel) held the pipeline to 2,054 images/s against 9,280 with this step
    (benchmarks/GPU.md)."""

    def __init__(self, config: MixConfig, layout: str, return_params: bool):
        super().__init__(config, layout, return_params, reads_images=False)

    def _mask_maker(self, shape):
        options = (shape, self.config.decay_power, self.config.reference_compatible)
        return fmix.cuda_mask_maker(*options, _kernel_stream())

    def __call__(self, images, draw_vectors, source_info=None):
        cp = _cupy()
        batch = _stack(images, cp)
        h, w = mixing.check_images(batch, self.layout)
        table = _table(draw_vectors, cp)
        n_valid = count_valid(source_info, table.shape[0])
        params, label_ids = self._params(table, n_valid, (h, w))
        mixed = mixing.mix_images(batch, params, self.layout, stream=_kernel_stream())
        targets = cp.asarray(mixing.soft_targets(label_ids, params, self.config.num_classes,
                                                 self.config.label_smoothing))
        outputs = [list(mixed), list(targets)]
        if self.return_params:  # every output of a GPU python_function is on the device
            outputs += self._param_outputs(params, label_ids, cp)
            outputs.append(list(self._masks(params, len(images), (h, w), cp)))
        return tuple(outputs)


class _ApplyStep:
    """Apply vectors (and FMix masks) in, the mixed batch out: the
    ``python_function`` of GPU pipelines, and of CPU float16 images (which
    the ``numba_function`` applier cannot take). The params were made by
    :class:`_ParamsStep` on the CPU stage, so what runs here per batch is a
    stack of the samples, one small device-to-host copy of the vectors and
    the kernel launches."""

    def __init__(self, layout: str, device: str, spatial_shape=None):
        self.layout = "NHWC" if layout == "HWC" else "NCHW"
        self.device = device
        self.spatial_shape = spatial_shape  # (H, W) the params were made for, if fixed
        self.buffers = {}

    def __call__(self, images, vectors, masks=None):
        gpu = self.device == "gpu"
        xp = _cupy() if gpu else np
        batch = _stack(images, xp)
        h, w = mixing.check_images(batch, self.layout)
        if self.spatial_shape is not None and (h, w) != self.spatial_shape:
            raise ValueError(f"images are {h} x {w} but mix() was given size="
                             f"{self.spatial_shape}: the params were made for that size")
        table = _table(vectors, xp)  # (B, 7)
        mask_batch = None if masks is None else _stack(masks, xp)
        params = params_from_apply_vectors(table, mask_batch)
        # DALI copies every output before the next call: on the CPU the mixed
        # batch goes to a reused buffer, not fresh megabytes.
        out = None if gpu else scratch("mixed", batch.shape, batch.dtype, self.buffers)
        mixed = mixing.mix_images(batch, params, self.layout,
                                  stream=_kernel_stream() if gpu else None, out=out)
        return list(mixed)


APPLY_COLUMNS = ("pair", "lam", "method", "y0", "y1", "x0", "x1")


def _address_columns(own, pair) -> np.ndarray:
    """(B, 2) float64: each sample's partner's and own pixel address (``own``,
    int64), for the per-sample CPU appliers (gpumix/dali_cpu.py). Exact in
    float64: x86-64 and AArch64 user addresses are below 2^48."""
    if own.size and own.max() >= 2**53:
        raise RuntimeError("an image buffer's address does not fit a float64 exactly")
    return np.stack([own[pair], own], axis=1).astype(np.float64)


def params_from_apply_vectors(table: np.ndarray, masks=None) -> MixParams:
    """The MixParams that :func:`apply_vectors` wrote (and the masks, NumPy or
    CuPy, when FMix is on)."""
    return MixParams(pair=table[:, 0].astype(np.int64), lam=table[:, 1].astype(np.float32),
                     method=table[:, 2].astype(np.int8), box=table[:, 3:7].astype(np.int64),
                     mask=masks)


def apply_vectors(params) -> np.ndarray:
    """(B, 7) float64, one row per sample in :data:`APPLY_COLUMNS` order:
    what the applier needs besides the masks (exact: int64 values below 2^53
    and float32 lams survive float64)."""
    return np.concatenate([params.pair[:, None], params.lam[:, None], params.method[:, None],
                           params.box], axis=1).astype(np.float64)


def _cupy():
    import cupy

    return cupy


def _kernel_stream():
    """CuPy's current stream (DALI sets it to the operator's stream) for the kernels."""
    from gpumix.kernels._launch import StreamHandle

    return StreamHandle(_cupy().cuda.get_current_stream().ptr)


def _draw_vectors(config: MixConfig, spatial_shape, batch_size: int, labels):
    """DALI random operators for the draws this config uses and the label,
    as one float64 vector per sample in :func:`draw_columns` order (one input
    for python_function, which converts every input sample by sample; each
    DALI operator costs about 60 us of CPU per batch, so the draws are made
    in float64 and shape [n] directly, with no casts or stacks between)."""
    from nvidia.dali import fn, types

    f64 = types.FLOAT64
    mixup_on, cutmix_on, fmix_on = config.enabled
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
    parts.append(fn.reshape(fn.cast(labels, dtype=f64), shape=[1]))
    if fmix_on:
        if spatial_shape is None:
            raise ValueError("size=(H, W) is required when fmix_alpha > 0: FMix spectra are "
                             "drawn with a fixed shape")
        parts.append(fn.cast(fn.random.choice(2**31 - 1, shape=[2]), dtype=f64))
    if config.pairing == "permutation":
        permutation = fn.batch_permutation(no_fixed_points=batch_size != 1)
        parts.append(fn.reshape(fn.cast(permutation, dtype=f64), shape=[1]))
    return fn.cat(*parts)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _spatial(size):
    """``size=`` as an (H, W) tuple of ints, or None."""
    return None if size is None else tuple(int(n) for n in size)


def _params_stage(config: MixConfig, images, labels, *, layout: str, size, source_info,
                  return_params: bool, gpu: bool, fast: bool = False):
    """The CPU stage's :class:`_ParamsStep`: (targets, apply vectors, [masks],
    [params]) nodes, on the CPU stage whatever the images' device; CPU
    pipelines give it the images (``gpu=False``). ``fast`` (no params
    outputs): the objmode ``numba_function`` of gpumix/dali_cpu.py instead
    of a ``python_function``, for HWC uint8 images or none."""
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    step = _ParamsStep(config, layout, return_params, reads_images=not gpu,
                       spatial_shape=_spatial(size))
    batch_size = Pipeline.current().max_batch_size
    inputs = [_draw_vectors(config, size, batch_size, labels)] + ([] if gpu else [images])
    inputs += [] if source_info is None else [source_info]
    fmix_on = config.enabled[2]
    if fast:
        operator = dali_cpu.params_operator(
            step, num_classes=config.num_classes, with_masks=fmix_on,
            with_names=source_info is not None, with_images=not gpu)
        targets, vectors, *masks = operator(*inputs)
        return targets, vectors, masks, []
    targets, vectors, *rest = fn.python_function(
        *inputs, function=step, batch_processing=True,
        num_outputs=2 + fmix_on + (len(PARAM_NAMES) if return_params else 0))
    masks = [rest.pop(0)] if fmix_on else []
    params = rest + masks if return_params else []
    return targets, vectors, masks, params


def mix(images, labels, *, num_classes: int, layout: str = "HWC", size=None,
        source_info=None, return_params: bool = False, device: str = "cpu", dtype=None,
        fast_params: bool = False, **options):
    """Mix a DALI batch inside ``pipeline_def``; returns ``(images, targets[, params...])``.

    ``images``: HWC (uint8, from decoders/crops) or CHW (float32/float16, from
    crop_mirror_normalize) -- say which with ``layout``; ``dtype`` (a DALI
    type) is uint8 for HWC and float32 for CHW unless given. ``labels``:
    integer class ids in [0, num_classes). ``size=(H, W)`` is needed for
    FMix and with ``device="gpu"``. ``options``: every :class:`gpumix.MixConfig` option (mixup_alpha,
    cutmix_alpha, fmix_alpha, prob, mode, ...). With ``return_params`` the
    per-sample labels, pair (int64), lam (float32), method (int8), box
    (int64 x 4) and, with FMix, mask (float32 H x W) follow. ``device``:
    "cpu" or "gpu" (images already on the GPU stage). ``fast_params``: on a
    GPU pipeline without FMix, the params operator of :func:`mix_normalize`
    (same conditions and error reporting).
    """
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    _check_choice("layout", layout, ("HWC", "CHW"))
    _check_choice("device", device, ("cpu", "gpu"))
    dtype = (types.UINT8 if layout == "HWC" else types.FLOAT) if dtype is None else dtype
    if dtype not in (types.UINT8, types.FLOAT16, types.FLOAT):
        raise TypeError(f"dtype must be DALI's UINT8, FLOAT16 or FLOAT, got {dtype!r}")
    config = MixConfig(num_classes=num_classes, **options)
    gpu = device == "gpu"
    extra = [] if source_info is None else [source_info]
    if gpu and config.enabled[2]:  # FMix's masks from cuFFT: the whole step on the GPU stage
        n_outputs = 2 + (len(param_names(config)) if return_params else 0)
        batch_size = Pipeline.current().max_batch_size
        inputs = [n.gpu() for n in [_draw_vectors(config, size, batch_size, labels)] + extra]
        return tuple(fn.python_function(
            images, *inputs, function=_GpuMixStep(config, layout, return_params),
            batch_processing=True, num_outputs=n_outputs, device="gpu",
            output_layouts=[layout] + [""] * (n_outputs - 1)))
    if gpu and size is None:
        raise ValueError("size=(H, W) is required with device='gpu': the params are made on "
                         "the CPU stage, which cannot read the GPU images' shapes")
    targets, vectors, masks, params = _params_stage(
        config, images, labels, layout=layout, size=size, source_info=source_info,
        return_params=return_params, gpu=gpu, fast=gpu and fast_params and not return_params)
    if not gpu and dtype != types.FLOAT16:
        mixed = dali_cpu.applier("mix", layout=layout, dtype=dtype,
                                 with_masks=bool(masks))(images, vectors, *masks)
        return (fn.reshape(mixed, layout=layout), targets, *params)
    apply_inputs = [vectors] + masks
    if gpu:
        apply_inputs = [n.gpu() for n in apply_inputs]
        targets, params = targets.gpu(), [p.gpu() for p in params]
    mixed = fn.python_function(images, *apply_inputs,
                               function=_ApplyStep(layout, device, _spatial(size)),
                               batch_processing=True, num_outputs=1, device=device,
                               output_layouts=[layout])
    return (mixed, targets, *params)


def _normalize_options(mean, std, output_layout, dtype, device):
    """(fused, mean, std): the options checked, mean and std as lists of
    floats, and whether the fused CPU applier serves them."""
    from nvidia.dali import types

    _check_choice("output_layout", output_layout, ("CHW", "HWC"))
    _check_choice("device", device, ("cpu", "gpu"))
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
    here; otherwise DALI's own operator."""
    from nvidia.dali import fn, types

    dtype = types.FLOAT if dtype is None else dtype
    fused, mean, std = _normalize_options(mean, std, output_layout, dtype, device)
    if not fused:
        return fn.crop_mirror_normalize(images, dtype=dtype, output_layout=output_layout,
                                        mean=mean, std=std)
    applier = dali_cpu.applier("normalize", layout=output_layout, mean=mean, std=std)
    return fn.reshape(applier(images), layout=output_layout)


def mix_normalize(images, labels, *, num_classes: int, mean, std, output_layout: str = "CHW",
                  dtype=None, size=None, source_info=None, return_params: bool = False,
                  device: str = "cpu", fast_params: bool = False, **options):
    """:func:`mix` then :func:`normalize`: HWC uint8 images in, ``(images,
    targets[, params...])`` out with the images mixed, then ``(x - mean) /
    std`` per channel, float in ``output_layout``. On the CPU with float32
    output the two are one ``numba_function`` (:func:`mix_normalize_batch_cpu`),
    with no mixed copy of the batch in between; elsewhere they are
    :func:`mix` and ``crop_mirror_normalize``. Arguments as in :func:`mix`.

    ``fast_params`` (CPU, float32 output, no ``return_params``): the params
    step runs as a ``numba_function`` that calls it back through Numba's
    objmode (gpumix/dali_cpu.py), about 1 ms of serial CPU per batch less
    than its ``python_function``; its errors (e.g. labels out of range) are
    then raised by :func:`gpumix.dali_cpu.raise_pending`, which
    :class:`gpumix.torch.DALIMixLoader` calls after every batch, not by the
    pipeline."""
    from nvidia.dali import fn, types

    dtype = types.FLOAT if dtype is None else dtype
    fused, mean, std = _normalize_options(mean, std, output_layout, dtype, device)
    if not fused:
        mixed, *rest = mix(images, labels, num_classes=num_classes, layout="HWC", size=size,
                           source_info=source_info, return_params=return_params,
                           device=device, fast_params=fast_params, **options)
        return (fn.crop_mirror_normalize(mixed, dtype=dtype, output_layout=output_layout,
                                         mean=mean, std=std), *rest)
    config = MixConfig(num_classes=num_classes, **options)
    targets, vectors, masks, params = _params_stage(
        config, images, labels, layout="HWC", size=size, source_info=source_info,
        return_params=return_params, gpu=False, fast=fast_params and not return_params)
    applier = dali_cpu.applier("mix_normalize", layout=output_layout, mean=mean, std=std,
                               with_masks=bool(masks))
    return (fn.reshape(applier(images, vectors, *masks), layout=output_layout), targets,
            *params)
