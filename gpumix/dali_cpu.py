"""The CPU ``numba_function`` operators of :mod:`gpumix.dali`: the params
operator (one call per batch) and the appliers (one call per sample, on
DALI's thread pool, with no Python and no GIL).

Appliers run per sample because DALI runs a pipeline's CPU operators one at
a time: a batch-mode ``numba_function`` is one call on one thread while the
others idle, where per-sample calls are spread over DALI's thread pool
(docs/design.md). Their bodies are the kernels' own
(gpumix.kernels.table_mix.apply_sample_cpu,
gpumix.kernels.mix_normalize.mix_normalize_sample_cpu), so outputs equal the
NumPy references and, normalised, DALI's ``crop_mirror_normalize`` of them.

Partners. A per-sample call sees only its own sample, and mixing reads a
partner. The params operator is given the same images node and sees every
sample's buffer: it writes each sample's own and partner pixel address into
its table row (gpumix.kernels.table). DALI gives every operator the same
buffers of a node and keeps a batch alive while an operator reads it, and
the params step checked that every sample has the same shape and dtype. An
applier follows the partner address only when the row's own address is the
buffer it received (:func:`partner_of`); otherwise it mixes nothing, never
follows a stale pointer, and sets the pipeline's error flag, so
:func:`raise_pending` reports the batch instead of a silently unmixed sample.

Errors. DALI never sees an exception raised inside a ``numba_function``
(the params step is called back from compiled code), so the params step
keeps its errors, fills the batch's targets with NaN, and
:func:`raise_pending` raises them; gpumix.torch.DALIMixLoader calls it after
every batch.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import weakref

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from gpumix.kernels import table
from gpumix.kernels.mix_normalize import mix_normalize_sample_cpu
from gpumix.kernels.table_mix import apply_sample_cpu


@intrinsic
def _pointer_to(typingctx, address, like):
    """A pointer at the int64 ``address`` to ``like``'s dtype (an array's,
    or a NumPy scalar type's such as ``np.uint8``)."""
    if isinstance(like, types.NumberClass):
        dtype = like.instance_type
    else:
        array = like.type if isinstance(like, types.Optional) else like  # DALI's may be Optional
        dtype = array.dtype
    pointer = types.CPointer(dtype)
    signature = pointer(types.int64, like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return signature, codegen


@intrinsic
def _set_flag(typingctx, address):
    """Store int64 1 at ``address``."""
    signature = types.void(types.int64)

    def codegen(context, builder, sig, args):
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        builder.store(ir.Constant(ir.IntType(64), 1), pointer)
        return context.get_dummy_value()

    return signature, codegen


@njit(cache=True, nogil=True)
def partner_of(image, row):
    """The partner's pixels (shaped like ``image``) at the address the params
    step wrote in ``row``. When the row's own address is not this buffer's,
    ``image`` itself (nothing is mixed, no stale pointer is read) and the
    row's error flag is set for :func:`raise_pending`."""
    if np.int64(row[table.OWN_ADDRESS]) != image.ctypes.data:
        flag = np.int64(row[table.ERROR_ADDRESS])
        if flag != 0:
            _set_flag(flag)
        return image
    return carray(_pointer_to(np.int64(row[table.PARTNER_ADDRESS]), image), image.shape)


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


@njit(cache=True, nogil=True)
def _half_to_float(bits):
    """The float32 value of IEEE half-precision ``bits`` (exact)."""
    h = np.int64(bits)
    exponent, mantissa = (h >> 10) & 0x1F, h & 0x3FF
    if exponent == 0:
        value = mantissa * 2.0 ** -24
    elif exponent == 31:
        value = np.inf if mantissa == 0 else np.nan
    else:
        value = (1024 + mantissa) * 2.0 ** (exponent - 25)
    return np.float32(-value if h >> 15 else value)


@njit(cache=True, nogil=True)
def _float_to_half(value):
    """IEEE half-precision bits of a float32, rounded to nearest, ties to even
    (what NumPy's astype(float16) and the CUDA store do)."""
    v = np.float64(value)
    sign = np.uint16(0x8000) if v < 0 or (v == 0 and np.copysign(1.0, v) < 0) else np.uint16(0)
    a = abs(v)
    if a != a:
        return np.uint16(0x7E00)
    if a == np.inf:
        return np.uint16(sign | 0x7C00)
    e = math.frexp(a)[1] - 1 if a > 0 else -30  # a = m * 2**e with m in [1, 2)
    if e < -14:  # subnormal: units of 2**-24 (1024 rounds up into the smallest normal)
        return np.uint16(sign | np.uint16(np.rint(a * 2.0 ** 24)))
    scaled = np.rint(a * 2.0 ** (10 - e))  # in [1024, 2048]
    if scaled == 2048:
        scaled, e = 1024.0, e + 1
    if e > 15:
        return np.uint16(sign | 0x7C00)
    return np.uint16(sign | np.uint16(((e + 15) << 10) | (np.int64(scaled) - 1024)))


@njit(cache=True, nogil=True)
def apply_sample_half(out, image, partner, row, mask, chw):
    """:func:`apply_sample_cpu` for float16 samples held as uint16 bits:
    widened to float32 (exact), mixed, rounded back ties-to-even."""
    wide = np.empty(image.shape, np.float32)
    wide_partner = np.empty(image.shape, np.float32)
    flat, flat_partner = image.reshape(-1), partner.reshape(-1)
    wide_flat, wide_partner_flat = wide.reshape(-1), wide_partner.reshape(-1)
    for k in range(flat.shape[0]):
        wide_flat[k] = _half_to_float(flat[k])
        wide_partner_flat[k] = _half_to_float(flat_partner[k])
    mixed = np.empty(image.shape, np.float32)
    apply_sample_cpu(mixed, wide, wide_partner, row, mask, chw, False)
    out_flat, mixed_flat = out.reshape(-1), mixed.reshape(-1)
    for k in range(out_flat.shape[0]):
        out_flat[k] = _float_to_half(mixed_flat[k])


# ------------------------------------------------------------ compiled entries
# DALI compiles a numba_function's run function in every process, and
# Numba links every function it calls into it and optimises them all again:
# for the appliers' bodies, the kernels, that took 7-14 s per operator. So
# the bodies are compiled once and cached on disk as C entry points on
# addresses and sizes, and a run function only calls one through its
# address (about a second to compile, most of it DALI's own wrapper).

@njit(inline="always")
def _array_at(address, shape, scalar):
    return carray(_pointer_to(address, scalar), shape)


def _mix_normalize_entry(out, image, partner, row, mask, height, width, channels, mean,
                         inv_std, n_mean, chw, parts):
    """mix_normalize_sample_cpu of the HWC uint8 sample at ``image`` into
    float32 ``out`` (CHW where ``chw``); ``parts``: 0 normalise only, 1 mix
    by the table ``row``, 2 by the row and the FMix ``mask``."""
    hwc = (height, width, channels)
    pixels, partners = _array_at(image, hwc, np.uint8), _array_at(partner, hwc, np.uint8)
    target = _array_at(out, (channels, height, width) if chw else hwc, np.float32)
    means = _array_at(mean, (n_mean,), np.float32)
    inv_stds = _array_at(inv_std, (n_mean,), np.float32)
    if parts == 0:
        mix_normalize_sample_cpu(target, pixels, pixels, None, None, means, inv_stds, chw != 0)
        return
    table_row = _array_at(row, (table.N_COLUMNS,), np.float64)
    if parts == 1:
        mix_normalize_sample_cpu(target, pixels, partners, table_row, None, means, inv_stds,
                                 chw != 0)
    else:
        mix_normalize_sample_cpu(target, pixels, partners, table_row,
                                 _array_at(mask, (height, width), np.float32), means, inv_stds,
                                 chw != 0)


@njit(inline="always")
def _mix_by_addresses(scalar, half, out, image, partner, row, mask, d0, d1, d2, chw, has_mask):
    """apply_sample_cpu (apply_sample_half where ``half``: float16 bits as
    uint16) of the sample at ``image``, shaped (d0, d1, d2), into ``out``."""
    shape = (d0, d1, d2)
    pixels, partners = _array_at(image, shape, scalar), _array_at(partner, shape, scalar)
    target, table_row = _array_at(out, shape, scalar), _array_at(row, (table.N_COLUMNS,),
                                                                 np.float64)
    fmix = _array_at(mask, (d1, d2) if chw else (d0, d1), np.float32)
    quantize = not half and pixels.itemsize == 1  # uint8 rounds
    if half and has_mask:
        apply_sample_half(target, pixels, partners, table_row, fmix, chw != 0)
    elif half:
        apply_sample_half(target, pixels, partners, table_row, None, chw != 0)
    elif has_mask:
        apply_sample_cpu(target, pixels, partners, table_row, fmix, chw != 0, quantize)
    else:
        apply_sample_cpu(target, pixels, partners, table_row, None, chw != 0, quantize)


def _mix_uint8_entry(out, image, partner, row, mask, d0, d1, d2, chw, has_mask):
    _mix_by_addresses(np.uint8, False, out, image, partner, row, mask, d0, d1, d2, chw, has_mask)


def _mix_float32_entry(out, image, partner, row, mask, d0, d1, d2, chw, has_mask):
    _mix_by_addresses(np.float32, False, out, image, partner, row, mask, d0, d1, d2, chw, has_mask)


def _mix_uint16_entry(out, image, partner, row, mask, d0, d1, d2, chw, has_mask):
    _mix_by_addresses(np.uint16, True, out, image, partner, row, mask, d0, d1, d2, chw, has_mask)


_ENTRIES: dict = {}
_KEPT: list = []  # arrays whose addresses run functions hold, for the process's lifetime


def _entry(name: str):
    """The compiled entry point ``_{name}_entry`` (all arguments int64), as
    a ctypes function that jitted code calls through its address; compiled
    on first use, then loaded from Numba's cache."""
    if name not in _ENTRIES:
        from numba import cfunc

        function = globals()[f"_{name}_entry"]
        signature = types.void(*[types.int64] * function.__code__.co_argcount)
        _ENTRIES[name] = cfunc(signature, nopython=True, cache=True)(function)
    return _ENTRIES[name].ctypes


def _run_function(kind: str, with_masks: bool, chw: bool, mix_entry: str, mean, inv_std):
    """The per-sample ``run_fn``: numba_function passes exactly its inputs,
    so each set of them is its own small function, which calls a compiled
    entry (the flags and the addresses of ``mean`` and ``inv_std`` are
    compile-time constants there)."""
    flag = int(chw)
    entry = _entry(mix_entry if kind == "mix" else "mix_normalize")
    _KEPT.append((mean, inv_std))  # their addresses are compiled in
    at_mean, at_inv_std, n_mean = mean.ctypes.data, inv_std.ctypes.data, mean.shape[0]
    if kind == "normalize":
        def run(out, image):
            entry(out.ctypes.data, image.ctypes.data, image.ctypes.data, 0, 0, image.shape[0],
                  image.shape[1], image.shape[2], at_mean, at_inv_std, n_mean, flag, 0)
    elif kind == "mix_normalize" and with_masks:
        def run(out, image, row, mask):
            entry(out.ctypes.data, image.ctypes.data, partner_of(image, row).ctypes.data,
                  row.ctypes.data, mask.ctypes.data, image.shape[0], image.shape[1],
                  image.shape[2], at_mean, at_inv_std, n_mean, flag, 2)
    elif kind == "mix_normalize":
        def run(out, image, row):
            entry(out.ctypes.data, image.ctypes.data, partner_of(image, row).ctypes.data,
                  row.ctypes.data, 0, image.shape[0], image.shape[1], image.shape[2], at_mean,
                  at_inv_std, n_mean, flag, 1)
    elif with_masks:
        def run(out, image, row, mask):
            entry(out.ctypes.data, image.ctypes.data, partner_of(image, row).ctypes.data,
                  row.ctypes.data, mask.ctypes.data, image.shape[0], image.shape[1],
                  image.shape[2], flag, 1)
    else:
        def run(out, image, row):
            entry(out.ctypes.data, image.ctypes.data, partner_of(image, row).ctypes.data,
                  row.ctypes.data, 0, image.shape[0], image.shape[1], image.shape[2], flag, 0)
    return run


_APPLIERS: dict = {}


def applier(kind: str, *, layout: str, dtype=None, with_masks: bool = False, mean=None,
            std=None):
    """The ``numba_function`` operator for ``kind``: "mix" (images of
    ``layout`` and ``dtype``, uint8 or float32, out alike; float16 as its
    uint16 bits, reinterpreted by the caller), "mix_normalize"
    or "normalize" (HWC uint8 in, float32 ``layout`` out, ``mean``/``std``).
    Built, and compiled (about a second, DALI's wrapper around a cached
    entry), once per process for each set of options: an ops-API operator
    can be called in any pipeline."""
    key = (kind, layout, dtype, with_masks, None if mean is None else tuple(mean),
           None if std is None else tuple(std))
    if key not in _APPLIERS:
        from nvidia.dali import types
        from nvidia.dali.plugin.numba import NumbaFunction

        chw = layout == "CHW"
        mixes = kind != "normalize"
        if kind == "mix":
            mean32 = inv_std32 = np.zeros(1, np.float32)
            in_type = out_type = types.UINT16 if dtype == types.FLOAT16 else dtype
            setup = _same_shapes
        else:
            mean32 = np.asarray(mean, np.float32)
            inv_std32 = (np.float32(1.0) / np.asarray(std, np.float32)).astype(np.float32)
            in_type, out_type = types.UINT8, types.FLOAT
            setup = _hwc_to_chw_shapes if chw else _same_shapes
        inputs = [(in_type, 3)] + [(types.FLOAT64, 1)] * mixes + [(types.FLOAT, 2)] * with_masks
        mix_entry = {types.UINT8: "mix_uint8", types.FLOAT: "mix_float32",
                     types.FLOAT16: "mix_uint16"}.get(dtype)
        _APPLIERS[key] = NumbaFunction(
            run_fn=_run_function(kind, with_masks, chw, mix_entry, mean32, inv_std32),
            setup_fn=setup, batch_processing=False, device="cpu", out_types=[out_type],
            outs_ndim=[3], in_types=[t for t, _ in inputs], ins_ndim=[d for _, d in inputs])
    return _APPLIERS[key]


# ---------------------------------------------------------------- params step
# A batch-mode numba_function that gathers the draws, shapes and addresses in
# compiled code, calls the Python step (gpumix.dali._ParamsStep) back through
# a ctypes callback, and writes its arrays straight into DALI's outputs: no
# per-sample conversions, as a python_function would make. The callback
# takes the GIL itself (ctypes does). The compiled side is kept small (no
# objmode, no slice assignments) because DALI compiles it in every process.

_STEPS = weakref.WeakValueDictionary()  # index -> step; the pipeline holds the step
_NEXT_INDEX = itertools.count()


def raise_pending(pipeline) -> None:
    """Raise the first error that gpumix's operators in ``pipeline`` met since
    the last call: a params step's (labels out of range, images of mixed
    shapes, ...) or an applier's partner that could not be found. DALI may
    have run iterations ahead, so the error may belong to a later batch than
    the last one returned; its targets are NaN."""
    for step in getattr(pipeline, "_gpumix_steps", ()):
        if step.errors:
            error = step.errors[0]
            step.errors.clear()
            raise error
        if step.applier_errors[0]:
            step.applier_errors[0] = 0
            raise RuntimeError("a gpumix applier could not find a sample's partner: the "
                               "images it was given are not the buffers the params operator "
                               "saw (give both the same images node)")


def view_at(address: int, shape, dtype) -> np.ndarray:
    """A NumPy view of the ``shape`` array of ``dtype`` at ``address``,
    valid while whoever owns that memory keeps it."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype).reshape(shape)


def _step_outputs(index, draw_table, n_valid, shapes, addresses, has_images):
    """The Python side: the step's (targets, table rows, masks, ok). No
    exception may leave it: it runs on a DALI thread, called back from
    compiled code. A step already gone (a pipeline collected while an
    iteration it had prefetched still runs) gives ok = 0."""
    step = _STEPS.get(int(index))
    if step is None:
        return _FAILED
    try:
        if not has_images:
            shapes = addresses = None
        return (*step.fast_outputs(draw_table, n_valid, shapes, addresses), 1)
    except Exception as error:  # noqa: BLE001 - reported by raise_pending()
        step.errors.append(error)
        return _FAILED


_FAILED = (np.zeros((0, 0), np.float32), np.zeros((0, 0)), np.zeros((0, 0, 0), np.float32), 0)


def _run_step(index, n, width, at_draws, n_valid, at_shapes, at_addresses, has_images,
              n_targets, mask_rows, mask_cols, at_results):
    """The callback: :func:`_step_outputs` of the ``n`` draw vectors at
    ``at_draws`` (and the samples' shapes and addresses). Writes the
    addresses of the targets (n, n_targets) float32, the table rows (n,
    N_COLUMNS) float64 and, where ``mask_rows``, the masks (n, mask_rows,
    mask_cols) float32 into the three int64 at ``at_results``, and returns
    1; or 0 (the batch failed). The step holds the arrays until its next
    batch, so the addresses stay valid while the compiled side copies.
    ``width`` -1: the samples' draw vectors differ in length (their labels
    do), reported as the batch's error."""
    try:
        if width < 0:
            raise ValueError("labels: every sample of a batch must have as many label values "
                             "(one class id, or a target vector of one length)")
        targets, rows, masks, ok = _step_outputs(
            index, view_at(at_draws, (n, width), np.float64), n_valid,
            view_at(at_shapes, (n, 3), np.int64), view_at(at_addresses, (n,), np.int64),
            has_images)
        if not ok:
            return 0
        step = _STEPS[int(index)]
        outputs = [(targets, (n, n_targets), np.float32),
                   (rows, (n, table.N_COLUMNS), np.float64),
                   (masks, (n, mask_rows, mask_cols) if mask_rows else masks.shape, np.float32)]
        for array, shape, dtype in outputs:
            if array.shape != shape or array.dtype != dtype or not array.flags.c_contiguous:
                step.errors.append(RuntimeError(
                    f"the params step returned a {array.dtype} array of shape {array.shape} "
                    f"where DALI's output needs {np.dtype(dtype)} {shape}"))
                return 0
        step.held = (targets, rows, masks)
        view_at(at_results, (3,), np.int64)[:] = [targets.ctypes.data, rows.ctypes.data,
                                                  masks.ctypes.data if mask_rows else 0]
        return 1
    except Exception as error:  # noqa: BLE001 - nothing may leave a ctypes callback
        step = _STEPS.get(int(index))
        if step is not None:  # reported by raise_pending(), not lost with the NaN batch
            step.errors.append(error)
        return 0


_RUN_STEP = ctypes.CFUNCTYPE(ctypes.c_int64, *[ctypes.c_int64] * 12)(_run_step)


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


@njit(inline="always")
def _copy_into(target, source):
    """target[:] = source for 1-D arrays of one length, as a loop: a slice
    assignment compiles Numba's shape-mismatch messages, seconds of the
    operator's build in every process."""
    for k in range(target.shape[0]):
        target[k] = source[k]


@njit(nogil=True)
def _params_batch(targets_out, rows_out, masks_out, draws, images, names, index):
    """Gather, call the step back, scatter (see above). ``masks_out`` None
    without FMix, ``images`` None on a GPU pipeline's CPU stage (no shapes or
    addresses: the step has the size), ``names`` (source_info) None without
    padding detection. Not cached: the callback's address is compiled in."""
    b = len(draws)
    width = draws[0].shape[0]
    for i in range(1, b):
        if draws[i].shape[0] != width:  # labels of different lengths: the step reports it
            width = -1
            break
    draw_table = np.empty((b, max(width, 0)), np.float64)
    if width >= 0:
        for i in range(b):
            _copy_into(draw_table[i], draws[i])
    n_valid = b
    if names is not None:
        n_valid = count_valid_cpu(names)
    shapes = np.zeros((b, 3), np.int64)
    addresses = np.zeros(b, np.int64)
    if images is not None:
        for i in range(b):
            for d in range(3):
                shapes[i, d] = images[i].shape[d]
            addresses[i] = images[i].ctypes.data
    n_targets = targets_out[0].shape[0]
    mask_rows = mask_cols = 0
    if masks_out is not None:
        mask_rows, mask_cols = masks_out[0].shape[0], masks_out[0].shape[1]
    results = np.zeros(3, np.int64)
    ok = _RUN_STEP(np.int64(index), b, width, np.int64(draw_table.ctypes.data), n_valid,
                   np.int64(shapes.ctypes.data), np.int64(addresses.ctypes.data),
                   np.int64(images is not None), n_targets, mask_rows, mask_cols,
                   np.int64(results.ctypes.data))
    if ok:
        targets = _array_at(results[0], (b, n_targets), np.float32)
        rows = _array_at(results[1], (b, table.N_COLUMNS), np.float64)
        for i in range(b):
            _copy_into(targets_out[i], targets[i])
            _copy_into(rows_out[i], rows[i])
        if masks_out is not None:
            masks = _array_at(results[2], (b, mask_rows * mask_cols), np.float32)
            for i in range(b):
                _copy_into(masks_out[i].reshape(-1), masks[i])
        return
    for i in range(b):  # NaN targets; pair 0, a copy, no own address: nothing is mixed
        targets_out[i].fill(np.nan)
        rows_out[i].fill(0.0)
        if masks_out is not None:
            masks_out[i].fill(0.0)


def _params_run(with_masks: bool, with_images: bool, with_names: bool):
    """The batch ``run_fn`` of a params operator, one per set of inputs.
    ``step`` is the constant input naming the Python step (one int32 per
    sample)."""
    if with_masks and not with_images and with_names:
        def run(targets, rows, masks, draws, step, names):
            _params_batch(targets, rows, masks, draws, None, names, step[0][0])
    elif with_masks and not with_images:
        def run(targets, rows, masks, draws, step):
            _params_batch(targets, rows, masks, draws, None, None, step[0][0])
    elif with_masks and with_names:
        def run(targets, rows, masks, draws, step, images, names):
            _params_batch(targets, rows, masks, draws, images, names, step[0][0])
    elif with_masks:
        def run(targets, rows, masks, draws, step, images):
            _params_batch(targets, rows, masks, draws, images, None, step[0][0])
    elif with_images and with_names:
        def run(targets, rows, draws, step, images, names):
            _params_batch(targets, rows, None, draws, images, names, step[0][0])
    elif with_images:
        def run(targets, rows, draws, step, images):
            _params_batch(targets, rows, None, draws, images, None, step[0][0])
    elif with_names:
        def run(targets, rows, draws, step, names):
            _params_batch(targets, rows, None, draws, None, names, step[0][0])
    else:
        def run(targets, rows, draws, step):
            _params_batch(targets, rows, None, draws, None, None, step[0][0])
    return run


def _params_setup(num_classes: int, with_masks: bool, chw: bool, labels_from=None,
                  mask_shape=None):
    """numba_function setup: targets (K,) (with ``labels_from``: the width
    of the labels at the end of the draw vector), table rows (N_COLUMNS,),
    masks (H, W) of the HWC or CHW images (input 2, after the draws and the
    step)."""
    n_columns = table.N_COLUMNS
    first = 1 if chw else 0
    start = -1 if labels_from is None else int(labels_from)  # plain ints for Numba

    if mask_shape is not None:  # fixed: the operator may have no images input
        fixed_h, fixed_w = (int(n) for n in mask_shape)

        def setup(out_shapes, in_shapes):
            for i in range(len(out_shapes[0])):
                out_shapes[0][i][0] = num_classes if start < 0 else in_shapes[0][i][0] - start
                out_shapes[1][i][0] = n_columns
                if with_masks:
                    out_shapes[2][i][0] = fixed_h
                    out_shapes[2][i][1] = fixed_w
        return setup

    def setup(out_shapes, in_shapes):
        for i in range(len(out_shapes[0])):
            out_shapes[0][i][0] = num_classes if start < 0 else in_shapes[0][i][0] - start
            out_shapes[1][i][0] = n_columns
            if with_masks:
                out_shapes[2][i][0] = in_shapes[2][i][first]
                out_shapes[2][i][1] = in_shapes[2][i][first + 1]
    return setup


_PARAMS_OPERATORS: dict = {}


def params_operator(step, *, num_classes: int, with_masks: bool, with_names: bool,
                    images_type=None, layout: str = "HWC", labels_from=None, mask_shape=None):
    """A function ``(draws[, images][, source_info]) -> (targets, rows[,
    masks])`` of DALI nodes running ``step`` (a gpumix.dali._ParamsStep)
    once per batch through a batch-mode ``numba_function`` and a callback.
    Images are 3-D samples of DALI type ``images_type``. Without images the
    step must know the size. The targets are (K,) per sample, or with
    ``labels_from`` (where the labels start in the draw vector) as wide as
    the labels; masks are the images' (H, W), or ``mask_shape`` (video
    clips and volumes, whose frames or slices are stacked as rows; then
    no images are needed). The compiled operator is built once per process for each set of options and told which step to
    call by a constant input, so a new pipeline does not compile again. Its
    errors surface through :func:`raise_pending`."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.numba import NumbaFunction

    with_images = images_type is not None
    if with_masks and not with_images and mask_shape is None:
        raise ValueError("a params operator makes masks only when given the images or "
                         "their mask_shape")
    index = next(_NEXT_INDEX)
    _STEPS[index] = step
    # The pipeline keeps the step alive (the operator only knows its index).
    Pipeline.current().__dict__.setdefault("_gpumix_steps", []).append(step)
    key = (num_classes, with_masks, with_names, images_type, layout, labels_from, mask_shape)
    if key not in _PARAMS_OPERATORS:
        inputs = [(types.FLOAT64, 1), (types.INT32, 1)] + [(images_type, 3)] * with_images \
            + [(types.UINT8, 1)] * with_names
        _PARAMS_OPERATORS[key] = NumbaFunction(
            run_fn=_params_run(with_masks, with_images, with_names),
            setup_fn=_params_setup(num_classes, with_masks, layout == "CHW", labels_from,
                                   mask_shape),
            batch_processing=True, device="cpu",
            out_types=[types.FLOAT, types.FLOAT64] + [types.FLOAT] * with_masks,
            outs_ndim=[1, 1] + [2] * with_masks, in_types=[t for t, _ in inputs],
            ins_ndim=[d for _, d in inputs])
    operator = _PARAMS_OPERATORS[key]

    def run(draws, *rest):
        step_input = fn.constant(idata=[index], shape=[1], dtype=types.INT32)
        return operator(draws, step_input, *rest)

    return run
