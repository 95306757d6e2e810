"""The CPU ``numba_function`` appliers of :mod:`gpumix.dali`: one call per
sample, on DALI's thread pool, with no Python and no GIL.

Why per sample. DALI runs a pipeline's CPU operators one at a time
(``OperatorConcurrency``: "CPU operators cannot run in parallel with each
other"; a busy 20 ms ``python_function`` added 21-23 ms per batch here
whether or not it depended on the decoder). A batch-mode ``numba_function``
is one call on one thread, so every other thread idles while it runs; in
per-sample mode DALI hands the samples to its thread pool
(``numba_func.cc``). Measured on 16 cores (the H100 host, batch 64 at
224 px): with 8 DALI threads the loader mixing MixUp/CutMix ran at 0.88 of
its no-mixing throughput against 0.76 with a batch-mode applier, with 14
threads at 0.80 against 0.66 (benchmarks/GPU.md).

Partners. A per-sample call sees only its own sample, and mixing reads a
partner. The params step (:class:`gpumix.dali._ParamsStep`, a
``python_function`` given the same images node) sees every sample's
buffer and appends to each apply vector the address of the partner's
pixels and of the sample's own (:data:`ADDRESS_COLUMNS`). DALI gives a
``python_function`` and a ``numba_function`` the same buffers of a node
(no copies: the tests' exact outputs depend on it) and keeps a batch alive
while an operator reads it; the step checked that every sample has the same
shape and dtype. The applier reads its partner through that address only
when the own address it was given is the buffer it received
(:func:`partner_of`); otherwise it mixes the sample with itself, which
leaves it unmixed, and never follows a stale pointer.

Three appliers, one per public operator:

* :func:`apply_sample_cpu` (``mix``): the CPU kernels' per-sample bodies,
  output in the images' layout and dtype (uint8 or float32).
* :func:`mix_normalize_sample_cpu` (``mix_normalize``, and ``normalize``
  with no vector): HWC uint8 in, float32 CHW or HWC out, the mixed value of
  each element normalised as it is made: no mixed copy of the image and no
  second pass. RGB to CHW (the loader's case) has its own loops, which LLVM
  vectorises; other channel counts and HWC output mix each row into a
  scratch row with the kernels' bodies, then normalise it.

Stored values are the CPU kernels' (kernels/_element.py), so the outputs
equal :func:`gpumix.mixing.reference_mix_images` and, normalised, DALI's
``crop_mirror_normalize`` of it (tests/test_dali.py).
"""

from __future__ import annotations

import itertools
import warnings
import weakref

import numpy as np
from numba import carray, njit, objmode, types
from numba.core.errors import NumbaWarning
from numba.extending import intrinsic

from gpumix.config import FMIX, MIXUP
from gpumix.kernels import blend, box_paste, mask_mix
from gpumix.kernels._element import element_functions

ADDRESS_COLUMNS = ("partner_address", "own_address")  # after gpumix.dali.APPLY_COLUMNS
PARTNER_ADDRESS, OWN_ADDRESS = 7, 8

_element = element_functions("cpu")
_blend_uint8 = _element.blend_uint8
_mixed_value = _element.mixed_value


@intrinsic
def _pointer_to(typingctx, address, like):
    """A pointer to ``like``'s dtype at the int64 ``address``."""
    array = like.type if isinstance(like, types.Optional) else like  # DALI's may be Optional
    pointer = types.CPointer(array.dtype)
    signature = pointer(types.int64, like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return signature, codegen


@njit(cache=True, nogil=True)
def partner_of(image, vector):
    """The partner's pixels (shaped like ``image``) at the address the params
    step wrote in ``vector``; ``image`` itself when the own address there is
    not this buffer's (then nothing is mixed and no stale pointer is read)."""
    if np.int64(vector[OWN_ADDRESS]) != image.ctypes.data:
        return image
    return carray(_pointer_to(np.int64(vector[PARTNER_ADDRESS]), image), image.shape)


@njit(cache=True, nogil=True)
def apply_sample_cpu(out, image, partner, vector, mask, chw, quantize):
    """Mix one HWC or CHW sample with its partner by its apply vector, with
    the CPU kernels' per-sample bodies (``mask`` None when FMix is off)."""
    method = np.int64(vector[2])
    if chw:
        height, cstride = image.shape[1], 1
        shape2d = (image.shape[0] * image.shape[1], image.shape[2])
    else:
        height, cstride = image.shape[0], image.shape[2]
        shape2d = (image.shape[0], image.shape[1] * image.shape[2])
    a, b, o = image.reshape(shape2d), partner.reshape(shape2d), out.reshape(shape2d)
    if method == MIXUP:
        blend.blend_sample_cpu(a, b, np.float32(vector[1]), quantize, o)
    elif method == FMIX:
        if mask is not None:  # always, for FMix is on whenever a sample uses it
            mask_row = np.empty(a.shape[1], np.float32)
            mask_mix.mask_sample_cpu(a, b, mask, height, cstride, quantize, False, o, mask_row)
    else:  # CutMix, or no mixing (an empty box): a copy and the box
        box_paste.paste_sample_cpu(a, b, np.int64(vector[3]), np.int64(vector[4]),
                                   np.int64(vector[5]), np.int64(vector[6]), height, cstride, o)


@njit(cache=True, nogil=True)
def _rgb_copy(src, o0, o1, o2, mean, inv_std):
    """Normalise RGB pixels ``src`` (3 n uint8) into the planes' rows (n each)."""
    m0, m1, m2 = mean[0], mean[1], mean[2]
    s0, s1, s2 = inv_std[0], inv_std[1], inv_std[2]
    for k in range(o0.shape[0]):
        o0[k] = (np.float32(src[3 * k]) - m0) * s0
        o1[k] = (np.float32(src[3 * k + 1]) - m1) * s1
        o2[k] = (np.float32(src[3 * k + 2]) - m2) * s2


@njit(cache=True, nogil=True)
def _rgb_blend(ra, rb, lam, o0, o1, o2, mean, inv_std):
    """MixUp of two RGB rows, stored as uint8 (as kernels/blend.py), normalised."""
    m0, m1, m2 = mean[0], mean[1], mean[2]
    s0, s1, s2 = inv_std[0], inv_std[1], inv_std[2]
    for k in range(o0.shape[0]):
        o0[k] = (_blend_uint8(ra[3 * k], rb[3 * k], lam) - m0) * s0
        o1[k] = (_blend_uint8(ra[3 * k + 1], rb[3 * k + 1], lam) - m1) * s1
        o2[k] = (_blend_uint8(ra[3 * k + 2], rb[3 * k + 2], lam) - m2) * s2


@njit(cache=True, nogil=True)
def _rgb_mask(ra, rb, mask_row, o0, o1, o2, mean, inv_std):
    """FMix of two RGB rows by a mask row, stored as uint8 (as
    kernels/mask_mix.py), normalised."""
    m0, m1, m2 = mean[0], mean[1], mean[2]
    s0, s1, s2 = inv_std[0], inv_std[1], inv_std[2]
    for k in range(o0.shape[0]):
        m = mask_row[k]
        o0[k] = (_mixed_value(ra[3 * k], rb[3 * k], m, True) - m0) * s0
        o1[k] = (_mixed_value(ra[3 * k + 1], rb[3 * k + 1], m, True) - m1) * s1
        o2[k] = (_mixed_value(ra[3 * k + 2], rb[3 * k + 2], m, True) - m2) * s2


@njit(cache=True, nogil=True)
def _normalize_row(row, out, y, mean, inv_std, chw):
    """Normalise one uint8 image row (W * C) into row ``y`` of the CHW or HWC ``out``."""
    channels = out.shape[0] if chw else out.shape[2]
    n_means = mean.shape[0]
    for px in range(row.shape[0] // channels):
        for c in range(channels):
            k = c % n_means
            value = (np.float32(row[px * channels + c]) - mean[k]) * inv_std[k]
            if chw:
                out[c, y, px] = value
            else:
                out[y, px, c] = value


@njit(cache=True, nogil=True)
def mix_normalize_sample_cpu(out, image, partner, vector, mask, mean, inv_std, chw):
    """Mix one HWC uint8 sample with its partner by its apply vector and
    normalise it, ``(value - mean) * inv_std`` per channel in float32 (DALI's
    crop_mirror_normalize arithmetic), into ``out`` (CHW or HWC float32).
    ``vector`` None: normalise only; ``mask`` None when FMix is off."""
    height, width, channels = image.shape[0], image.shape[1], image.shape[2]
    n_cols = width * channels
    a, b = image.reshape(height, n_cols), partner.reshape(height, n_cols)
    method, lam = np.int64(-1), np.float32(1.0)
    y0, y1, x0, x1 = np.int64(0), np.int64(0), np.int64(0), np.int64(0)
    if vector is not None:
        method, lam = np.int64(vector[2]), np.float32(vector[1])
        y0, y1 = np.int64(vector[3]), np.int64(vector[4])
        x0, x1 = np.int64(vector[5]), np.int64(vector[6])
    if chw and channels == 3 and mean.shape[0] == 3:  # RGB to CHW: vectorised loops
        o = out.reshape(3 * height, width)
        for y in range(height):
            o0, o1, o2 = o[y], o[height + y], o[2 * height + y]
            if method == MIXUP:
                _rgb_blend(a[y], b[y], lam, o0, o1, o2, mean, inv_std)
            elif method == FMIX:
                if mask is not None:  # always, for FMix is on whenever a sample uses it
                    _rgb_mask(a[y], b[y], mask[y], o0, o1, o2, mean, inv_std)
            else:
                _rgb_copy(a[y], o0, o1, o2, mean, inv_std)
                if y0 <= y < y1 and x0 < x1:  # CutMix: the box's span from the partner
                    _rgb_copy(b[y][3 * x0:3 * x1], o0[x0:x1], o1[x0:x1], o2[x0:x1], mean,
                              inv_std)
        return
    row = np.empty((1, n_cols), np.uint8)
    mask_row = np.empty(n_cols, np.float32)
    for y in range(height):
        ra, rb = a[y:y + 1], b[y:y + 1]
        if method == MIXUP:
            blend.blend_sample_cpu(ra, rb, lam, True, row)
        elif method == FMIX:
            if mask is not None:
                mask_mix.mask_sample_cpu(ra, rb, mask[y:y + 1], 1, channels, True, False, row,
                                         mask_row)
        else:  # CutMix, or a copy: this row's part of the box
            box_paste.paste_sample_cpu(ra, rb, y0 - y, y1 - y, x0, x1, 1, channels, row)
        _normalize_row(row[0], out, y, mean, inv_std, chw)


def _same_shapes(out_shapes, in_shapes):
    """numba_function setup: outputs shaped like the images."""
    for i in range(len(out_shapes[0])):
        for d in range(len(out_shapes[0][i])):
            out_shapes[0][i][d] = in_shapes[0][i][d]


def _hwc_to_chw_shapes(out_shapes, in_shapes):
    """numba_function setup: CHW outputs of HWC images."""
    for i in range(len(out_shapes[0])):
        out_shapes[0][i][0] = in_shapes[0][i][2]
        out_shapes[0][i][1] = in_shapes[0][i][0]
        out_shapes[0][i][2] = in_shapes[0][i][1]


def _run_function(kind: str, with_masks: bool, chw: bool, quantize: bool, mean, inv_std):
    """The per-sample ``run_fn``: numba_function passes exactly its inputs,
    so each set of them is its own small function (the flags, mean and
    inv_std are compile-time constants there)."""
    if kind == "normalize":
        def run(out, image):
            mix_normalize_sample_cpu(out, image, image, None, None, mean, inv_std, chw)
    elif kind == "mix_normalize" and with_masks:
        def run(out, image, vector, mask):
            mix_normalize_sample_cpu(out, image, partner_of(image, vector), vector, mask, mean,
                                     inv_std, chw)
    elif kind == "mix_normalize":
        def run(out, image, vector):
            mix_normalize_sample_cpu(out, image, partner_of(image, vector), vector, None, mean,
                                     inv_std, chw)
    elif with_masks:
        def run(out, image, vector, mask):
            apply_sample_cpu(out, image, partner_of(image, vector), vector, mask, chw,
                             quantize)
    else:
        def run(out, image, vector):
            apply_sample_cpu(out, image, partner_of(image, vector), vector, None, chw,
                             quantize)
    return run


_APPLIERS: dict = {}


def applier(kind: str, *, layout: str, dtype=None, with_masks: bool = False, mean=None,
            std=None):
    """The ``numba_function`` operator for ``kind``: "mix" (images of
    ``layout`` and ``dtype``, uint8 or float32, out alike), "mix_normalize"
    or "normalize" (HWC uint8 in, float32 ``layout`` out, ``mean``/``std``).
    Built, and compiled (a few seconds), once per process for each set of
    options: an ops-API operator can be called in any pipeline."""
    key = (kind, layout, dtype, with_masks, None if mean is None else tuple(mean),
           None if std is None else tuple(std))
    if key not in _APPLIERS:
        from nvidia.dali import types
        from nvidia.dali.plugin.numba import NumbaFunction

        chw = layout == "CHW"
        mixes = kind != "normalize"
        if kind == "mix":
            mean32 = inv_std32 = np.zeros(1, np.float32)
            in_type, out_type = dtype, dtype
            setup = _same_shapes
        else:
            mean32 = np.asarray(mean, np.float32)
            inv_std32 = (np.float32(1.0) / np.asarray(std, np.float32)).astype(np.float32)
            in_type, out_type = types.UINT8, types.FLOAT
            setup = _hwc_to_chw_shapes if chw else _same_shapes
        inputs = [(in_type, 3)] + [(types.FLOAT64, 1)] * mixes + [(types.FLOAT, 2)] * with_masks
        _APPLIERS[key] = NumbaFunction(
            run_fn=_run_function(kind, with_masks, chw, dtype == types.UINT8, mean32, inv_std32),
            setup_fn=setup, batch_processing=False, device="cpu", out_types=[out_type],
            outs_ndim=[3], in_types=[t for t, _ in inputs], ins_ndim=[d for _, d in inputs])
    return _APPLIERS[key]


# ---------------------------------------------------------------- params step
# The params step as a batch-mode numba_function that calls the Python step
# (gpumix.dali._ParamsStep.fast_outputs) through Numba's objmode: the draws,
# shapes and addresses are gathered in compiled code and the step's arrays
# written straight into DALI's outputs, where a python_function converts
# every input and output sample by sample. Measured here: a batch-mode
# numba_function with an objmode call back cost 0.11 ms of CPU per batch of
# 64 over none, a python_function doing the same 2 ms. The catch: an
# exception inside it is lost (DALI sees a compiled function that returned),
# so the step keeps its errors (``step.errors``), the targets are filled
# with NaN, and raise_pending(pipeline) raises them: DALIMixLoader calls it
# after every batch.

_STEPS = weakref.WeakValueDictionary()  # index -> step; the pipeline holds the step
_NEXT_INDEX = itertools.count()


def raise_pending(pipeline) -> None:
    """Raise the first error the fast params operators of ``pipeline`` met
    since the last call (DALI may have run iterations ahead)."""
    for step in getattr(pipeline, "_gpumix_steps", ()):
        if step.errors:
            error = step.errors[0]
            step.errors.clear()
            raise error


def _step_outputs(index, table, n_valid, shapes, addresses, has_images):
    """The objmode side: the step's (targets, vectors, masks, ok)."""
    step = _STEPS[index]
    try:
        if not has_images:
            shapes = addresses = None
        return (*step.fast_outputs(table, n_valid, shapes, addresses), 1)
    except Exception as error:  # noqa: BLE001 - reported by raise_pending()
        step.errors.append(error)
        return (np.zeros((0, 0), np.float32), np.zeros((0, 0)), np.zeros((0, 0, 0), np.float32),
                0)


@njit(nogil=True)
def _same_bytes(a, b):
    if a.shape[0] != b.shape[0]:
        return False
    for k in range(a.shape[0]):
        if a[k] != b[k]:
            return False
    return True


@njit(nogil=True)
def count_valid_cpu(names):
    """gpumix.dali.count_valid in compiled code: the batch less the trailing
    repeats of its last sample's name."""
    n = len(names)
    while n > 1 and _same_bytes(names[n - 2], names[n - 1]):
        n -= 1
    return n


@njit  # no nogil: the objmode call holds the GIL anyway
def _params_batch(targets_out, vectors_out, masks_out, draws, images, names, index):
    """Gather, call the step back, scatter (see above). ``masks_out`` None
    without FMix, ``images`` None on a GPU pipeline's CPU stage (no shapes or
    addresses: the step has the size), ``names`` (source_info) None without
    padding detection."""
    b = len(draws)
    table = np.empty((b, draws[0].shape[0]), np.float64)
    for i in range(b):
        table[i] = draws[i]
    n_valid = b
    if names is not None:
        n_valid = count_valid_cpu(names)
    shapes = np.zeros((b, 3), np.int64)
    addresses = np.zeros(b, np.int64)
    has_images = images is not None
    if images is not None:
        for i in range(b):
            for d in range(3):
                shapes[i, d] = images[i].shape[d]
            addresses[i] = images[i].ctypes.data
    # One objmode block: two, one per branch, made LLVM IR that Numba rejects.
    with objmode(targets="float32[:, :]", vectors="float64[:, :]", masks="float32[:, :, :]",
                 ok="int64"):
        targets, vectors, masks, ok = _step_outputs(index, table, n_valid, shapes, addresses,
                                                    has_images)
    for i in range(b):
        if ok:
            targets_out[i][:] = targets[i]
            vectors_out[i][:] = vectors[i]
        else:  # NaN targets; pair 0, a copy, no own address: nothing is mixed
            targets_out[i][:] = np.nan
            vectors_out[i][:] = 0.0
        if masks_out is not None:
            if ok:
                masks_out[i][:, :] = masks[i]
            else:
                masks_out[i][:, :] = 0.0


def _params_run(index: int, with_masks: bool, with_images: bool, with_names: bool):
    """The batch ``run_fn`` of a params operator, one per set of inputs
    (masks only with images: their shape is the images')."""
    if with_masks and with_names:
        def run(targets, vectors, masks, draws, images, names):
            _params_batch(targets, vectors, masks, draws, images, names, index)
    elif with_masks:
        def run(targets, vectors, masks, draws, images):
            _params_batch(targets, vectors, masks, draws, images, None, index)
    elif with_images and with_names:
        def run(targets, vectors, draws, images, names):
            _params_batch(targets, vectors, None, draws, images, names, index)
    elif with_images:
        def run(targets, vectors, draws, images):
            _params_batch(targets, vectors, None, draws, images, None, index)
    elif with_names:
        def run(targets, vectors, draws, names):
            _params_batch(targets, vectors, None, draws, None, names, index)
    else:
        def run(targets, vectors, draws):
            _params_batch(targets, vectors, None, draws, None, None, index)
    return run


def _params_setup(num_classes: int, n_vector: int, with_masks: bool):
    """numba_function setup: targets (K,), vectors (n_vector,), masks (H, W)
    of the HWC images (input 1)."""
    def setup(out_shapes, in_shapes):
        for i in range(len(out_shapes[0])):
            out_shapes[0][i][0] = num_classes
            out_shapes[1][i][0] = n_vector
            if with_masks:
                out_shapes[2][i][0] = in_shapes[1][i][0]
                out_shapes[2][i][1] = in_shapes[1][i][1]
    return setup


def params_operator(step, *, num_classes: int, with_masks: bool, with_names: bool,
                    with_images: bool = True):
    """A batch-mode ``numba_function`` running ``step`` (a
    gpumix.dali._ParamsStep) through objmode. Inputs: draw vectors[, HWC
    uint8 images][, source_info]; outputs: targets, apply vectors (with the
    address columns when the images come)[, masks, which need the images].
    Without images (a GPU pipeline's CPU stage) the step must know the
    size. Its errors surface through :func:`raise_pending`."""
    from nvidia.dali import types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.numba import NumbaFunction

    if with_masks and not with_images:
        raise ValueError("a params operator makes FMix masks only when given the images")
    index = next(_NEXT_INDEX)
    _STEPS[index] = step
    # The pipeline keeps the step alive (the compiled function only knows its index).
    Pipeline.current().__dict__.setdefault("_gpumix_steps", []).append(step)
    n_vector = 7 + len(ADDRESS_COLUMNS) * with_images
    inputs = [(types.FLOAT64, 1)] + [(types.UINT8, 3)] * with_images \
        + [(types.UINT8, 1)] * with_names
    with warnings.catch_warnings():  # DALI compiles run_fn with nogil, which objmode ignores
        warnings.filterwarnings("ignore", message="Code running in object mode",
                                category=NumbaWarning)
        return NumbaFunction(
            run_fn=_params_run(index, with_masks, with_images, with_names),
            setup_fn=_params_setup(num_classes, n_vector, with_masks), batch_processing=True,
            device="cpu", out_types=[types.FLOAT, types.FLOAT64] + [types.FLOAT] * with_masks,
            outs_ndim=[1, 1] + [2] * with_masks, in_types=[t for t, _ in inputs],
            ins_ndim=[d for _, d in inputs])
