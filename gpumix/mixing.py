"""Apply MixParams to arrays: one entry point per output, backend chosen by
the array (NumPy -> Numba CPU kernels; anything with
``__cuda_array_interface__`` such as CuPy arrays or CUDA torch tensors ->
Numba CUDA kernels, on the stream given, with no copy to the host).

    mix_images(images, params, layout)   every method per sample
    mix_dense(dense, params, layout)     the same boxes/masks, pasted only
    soft_targets(labels, params, K, s)   float32 (B, K) from class ids
    mix_targets(targets, params, ...)    dense, multi-label or regression targets
    reference_mix_images / reference_mix_dense / reference_soft_targets
                                         the NumPy oracle, from gpumix.kernels
    launch_table_mix(x, out, rows, ...)  every method (and the targets) in one
                                         CUDA launch, from a params table

Samples are grouped by method and each group is one kernel launch: CutMix,
SaliencyMix and unmixed samples share the box kernel (an unmixed sample has
an empty box, so it is copied exactly), MixUp uses the blend kernel, FMix,
SmoothMix and GridMix the mask kernel, ResizeMix the resize kernel. On the
CPU, SmoothMix and GridMix masks are made again per sample from their
shape params (gpumix.kernels.shape_mask.mix_cpu: the same values, kept in
cache instead of read from memory); ``params.mask`` serves them only when
those params are absent.
SaliencyMix boxes are placed on the partners' saliency peaks first
(gpumix.saliency.place_boxes).
Volumes and clips mixed across time (layouts NCDHW, NDHWC, and NTCHW: a
video clip with one cuboid or 3-D mask over (T, H, W)) run on the same
kernels: the batch is seen as 2-D images of D * H rows (NTCHW: one plane
of T * C * H rows), each (D, H, W) mask as D * H mask rows (NTCHW: repeated
for every channel), and CutMix's cuboids are applied as their hard masks
(gpumix.params). The kernels never learn the rank.

Kernels never write their input: in place (an ``out`` that shares memory with
``images``, such as ``images`` itself) the kernels read a snapshot (one copy,
into ``scratch`` when given) and write ``out``. Every ``out`` and ``scratch``
must be C-contiguous and of the input's shape and dtype (ValueError
otherwise): the kernels write their memory directly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gpumix import fmix, saliency
from gpumix.config import (BOX_METHODS, CUTMIX, GRIDMIX, MASK_METHODS, MIXUP, NONE, RESIZEMIX,
                           SMOOTHMIX)
from gpumix.params import MixParams, array_module, masked_methods, shape_table
from gpumix.kernels import (blend, box_paste, mask_mix, resize_paste, shape_mask,
                            soft_targets as targets_kernel)
from gpumix.kernels._launch import (check_image_dtype, cupy_stream, numpy_dtype, row_geometry,
                                    row_grid, row_view, spatial_shape, upload_many)


def is_cuda_array(x) -> bool:
    return hasattr(x, "__cuda_array_interface__") and not isinstance(x, np.ndarray)


VOLUME_LAYOUTS = ("NCDHW", "NDHWC", "NTCHW")


def volume_shape(shape, layout: str) -> tuple[int, int, int]:
    """(D, H, W) of a batch in a volume layout ((T, H, W) for NTCHW clips)."""
    if layout == "NCDHW":
        return tuple(shape[2:5])
    if layout == "NDHWC":
        return tuple(shape[1:4])
    return (shape[1], *shape[3:5])


def check_images(images, layout: str, name: str = "images") -> tuple[int, ...]:
    """Validate an image batch; returns (H, W), or (D, H, W) for a volume layout."""
    if layout not in ("NCHW", "NHWC", *VOLUME_LAYOUTS):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC' (images), or 'NCDHW', 'NDHWC' or "
                         f"'NTCHW' (volumes, clips), got {layout!r}")
    check_image_dtype(images.dtype, name)
    if len(images.shape) != len(layout):
        raise ValueError(f"{name} must be {len(layout)}-D ({layout}), got shape "
                         f"{tuple(images.shape)}")
    channels = images.shape[layout.index("C")]
    if channels < 1:
        raise ValueError(f"{name} has no channels in layout {layout} (shape "
                         f"{tuple(images.shape)})")
    if images.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one sample, got shape {tuple(images.shape)}")
    spatial = volume_shape(images.shape, layout) if layout in VOLUME_LAYOUTS \
        else spatial_shape(images.shape, layout)
    if min(spatial) < 1:
        raise ValueError(f"{name} must have at least one pixel on each spatial axis of "
                         f"{layout}, got shape {tuple(images.shape)}")
    return spatial


def check_labels(labels, batch_size: int, num_classes: int) -> np.ndarray:
    """Integer class labels (B,) in [0, num_classes), as int64."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if labels.shape != (batch_size,):
        raise ValueError(f"labels must have shape ({batch_size},), got {labels.shape}")
    if batch_size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(f"labels must be in [0, {num_classes}) (num_classes={num_classes}), "
                         f"got {bad}")
    return labels.astype(np.int64, copy=False)


# ---------------------------------------------------------------- reference
def reference_mix_images(images: np.ndarray, params: MixParams, layout: str) -> np.ndarray:
    """NumPy oracle: each kernel's reference on its samples (volumes: the
    cuboids cut by slicing, not through their masks)."""
    if layout in VOLUME_LAYOUTS:
        return _reference_mix_volumes(images, params, layout)
    out = images.copy()
    cut = params.samples(*BOX_METHODS)
    mixup = params.samples(MIXUP)
    fm = params.samples(*MASK_METHODS)
    resized = params.samples(RESIZEMIX)
    if cut.size:
        out[cut] = box_paste.reference(images, params.pair, params.box, layout, cut)[cut]
    if mixup.size:
        out[mixup] = blend.reference(images, params.pair, params.lam, mixup)[mixup]
    if fm.size:
        out[fm] = mask_mix.reference(images, params.pair, params.mask, layout, fm)[fm]
    if resized.size:
        out[resized] = resize_paste.reference(images, params.pair, params.box, layout,
                                              params.bilinear, resized)[resized]
    return out


def _reference_mix_volumes(images: np.ndarray, params: MixParams, layout: str) -> np.ndarray:
    # Spatial axes first, channels last: (B, D, H, W, C) (NTCHW: (B, T, H, W, C)).
    spatial_last = {"NCDHW": (1, 4), "NDHWC": (4, 4), "NTCHW": (2, 4)}[layout]
    x = np.moveaxis(images, *spatial_last)
    out = x.copy()
    for i, (j, method) in enumerate(zip(params.pair, params.method)):
        if method == CUTMIX:
            z0, z1, y0, y1, x0, x1 = params.box[i]
            out[i, z0:z1, y0:y1, x0:x1] = x[j, z0:z1, y0:y1, x0:x1]
        elif method == MIXUP:
            out[i] = blend.reference(x[[i, j]], [1, 0], params.lam[[i, j]], [0])[0]
        elif method != NONE:  # FMix: the mask over the spatial axes, channels alike
            flat = x[[i, j]].reshape(2, -1, 1, x.shape[-1])
            mask = params.mask[[i, i]].reshape(2, -1, 1)
            out[i] = mask_mix.reference(flat, [1, 0], mask, "NHWC", [0])[0].reshape(x[i].shape)
    return np.moveaxis(out, spatial_last[1], spatial_last[0])


def reference_mix_dense(dense: np.ndarray, params: MixParams, layout: str = "NHW") -> np.ndarray:
    _refuse_mixup_on_dense(params)
    out = dense.copy()
    cut = params.samples(*BOX_METHODS)
    fm = params.samples(*MASK_METHODS)
    resized = params.samples(RESIZEMIX)
    if cut.size:
        out[cut] = box_paste.reference(dense, params.pair, params.box, layout, cut)[cut]
    if fm.size:
        out[fm] = mask_mix.reference(dense, params.pair, params.mask, layout, fm, paste=True)[fm]
    if resized.size:
        out[resized] = resize_paste.reference(dense, params.pair, params.box, layout, False,
                                              resized)[resized]
    return out


def reference_soft_targets(labels, params: MixParams, num_classes: int, smoothing: float):
    return targets_kernel.reference(labels, params.pair, params.lam, num_classes, smoothing)


# ------------------------------------------------------------------ kernels
def _refuse_mixup_on_dense(params: MixParams) -> None:
    if np.any(params.method == MIXUP):
        raise ValueError("MixUp cannot be applied to dense targets (segmentation maps): "
                         "their values would be blended; use a box or mask method, or mix "
                         "per-pixel soft targets yourself")


def _box_samples(params: MixParams, masked=MASK_METHODS) -> np.ndarray:
    return params.samples(*(c for c in (NONE, *BOX_METHODS) if c not in masked))


def _shaped_methods(params: MixParams) -> tuple[int, ...]:
    """SmoothMix and GridMix, where their shape params are given: the CPU
    kernels make those samples' masks from them."""
    return (SMOOTHMIX,) * (params.smooth is not None) + (GRIDMIX,) * (params.grid is not None)


def _run_cpu(x, params: MixParams, layout: str, out, paste: bool, masked=MASK_METHODS):
    view = row_view(np.ascontiguousarray(x), layout)
    out_rows = row_view(out, layout).rows
    box_samples = _box_samples(params, masked)
    if box_samples.size:
        box_paste.cpu(view.rows, params.pair, params.box, box_samples, view.height,
                      view.cstride, out=out_rows)
    mixup = params.samples(MIXUP)
    if mixup.size:
        blend.cpu(view.rows, params.pair, params.lam, mixup, out=out_rows)
    shaped_methods = _shaped_methods(params)
    shaped = params.samples(*shaped_methods)
    if shaped.size:  # masks made per sample, in cache
        shape_mask.mix_cpu(view.rows, shape_table(params.method, params.smooth, params.grid,
                                                  params.pair),
                           shaped, view.height, view.cstride, paste, out=out_rows)
    fm = params.samples(*(c for c in masked if c not in shaped_methods))
    if fm.size:
        mask_mix.cpu(view.rows, params.pair, np.ascontiguousarray(params.mask, np.float32), fm,
                     view.height, view.cstride, paste, out=out_rows)
    resized = params.samples(RESIZEMIX)
    if resized.size:  # dense maps (paste) are resized nearest: labels are never blended
        resize_paste.cpu(view.rows, params.pair, params.box, resized, view.height, view.cstride,
                         params.bilinear and not paste, out=out_rows)
    return out


def as_cupy(x):
    """A zero-copy CuPy view of a CUDA array (CuPy, torch, Numba, anything
    with ``__cuda_array_interface__``). torch tensors are wrapped from their
    pointer: the kernels run on torch's current stream, so the interface's
    stream synchronisation (CuPy's default) would only stall the host."""
    import cupy as cp

    if isinstance(x, cp.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        dtype = numpy_dtype(x.dtype)
        itemsize = dtype.itemsize
        extent = 1 + sum((n - 1) * s for n, s in zip(x.shape, x.stride())) if x.numel() else 0
        memory = cp.cuda.UnownedMemory(x.data_ptr(), extent * itemsize, x, x.device.index)
        return cp.ndarray(tuple(x.shape), dtype, cp.cuda.MemoryPointer(memory, 0),
                          tuple(s * itemsize for s in x.stride()))
    return cp.asarray(x)


def _run_cuda(x, params: MixParams, layout: str, out, paste: bool, stream,
              masked=MASK_METHODS):
    view = row_view(as_cupy(x), layout)
    out_rows = row_view(as_cupy(out), layout).rows
    box_samples, mixup = _box_samples(params, masked), params.samples(MIXUP)
    fm, resized = params.samples(*masked), params.samples(RESIZEMIX)
    host = {"pair": (params.pair, np.int64), "box": (params.box, np.int64),
            "box_samples": (box_samples, np.int64), "lam": (params.lam, np.float32),
            "mixup": (mixup, np.int64), "fmix": (fm, np.int64),
            "resized": (resized, np.int64)}
    mask = params.mask
    if fm.size and not is_cuda_array(mask):
        host["mask"] = (mask, np.float32)
    dev = dict(zip(host, upload_many(host.values(), stream)))  # one copy for them all
    if box_samples.size:
        box_paste.cuda(view.rows, dev["pair"], dev["box"], dev["box_samples"], view.height,
                       view.cstride, out=out_rows, stream=stream)
    if mixup.size:
        blend.cuda(view.rows, dev["pair"], dev["lam"], dev["mixup"], out=out_rows, stream=stream)
    if fm.size:
        masks = dev["mask"] if "mask" in dev else as_cupy(mask).astype(np.float32, copy=False)
        mask_mix.cuda(view.rows, dev["pair"], masks, dev["fmix"], view.height, view.cstride,
                      paste, out=out_rows, stream=stream)
    if resized.size:
        resize_paste.cuda(view.rows, dev["pair"], dev["box"], dev["resized"], view.height,
                          view.cstride, params.bilinear and not paste, out=out_rows,
                          stream=stream)
    return out


def _empty_like(x, stream=None):
    if is_cuda_array(x):
        import cupy as cp

        with cupy_stream(stream):
            return cp.empty(tuple(x.shape), dtype=numpy_dtype(x.dtype))
    return np.empty(x.shape, x.dtype)


def _snapshot(x, scratch, stream):
    """A copy of ``x`` for in-place mixing (into ``scratch`` when given)."""
    if is_cuda_array(x):
        import cupy as cp

        with cupy_stream(stream):
            if scratch is None:
                return as_cupy(x).copy()
            cp.copyto(scratch, as_cupy(x))
            return scratch
    if scratch is None:
        return x.copy()
    np.copyto(scratch, x)
    return scratch


def _apply(x, params: MixParams, layout: str, out, paste: bool, stream, scratch=None,
           masked=MASK_METHODS):
    source, target = x, out
    if out is None:
        target = _empty_like(x, stream)
    else:
        check_out(out, x.shape, x.dtype)
        if shares_memory(out, x):  # in place: kernels read a snapshot
            if scratch is not None:
                check_out(scratch, x.shape, x.dtype, "scratch")
                if shares_memory(scratch, x) or shares_memory(scratch, out):
                    raise ValueError("scratch must not share memory with images or out")
            source = _snapshot(x, scratch, stream)
    if is_cuda_array(x):
        _run_cuda(source, params, layout, target, paste, stream, masked)
    else:
        _run_cpu(source, params, layout, target, paste, masked)
    return target


def check_out(out, shape, dtype, name: str = "out", contiguous: bool = True) -> None:
    """ValueError unless ``out`` (NumPy, CUDA or torch) has ``shape`` and
    ``dtype`` and, with ``contiguous``, is C-contiguous: the image kernels
    write a row view of its memory, so a strided one would be written
    through a copy and lose the result."""
    shape, dtype = tuple(shape), numpy_dtype(dtype)
    if tuple(out.shape) != shape or numpy_dtype(out.dtype) != dtype:
        raise ValueError(f"{name} must have shape {shape} and dtype {dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if not contiguous:
        return
    if isinstance(out, np.ndarray):
        contiguous = out.flags.c_contiguous
    elif hasattr(out, "is_contiguous"):  # a torch tensor
        contiguous = out.is_contiguous()
    else:
        contiguous = as_cupy(out).flags.c_contiguous
    if not contiguous:
        raise ValueError(f"{name} must be C-contiguous: the kernels use its memory directly")


def shares_memory(a, b) -> bool:
    """Whether two arrays may overlap: both on a CUDA device, or both in host
    memory (NumPy arrays, or anything NumPy views without a copy, such as a
    CPU torch tensor and its ``.numpy()``)."""
    if is_cuda_array(a) or is_cuda_array(b):
        if not (is_cuda_array(a) and is_cuda_array(b)):
            return False
        (a0, a1), (b0, b1) = _device_span(a), _device_span(b)
        return a0 < b1 and b0 < a1
    return bool(np.may_share_memory(np.asarray(a), np.asarray(b)))


def _device_span(x) -> tuple[int, int]:
    """[first, end) device addresses of a CUDA array's elements."""
    interface = x.__cuda_array_interface__
    start = interface["data"][0]
    shape = tuple(interface["shape"])
    itemsize = np.dtype(interface["typestr"]).itemsize
    if 0 in shape:
        return start, start
    strides = interface.get("strides") or tuple(
        int(np.prod(shape[k + 1:], dtype=np.int64)) * itemsize for k in range(len(shape)))
    low = sum(min(0, (n - 1) * st) for n, st in zip(shape, strides))
    high = sum(max(0, (n - 1) * st) for n, st in zip(shape, strides))
    return start + low, start + high + itemsize


def _as_planes(x, layout: str):
    """A contiguous volume batch seen as 2-D images: (view, its layout)."""
    shape = tuple(x.shape)
    if not (x.flags.c_contiguous if isinstance(x, np.ndarray) else as_cupy(x).flags.c_contiguous):
        raise ValueError(f"a {layout} batch must be C-contiguous")
    x = x if isinstance(x, np.ndarray) else as_cupy(x)
    if layout == "NCDHW":
        return x.reshape(shape[0], shape[1], shape[2] * shape[3], shape[4]), "NCHW"
    if layout == "NDHWC":
        return x.reshape(shape[0], shape[1] * shape[2], shape[3], shape[4]), "NHWC"
    return x.reshape(shape[0], 1, shape[1] * shape[2] * shape[3], shape[4]), "NCHW"


def _plane_masks(mask, layout: str, channels: int):
    """(B, D, H, W) masks as the planes' (B, rows, W) masks (NTCHW: each
    frame's mask repeated for its channels)."""
    if mask is None:
        return None
    xp = array_module(mask)
    b, d, h, w = mask.shape
    if layout == "NTCHW":
        mask = xp.broadcast_to(mask[:, :, None], (b, d, channels, h, w))
    return xp.ascontiguousarray(mask, dtype=xp.float32).reshape(b, -1, w)


def _mix_volumes(images, params: MixParams, layout: str, out, stream, scratch):
    """mix_images for volume layouts, on the 2-D kernels (module docstring)."""
    planes, plane_layout = _as_planes(images, layout)
    if out is None:
        out = _empty_like(images, stream)
    check_out(out, images.shape, images.dtype)  # here, where errors quote the shapes given
    target = planes if out is images else _as_planes(out, layout)[0]
    flat = dataclasses.replace(
        params, box=np.zeros((params.batch_size, 4), np.int64),
        mask=_plane_masks(params.mask, layout, images.shape[2]))
    if scratch is not None:
        check_out(scratch, images.shape, images.dtype, "scratch")
        scratch = _as_planes(scratch, layout)[0]
    _apply(planes, flat, plane_layout, target, False, stream, scratch, masked_methods(3))
    return out


def mix_images(images, params: MixParams, layout: str = "NCHW", *, out=None, stream=None,
               scratch=None):
    """Mix an image batch (uint8/float16/float32, NCHW or NHWC; volumes NCDHW
    or NDHWC, clips with one cuboid or mask over time NTCHW) with ``params``
    (SaliencyMix boxes not placed yet are placed on these images first).

    Returns ``out`` (a new array by default; pass ``out=images`` to write in
    place, optionally with a reusable ``scratch`` array of the same shape and
    dtype for the snapshot). CUDA arrays are mixed on ``stream`` (a numba
    stream; None = default).
    """
    shape = check_images(images, layout)
    params.check(images.shape[0], shape)
    if layout in VOLUME_LAYOUTS:
        return _mix_volumes(images, params, layout, out, stream, scratch)
    params = saliency.place_boxes(images, params, layout, params.saliency, stream=stream)
    return _apply(images, params, layout, out, paste=False, stream=stream, scratch=scratch)


def mix_dense(dense, params: MixParams, layout: str = "NHW", *, out=None, stream=None):
    """Apply the same boxes/masks to dense targets (B, H, W) or (B, 1, H, W): pasted."""
    _refuse_mixup_on_dense(params)
    if layout not in ("NHW", "NCHW", "NHWC") or len(dense.shape) != len(layout):
        raise ValueError(f"dense must be {len(layout)}-D for layout {layout!r}, "
                         f"got shape {tuple(dense.shape)}")
    params.check(dense.shape[0], spatial_shape(dense.shape, layout))
    if saliency.unplaced(params.method, params.box).size:
        raise ValueError("params hold SaliencyMix boxes not placed yet: place them on the "
                         "images first (gpumix.saliency.place_boxes), then mix both")
    return _apply(dense, params, layout, out, paste=True, stream=stream)


def soft_targets(labels, params: MixParams, num_classes: int, smoothing: float = 0.0, *,
                 out=None, stream=None):
    """Float32 soft targets (B, K) for integer labels (B,). On CUDA the label
    range check costs one device-to-host copy."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {smoothing}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if is_cuda_array(labels):
        import cupy as cp

        kind = numpy_dtype(labels.dtype)
        if kind is None or kind.kind not in "iu":
            raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
        if tuple(labels.shape) != (params.batch_size,):
            raise ValueError(f"labels must have shape ({params.batch_size},), got "
                             f"{tuple(labels.shape)}")
        with cupy_stream(stream):
            labels_dev = as_cupy(labels).astype(cp.int64, copy=False)
            low, high = (int(v) for v in cp.stack([labels_dev.min(), labels_dev.max()]).get())
            if low < 0 or high >= num_classes:
                raise ValueError(f"labels must be in [0, {num_classes}), "
                                 f"got {low if low < 0 else high}")
            if out is None:
                out = cp.empty((labels_dev.shape[0], num_classes), cp.float32)
            check_out(out, (params.batch_size, num_classes), np.float32, contiguous=False)
        pair, lam = upload_many([(params.pair, np.int64), (params.lam, np.float32)], stream)
        targets_kernel.cuda(labels_dev, pair, lam, num_classes, smoothing, out=as_cupy(out),
                            stream=stream)
        return out
    labels = check_labels(labels, params.batch_size, num_classes)
    if out is not None:  # the kernel writes any strides
        check_out(out, (params.batch_size, num_classes), np.float32, contiguous=False)
    return targets_kernel.cpu(labels, params.pair, params.lam, num_classes, smoothing, out=out)


def check_dense_targets(targets, batch_size: int, name: str = "targets") -> None:
    """TypeError / ValueError unless ``targets`` is a float (B,) or (B, D) array."""
    kind = numpy_dtype(targets.dtype)
    if kind is None or kind.kind != "f":
        raise TypeError(f"{name} must be floating point (dense, multi-label or regression "
                        f"targets; class ids go through soft_targets), got dtype {targets.dtype}")
    if len(targets.shape) not in (1, 2) or targets.shape[0] != batch_size:
        raise ValueError(f"{name} must have shape ({batch_size},) or ({batch_size}, D), got "
                         f"{tuple(targets.shape)}")


def mix_targets(targets, params: MixParams, *, smoothing: float = 0.0, toward=None, out=None,
                stream=None):
    """Mix dense targets with the pixels' lam: soft or distilled probabilities
    (B, K), multi-label 0/1 targets (B, K), regression values (B,) or (B, D).

        y[i]   = targets[i] * (1 - smoothing) + smoothing * toward   (smoothing first)
        out[i] = lam[i] * y[i] + (1 - lam[i]) * y[pair[i]]            (float32, MixUp's blend)

    A row whose lam is 1 (unmixed, or an empty box) is y[i] exactly and one
    whose lam is 0 is y[pair[i]] exactly, taken rather than blended: a NaN or
    inf in a target that weighs nothing would otherwise reach the result
    (0 * inf is NaN).

    ``toward``: where smoothing pulls, 1 / K for probabilities (rows keep
    summing to 1), 0.5 for multi-label targets (timm's ``multi_label``);
    needed only with ``smoothing``. NumPy arrays run the CPU blend kernel,
    CUDA arrays the CUDA one on ``stream`` (pair and lam go up in one pinned
    copy). Returns float32 ``out`` of the targets' shape."""
    check_dense_targets(targets, params.batch_size)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if smoothing and toward is None:
        raise ValueError("smoothing needs toward= (1 / K for probabilities, 0.5 multi-label)")
    keep, pull = np.float32(1.0 - smoothing), np.float32(smoothing * (toward or 0.0))
    b = params.batch_size
    shape = tuple(targets.shape)
    width = int(np.prod(shape[1:], dtype=np.int64))
    if is_cuda_array(targets):
        import cupy as cp

        with cupy_stream(stream):
            y = as_cupy(targets).astype(cp.float32)
            if smoothing:
                y = y * keep + pull
            if out is None:
                out = cp.empty(shape, cp.float32)
            check_out(out, shape, np.float32)  # y is a copy: out may be the targets
            source, blended = _target_sources(params)
            pair, lam, samples, taken = upload_many(
                [(params.pair, np.int64), (params.lam, np.float32), (blended, np.int64),
                 (source, np.int64)], stream)
            flat_out = as_cupy(out).reshape(b, width)
            flat_out[...] = y.reshape(b, width)[taken]
        if blended.size:
            blend.cuda(y.reshape(b, 1, width), pair, lam, samples,
                       out=flat_out.reshape(b, 1, width), stream=stream)
        return out
    if out is None:
        out = np.empty(shape, np.float32)
    check_out(out, shape, np.float32)
    # a copy where out is the targets themselves: rows are read after others are written
    host = np.asarray(targets)  # a view of a CPU tensor's memory, not a copy
    y = np.array(host, np.float32, copy=shares_memory(out, host) or None)
    if smoothing:
        y = y * keep + pull
    source, blended = _target_sources(params)
    y = np.ascontiguousarray(y).reshape(b, width)
    np.take(y, source, axis=0, out=out.reshape(b, width))
    if blended.size:
        blend.cpu(y.reshape(b, 1, width), params.pair, params.lam, blended,
                  out=out.reshape(b, 1, width))
    return out


def _target_sources(params: MixParams) -> tuple[np.ndarray, np.ndarray]:
    """(whose target each row takes whole: its own, or its partner's where
    lam is 0; the rows to blend instead, those with lam strictly inside (0, 1))."""
    lam = np.asarray(params.lam, np.float32)
    source = np.where(lam <= 0, params.pair, np.arange(params.batch_size)).astype(np.int64)
    return source, np.flatnonzero((lam > 0) & (lam < 1)).astype(np.int64)


TARGET_KINDS = ("classes", "dense", "multi_label", "regression")


def target_smoothing(kind: str, smoothing: float, num_classes: int):
    """(smoothing, toward) for a kind of targets: probabilities move towards
    1 / K (rows keep summing to 1), multi-label targets towards 0.5 (timm),
    regression values are never smoothed."""
    if kind == "dense":
        return smoothing, 1.0 / num_classes
    if kind == "multi_label":
        return smoothing, 0.5
    return 0.0, None


def label_weights(label_lam, params: MixParams) -> np.ndarray:
    """The targets' weight of the primary (float32, one per sample): lam
    itself (``label_lam`` None), a fixed number, or an array-to-array
    function of lam, in [0, 1]. A sample left unmixed (method NONE) keeps
    weight 1 whatever ``label_lam`` says: its target stays its own."""
    lam = np.asarray(params.lam, np.float32)
    if label_lam is None:
        return lam
    if callable(label_lam):
        weights = np.broadcast_to(np.asarray(label_lam(lam.copy()), np.float32), lam.shape).copy()
        outside = ~((weights >= 0) & (weights <= 1))  # NaN too
        if outside.any():
            raise ValueError(f"label_lam must map lam to weights in [0, 1], got "
                             f"{weights[outside][0]}")
    else:
        weights = np.full(lam.shape, label_lam, np.float32)
    weights[params.method == NONE] = 1.0
    return weights


# ------------------------------------------------------- the params table
def masks_from_table(rows, shape):
    """CPU masks (B, H, W) float32 of a host params table: FMix's from the
    keys, SmoothMix's and GridMix's from their columns (zeros elsewhere), or
    None when no row uses a mask."""
    masks = fmix.masks_from_table(rows, shape)
    if shape_mask.uses_shape_masks(rows):
        if masks is None:
            masks = np.zeros((len(rows), *shape), np.float32)
        shape_mask.cpu(np.ascontiguousarray(rows, np.float64), masks)
    return masks


def launch_masks(rows, device_rows, shape, stream: int, launcher):
    """The CUDA twin of :func:`masks_from_table` on ``stream``: FMix masks
    from the host rows' keys (gpumix.fmix), then one launch of
    gpumix.kernels.shape_mask reading the device rows; returns the masks
    (a DeviceArray) or None."""
    from gpumix import runtime

    masks = launcher.fmix_masks(rows, shape, stream)
    if shape_mask.uses_shape_masks(rows):
        if masks is None:
            masks = launcher.empty((len(rows), *shape), np.float32, stream)
        grid, block = row_grid(len(rows) * shape[0], shape[1])
        runtime.launch(shape_mask.cuda_kernel, grid, block, stream, (device_rows, masks),
                       launcher)
    return masks


def no_mask(launcher):
    """The (1, 1, 1) masks argument of a launch in which no sample uses a mask."""
    from gpumix import runtime

    return runtime.kept(launcher, "no_mask", lambda: launcher.empty((1, 1, 1), np.float32))


def launch_table_mix(x, out, rows, masks, layout: str, stream: int, launcher,
                     by_pairs: bool = False, targets=None, frame_height=None) -> None:
    """Enqueue gpumix.kernels.table_mix once: ``x`` into ``out``
    (DeviceArrays of one shape and dtype, NCHW or NHWC) by the device params
    table ``rows``, ``masks`` (B, H, W) or None. ``targets``: None, or
    (labels, targets, error flag, off value, on value) to write the soft
    targets in the same launch. ``frame_height``: video clips whose frames
    are stacked as the rows of one image, each frame this high."""
    from gpumix import runtime
    from gpumix.kernels import table_mix

    (b, n_rows, n_cols), h, cstride = row_geometry(x.shape, layout)
    h = h if frame_height is None else frame_height
    if targets is None:
        labels, out_targets, flag = runtime.kept(launcher, "no_targets", lambda: (
            launcher.empty(1, np.int64), launcher.empty((0, 1), np.float32),
            launcher.empty(1, np.int32)))
        off = on = np.float32(0.0)
    else:
        labels, out_targets, flag, off, on = targets
    grid, block = table_mix.cuda_grid(b, n_rows, n_cols, out_targets.shape[0],
                                      out_targets.shape[1])
    runtime.launch(table_mix.cuda_kernel, grid, block, stream,
                   (x.reshape(b, n_rows, n_cols), out.reshape(b, n_rows, n_cols), rows,
                    no_mask(launcher) if masks is None else masks, labels, out_targets, flag,
                    h, cstride, x.dtype == np.uint8, by_pairs, np.float32(off),
                    np.float32(on)), launcher)
