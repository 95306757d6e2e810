"""The CUDA runtime of the fast paths: device array views, prepacked launch
records, pinned uploads, and the launcher that runs them.

A call of a fast path goes down once: the front door (gpumix.torch.apply,
gpumix.torch.Mixup, gpumix.dali.mix on the GPU) validates its input on the
host (dtype, shape, layout: no device read), packs the params table, and
hands this module :class:`DeviceArray` views and scalars; :func:`launch`
finds the kernel's :class:`LaunchRecord` for that signature, patches the
pointers and scalars into it and enqueues it on the caller's stream.

Launch records. Numba lays a kernel's arguments out as a flat parameter list
(an array is meminfo, parent, nitems, itemsize, data, shape..., strides...).
A record builds that list once per (kernel, argument types, shapes) as one
block of 8-byte slots with a pointer array over it, the ``kernelParams`` of
``cuLaunchKernel``; a call rewrites only the slots that change (data
pointers, scalars) and passes the block's address to the driver, which
copies the values at launch. tests/test_ptx.py checks every record's slots
against the compiled kernel's PTX parameter list.

Launchers. :class:`CudaLauncher` compiles the kernel once per device with
Numba, loads the cubin, launches through the CUDA driver, and uploads host
tables through torch's pinned host allocator (which keeps a pinned block
until the copy out of it has finished, so nothing here waits for the
device). :class:`RecordingLauncher` does the same bookkeeping but records
each launch and upload instead of running it: the host path can then be
tested and timed on a machine without a GPU, and it refuses any call that
would synchronise.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class DeviceArray:
    """What a launch needs of a device array: address, shape, byte strides,
    dtype; ``owner`` keeps the memory alive while the view is in use."""

    ptr: int
    shape: tuple
    strides: tuple
    dtype: np.dtype
    owner: object = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, array) -> "DeviceArray":
        """A view of a torch CUDA tensor, a CuPy array or a DeviceArray."""
        if isinstance(array, DeviceArray):
            return array
        if type(array).__module__.startswith("torch"):
            dtype = np.dtype(str(array.dtype).removeprefix("torch."))
            return cls(array.data_ptr(), tuple(array.shape),
                       tuple(s * dtype.itemsize for s in array.stride()), dtype, array)
        return cls(array.data.ptr, tuple(array.shape), tuple(array.strides),
                   np.dtype(array.dtype), array)

    @classmethod
    def on_host(cls, array: np.ndarray) -> "DeviceArray":
        """A host array seen as a device one (a recording launcher never reads it)."""
        return cls(array.ctypes.data, array.shape, array.strides, array.dtype, array)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def is_c_contiguous(self) -> bool:
        expected = self.dtype.itemsize
        for n, s in zip(reversed(self.shape), reversed(self.strides)):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True

    def reshape(self, *shape) -> "DeviceArray":
        """A C-contiguous view with another shape (same elements)."""
        strides, step = [], self.dtype.itemsize
        for n in reversed(shape):
            strides.append(step)
            step *= n
        return DeviceArray(self.ptr, tuple(shape), tuple(reversed(strides)), self.dtype,
                           self.owner)

    def numba_type(self):
        from numba import from_dtype, types

        return types.Array(from_dtype(self.dtype), self.ndim,
                           "C" if self.is_c_contiguous() else "A")


def _scalar_type(value):
    import numba

    if isinstance(value, (bool, np.bool_)):
        return numba.types.boolean
    if isinstance(value, int):
        return numba.types.int64
    if isinstance(value, float):
        return numba.types.float64
    return numba.typeof(value)


def signature_key(args) -> tuple:
    """What decides a record: array dtypes, shapes and strides, scalar types."""
    return tuple((a.dtype.str, a.shape, a.strides) if isinstance(a, DeviceArray) else type(a)
                 for a in args)


class LaunchRecord:
    """A kernel's parameter block for one signature, patched per call."""

    def __init__(self, args):
        self.argtypes = tuple(a.numba_type() if isinstance(a, DeviceArray) else _scalar_type(a)
                              for a in args)
        self.kinds: list[tuple[str, int]] = []  # (kind, bytes) per parameter, PTX order
        self.writers = []  # per argument: (slot of the data pointer or value, NumPy type)
        fixed = []
        for a, t in zip(args, self.argtypes):
            if isinstance(a, DeviceArray):
                first = len(self.kinds)
                self.kinds += [("i", 8)] * (5 + 2 * a.ndim)
                fixed += [(first + 2, np.int64(a.size)), (first + 3, np.int64(a.dtype.itemsize))]
                fixed += [(first + 5 + d, np.int64(n)) for d, n in enumerate(a.shape)]
                fixed += [(first + 5 + a.ndim + d, np.int64(s)) for d, s in enumerate(a.strides)]
                self.writers.append((first + 4, None))
            else:
                scalar = np.dtype(t.name).type
                width = np.dtype(scalar).itemsize
                self.writers.append((len(self.kinds), scalar))
                self.kinds.append(("f" if np.dtype(scalar).kind == "f" else "i", width))
        self.values = np.zeros(max(1, len(self.kinds)), np.uint64)
        self.pointers = (self.values.ctypes.data
                         + 8 * np.arange(self.values.size, dtype=np.uint64)).astype(np.uint64)
        self.views = {}
        for slot, value in fixed:
            self.values[slot] = np.uint64(value)
        self.lock = threading.Lock()

    def _view(self, scalar):
        view = self.views.get(scalar)
        if view is None:
            view = self.views[scalar] = self.values.view(scalar)
        return view

    def patch(self, args) -> None:
        """Write the data pointers and scalars of ``args`` (same signature)."""
        values = self.values
        for (slot, scalar), a in zip(self.writers, args):
            if scalar is None:
                values[slot] = a.ptr
            else:
                view = self._view(scalar)
                view[slot * (8 // view.itemsize)] = a

    @property
    def address(self) -> int:
        """``kernelParams`` for ``cuLaunchKernel``: the address of the pointer array."""
        return self.pointers.ctypes.data


_RECORDS: dict = {}


def launch(kernel, grid, block, stream: int, args, launcher=None) -> None:
    """Enqueue ``kernel`` (a gpumix.kernels LazyCudaKernel) over ``grid`` x
    ``block`` on ``stream`` (a raw handle) with ``args`` (DeviceArrays and
    scalars), through the active launcher."""
    launcher = launcher or active_launcher()
    key = (id(kernel), launcher.device_key(), signature_key(args))
    entry = _RECORDS.get(key)
    if entry is None:
        record = LaunchRecord(args)
        entry = _RECORDS[key] = (record, launcher.function(kernel, record.argtypes))
    record, function = entry
    with record.lock:  # the block is copied by the driver at launch; then it is free again
        record.patch(args)
        launcher.launch(function, grid, block, stream, record)


class CudaLauncher:
    """Launches through the CUDA driver; uploads through torch's pinned memory."""

    def __init__(self):
        self._functions = {}

    def device_key(self) -> int:
        import cupy

        return cupy.cuda.runtime.getDevice()

    def function(self, kernel, argtypes):
        """The kernel's CUfunction on the current device (Numba compiles, CuPy loads)."""
        key = (id(kernel), self.device_key(), argtypes)
        if key not in self._functions:
            from cupy.cuda import function as cupy_function

            compiled = kernel.kernel.compile(argtypes)
            library = compiled._codelibrary
            if getattr(library, "_setup_functions", None):
                raise RuntimeError(f"{kernel.pyfunc.__name__} needs Numba's own module set-up")
            cubin = library.get_cubin()
            module = cupy_function.Module()
            module.load(bytes(getattr(cubin, "code", cubin)))
            self._functions[key] = (module, module.get_function(library._entry_name))
        return self._functions[key][1]

    def launch(self, function, grid, block, stream: int, record: LaunchRecord) -> None:
        from cuda.bindings import driver

        grid = tuple(grid) + (1,) * (3 - len(grid))
        (result,) = driver.cuLaunchKernel(function.ptr, *grid, block, 1, 1, 0, stream,
                                          record.address, 0)
        if result != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuLaunchKernel failed: {result!r}")

    def upload(self, host: np.ndarray, device) -> DeviceArray:
        """A device copy of a small host array, enqueued on torch's current stream."""
        import torch

        host = np.ascontiguousarray(host)
        pinned = torch.empty(host.nbytes, dtype=torch.uint8, pin_memory=True)
        pinned.numpy()[:] = host.reshape(-1).view(np.uint8)
        copy = torch.empty(host.nbytes, dtype=torch.uint8, device=device)
        copy.copy_(pinned, non_blocking=True)
        return DeviceArray(copy.data_ptr(), host.shape, host.strides, host.dtype, copy)

    def empty(self, shape, dtype, stream: int | None = None) -> DeviceArray:
        """A zeroed device array on the current device, allocated and zeroed
        on ``stream`` (None: CuPy's current stream, for placeholders no
        kernel reads), so that kernels there are ordered after the zeroing
        and the memory pool reuses the block only after them."""
        import cupy

        from gpumix.kernels._launch import cupy_stream

        with cupy_stream(stream):
            return DeviceArray.of(cupy.zeros(shape, dtype))

    def fmix_masks(self, rows, shape, stream: int):
        """FMix masks of a host params table on ``stream``, or None without FMix."""
        from gpumix.fmix import masks_from_table_cuda

        masks = masks_from_table_cuda(rows, shape, stream)
        return None if masks is None else DeviceArray.of(masks)

    def saliency_peaks(self, images, layout: str, samples, stream: int) -> DeviceArray:
        """SaliencyMix peaks (S, 2) of the listed samples, made on ``stream``."""
        from gpumix.saliency import device_peaks

        return device_peaks(images, layout, samples, stream, self)

    def flag(self):
        """A pinned int32 flag the device can write (unified addressing) and the host read."""
        import torch

        return torch.zeros(1, dtype=torch.int32, pin_memory=True).numpy()


class SynchronizingCall(RuntimeError):
    """A recorded host path asked for something that would wait for the device."""


class RecordingLauncher:
    """Does everything a launch does on the host, then records it instead.

    ``launches``: (kernel name, grid, block, stream, parameter values) per
    launch; ``uploads``: the bytes of each upload; ``allocations``: (shape,
    stream) of each device array asked for; the last ``keep`` of each
    (at least), so that a long timed run reuses freed host memory as the
    pinned allocator of a real upload does, instead of timing fresh pages.
    ``launch_count`` and ``upload_count`` count them all. Any call that would
    wait for the device raises :class:`SynchronizingCall`.
    """

    def __init__(self, keep: int = 256):
        self.launches: list = []
        self.uploads: list = []
        self.allocations: list = []
        self.launch_count = self.upload_count = 0
        self.keep = keep
        self._buffers = {}

    def _record(self, records: list, entry) -> None:
        records.append(entry)
        if len(records) > 2 * self.keep:
            del records[:-self.keep]

    def _record_launch(self, entry) -> None:
        self.launch_count += 1
        self._record(self.launches, entry)

    def device_key(self) -> str:
        return "recorded"

    def function(self, kernel, argtypes):
        return kernel.pyfunc.__name__

    def launch(self, function, grid, block, stream, record: LaunchRecord) -> None:
        self._record_launch((function, tuple(grid), block, stream, record.values.copy()))

    def upload(self, host: np.ndarray, device=None) -> DeviceArray:
        host = np.array(host, copy=True, order="C")
        self.upload_count += 1
        self._record(self.uploads, host)
        return DeviceArray.on_host(host)

    def empty(self, shape, dtype, stream: int | None = None) -> DeviceArray:
        """A host buffer kept per shape and dtype (never read), as a device
        pool hands back its blocks: a fresh host allocation of a batch's
        masks would time the host's memory, not the path."""
        key = (tuple(np.atleast_1d(shape).tolist()), np.dtype(dtype).str)
        self._record(self.allocations, (key[0], stream))
        if key not in self._buffers:
            self._buffers[key] = np.zeros(shape, dtype)
        return DeviceArray.on_host(self._buffers[key])

    def fmix_masks(self, rows, shape, stream):
        """Recorded as one step (the normals kernel, cuFFT and the selection)."""
        from gpumix.fmix import table_fmix

        if table_fmix(rows) is None:
            return None
        self._record_launch(("fmix_masks", None, None, stream, None))
        return self.empty((len(rows), *shape), np.float32)

    def saliency_peaks(self, images, layout, samples, stream):
        """Recorded as one step (the thumbnail kernel, cuFFT and the arg-max)."""
        self._record_launch(("saliency_peaks", None, None, stream, None))
        return self.empty((samples.shape[0], 2), np.int64)

    def flag(self):
        return np.zeros(1, np.int32)

    def synchronize(self, *args) -> None:
        raise SynchronizingCall("a recorded host path must not synchronise")


_KEPT: dict = {}


def kept(launcher, name: str, make):
    """A device array made once per device for the process by ``make()``
    (placeholders, normalisation constants), kept alive here."""
    key = (launcher.device_key(), name)
    value = _KEPT.get(key)
    if value is None:
        value = _KEPT[key] = make()
    return value


_LOCAL = threading.local()
_DEFAULT = None


def active_launcher():
    """The launcher of this thread (see :func:`use_launcher`), else the CUDA one."""
    global _DEFAULT
    launcher = getattr(_LOCAL, "launcher", None)
    if launcher is not None:
        return launcher
    if _DEFAULT is None:
        _DEFAULT = CudaLauncher()
    return _DEFAULT


@contextlib.contextmanager
def use_launcher(launcher):
    """Run the fast paths of this thread through ``launcher`` (e.g. a RecordingLauncher)."""
    previous = getattr(_LOCAL, "launcher", None)
    _LOCAL.launcher = launcher
    try:
        yield launcher
    finally:
        _LOCAL.launcher = previous
