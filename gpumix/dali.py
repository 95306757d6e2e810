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

Mechanism (one small class, :class:`_MixStep`, so it can be swapped):

* CPU pipelines (``device_id=None``): one ``python_function`` with
  ``batch_processing=True`` per batch. It stacks the batch, derives params and
  runs the Numba CPU kernels (parallel over samples, ``nogil``), and NumPy's
  FFT for FMix masks. Per sample, DALI's CPU ``numba_function`` would avoid
  the Python call, but mixing needs the whole batch (partners) and FMix needs
  an FFT, which no ``numba_function`` can call. The step takes the images and
  one float64 vector per sample (its draws and label, see :func:`_draw_vectors`:
  python_function converts every input sample by sample): about 1 ms per
  batch of 64 at 224 px alone, 1.9 ms inside a busy pipeline, half of it
  kernels. python_function copies every output into DALI's buffers before
  it returns, so the step writes the mixed batch and the FMix masks (and
  their spectra and grey images) into buffers it keeps between calls
  (``kernels._launch.scratch``; 48 MB at batch 64, 224 px, with FMix):
  fresh ones cost 1600 page faults per FMix batch here, and 27 ms instead
  of 16. Tried and measured: splitting the step into a params-only
  ``python_function``, ``permute_batch`` for the partners and a per-sample
  ``numba_function`` writing straight into DALI's output (no image copy,
  no GIL). It removed the 3 ms per batch that DALI spends copying the
  step's output, but the extra operators and per-sample tasks cost as much:
  in an A/B of two rounds of ``gpumix bench``, e-mixcut / c was 0.89 and
  0.86 against 0.95 and 0.98 for this design, so it was not kept.
* GPU pipelines: the same step with ``device="gpu"``: DALI hands CuPy arrays,
  the CUDA kernels run on CuPy's current stream (the one DALI sets for the
  operator), FMix masks come from cupy.fft + the CUDA selection kernel; no
  image data goes to the host. The draws are small and go to the GPU stage
  with ``.gpu()``. DALI's GPU ``numba_function`` launches one kernel per
  sample and needs uniform shapes, and cannot call an FFT, so it was not
  chosen; this choice awaits a GPU measurement (README, "GPU").

Partial batches. DALI runs every iteration at full batch size; the reader
pads the epoch's last batch (``pad_last_batch=True``) by repeating its last
sample, and the iterator trims it. Pass ``source_info`` (``fn.get_property(
encoded, key="source_info")``) and :func:`mix` treats the trailing repeats as
padding: they pair with themselves, and the real samples pair only among
themselves (the permutation restricted to them, :func:`restrict_pairing`).
"""

from __future__ import annotations

import numpy as np

from gpumix import fmix, mixing
from gpumix.config import MixConfig
from gpumix.params import Draws, pairing, params_from_draws
from kernels._launch import scratch

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


def count_valid(source_info) -> int:
    """Number of real samples: the batch less the trailing repeats of its last one."""
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
    two 31-bit halves of the spectrum key, with pairing "permutation" the
    partner index. A method that is off has no column (its lam is 1)."""
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


class _MixStep:
    """The per-batch function DALI calls: draws in, mixed batch out."""

    def __init__(self, config: MixConfig, layout: str, return_params: bool, device: str):
        self.config = config
        self.layout = "NHWC" if layout == "HWC" else "NCHW"
        self.return_params = return_params
        self.device = device
        self.columns = draw_columns(config)
        self.buffers = {}  # kept between calls: DALI runs one iteration at a time

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

    def _mask_maker(self, shape, stream):
        if not self.config.enabled[2]:
            return None
        options = (shape, self.config.decay_power, self.config.reference_compatible)
        if self.device == "gpu":
            return fmix.cuda_mask_maker(*options, stream)
        make = fmix.cpu_mask_maker(*options, buffers=self.buffers)
        return lambda keys, lo, hi: make(keys, lo, hi, out=scratch(
            "masks", (np.size(keys), *shape), np.float32, self.buffers))

    def __call__(self, images, draw_vectors, source_info=None):
        b = len(images)
        n_valid = b if source_info is None else count_valid(source_info)
        table = np.stack([_host(v) for v in draw_vectors])
        if self.config.pairing == "permutation":
            pair = restrict_pairing(table[:, self.columns["permutation"]][:, 0].astype(np.int64),
                                    n_valid)
        else:
            pair = np.arange(b, dtype=np.int64)
            pair[:n_valid] = pairing(self.config, n_valid)
        gpu = self.device == "gpu"
        xp = _cupy() if gpu else np
        stream = _numba_stream() if gpu else None
        batch = _stack(images, xp)
        h, w = batch.shape[1:3] if self.layout == "NHWC" else batch.shape[2:4]
        draws = self.draws(table)
        params = params_from_draws(self.config, (h, w), draws, b, pair=pair,
                                   fmix_masks=self._mask_maker((h, w), stream))
        label_ids = table[:, self.columns["label"]][:, 0].astype(np.int64)
        mixing.check_labels(label_ids, b, self.config.num_classes)
        # DALI copies every output before the next call: on the CPU the mixed
        # batch (and the masks) go to reused buffers, not fresh megabytes.
        out = None if gpu else scratch("mixed", batch.shape, batch.dtype, self.buffers)
        mixed = mixing.mix_images(batch, params, self.layout, stream=stream, out=out)
        targets = mixing.soft_targets(label_ids, params, self.config.num_classes,
                                      self.config.label_smoothing)
        if gpu:
            targets = xp.asarray(targets)
        outputs = [list(mixed), list(targets)]
        if self.return_params:
            outputs += [list(label_ids.reshape(b, 1)), list(params.pair.reshape(b, 1)),
                        list(params.lam.reshape(b, 1)), list(params.method.reshape(b, 1)),
                        list(params.box)]
            if self.config.enabled[2]:
                mask = params.mask if params.mask is not None else xp.zeros((b, h, w),
                                                                            xp.float32)
                outputs.append(list(mask))
        return tuple(outputs)


def _cupy():
    import cupy

    return cupy


def _numba_stream():
    from numba import cuda

    return cuda.external_stream(_cupy().cuda.get_current_stream().ptr)


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


def mix(images, labels, *, num_classes: int, layout: str = "HWC", size=None,
        source_info=None, return_params: bool = False, device: str = "cpu", **options):
    """Mix a DALI batch inside ``pipeline_def``; returns ``(images, targets[, params...])``.

    ``images``: HWC (uint8, from decoders/crops) or CHW (float32/float16, from
    crop_mirror_normalize) -- say which with ``layout``. ``labels``: integer
    class ids in [0, num_classes). ``size=(H, W)`` is needed for FMix.
    ``options``: every :class:`gpumix.MixConfig` option (mixup_alpha,
    cutmix_alpha, fmix_alpha, prob, mode, ...). With ``return_params`` the
    per-sample pair (int64), lam (float32), method (int8) and box (int64 x 4)
    follow. ``device``: "cpu" or "gpu" (images already on the GPU stage).
    """
    from nvidia.dali import fn

    if layout not in ("HWC", "CHW"):
        raise ValueError(f"layout must be 'HWC' or 'CHW', got {layout!r}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    from nvidia.dali.pipeline import Pipeline

    config = MixConfig(num_classes=num_classes, **options)
    batch_size = Pipeline.current().max_batch_size
    inputs = [_draw_vectors(config, size, batch_size, labels)]
    if source_info is not None:
        inputs.append(source_info)
    if device == "gpu":
        inputs = [n.gpu() for n in inputs]
    step = _MixStep(config, layout, return_params, device)
    n_out = 2 + (len(param_names(config)) if return_params else 0)
    outputs = fn.python_function(images, *inputs, function=step, batch_processing=True,
                                 num_outputs=n_out, device=device,
                                 output_layouts=[layout] + [""] * (n_out - 1))
    return tuple(outputs)
