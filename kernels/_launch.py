"""Host-side plumbing shared by every kernel file: views, checks, launches.

Images of either layout are handled as 3-D row views ``(B, R, L)``:

* NCHW ``(B, C, H, W)`` -> ``(B, C*H, W)``: row r is image row ``r % H``,
  column k is pixel ``k``;
* NHWC ``(B, H, W, C)`` -> ``(B, H, W*C)``: row r is image row ``r`` (which
  equals ``r % H``), column k is pixel ``k // C``;
* dense maps ``(B, H, W)`` -> themselves (one channel, NCHW-like).

So for every layout the image row is ``r % H`` and the pixel column is
``k // cstride`` with ``cstride`` = C for NHWC and 1 otherwise. Kernels loop
over rows and columns and never need the layout itself.

CUDA kernels are compiled lazily (decorating with ``cuda.jit`` is free, the
first launch compiles for the device's architecture), so importing a kernel
file needs no GPU.

CPU kernels are serial ``nogil`` Numba loops over a slice ``[lo, hi)`` of
their samples; :func:`run_parallel` runs the slices on a shared pool of
Python threads, one per core, the calling thread included: up to four
slices per core, each claimed by whichever thread is free. Not
Numba's ``parallel=True``: its OpenMP workers spin after every parallel
loop, and in a data loader, where DALI's thread pool and the FMix FFT want
the same cores a moment later, that spinning cost about 30 ms of CPU time
per batch of FMix masks here (benchmarks/README.md). Pool threads sleep
when idle, and any number of callers (two pipelines, a DALI thread and the
training loop) can share the pool: tasks never wait on other tasks.

Intermediate buffers that every batch needs again (FMix spectra and grey
images, a DALI step's output) come from :func:`scratch`: arrays kept
between calls, per thread or in an owner's store. Fresh multi-megabyte
allocations are not free: glibc hands big blocks back to the kernel when
they are freed, and faulting 10 MB of pages back in cost more than the FFT
itself in this VM (a batch of 64 FMix masks: 21 ms with fresh buffers,
12 ms reusing them; benchmarks/README.md).
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numba import njit, types
from numba.core import cgutils
from llvmlite import ir
from numba.extending import intrinsic

IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32))

# CUDA launch shape: 256 threads along a row; rows spread over grid.y.
THREADS_PER_BLOCK = 256
MAX_GRID_Y = 65535


@dataclass(frozen=True)
class RowView:
    """A (B, R, L) view of an image batch plus what maps rows/columns to pixels."""

    rows: object  # array (B, R, L), same memory as the input
    height: int  # H: image row of row r is r % height
    cstride: int  # pixel column of column k is k // cstride


def spatial_shape(shape, layout: str) -> tuple[int, int]:
    """(H, W) of an image batch shape in ``layout`` ("NCHW", "NHWC" or "NHW")."""
    if layout == "NCHW":
        return shape[2], shape[3]
    if layout == "NHWC":
        return shape[1], shape[2]
    if layout == "NHW":
        return shape[1], shape[2]
    raise ValueError(f"layout must be 'NCHW', 'NHWC' or 'NHW', got {layout!r}")


def row_geometry(shape, layout: str) -> tuple[tuple[int, int, int], int, int]:
    """((B, R, L), height, cstride) of the row view of a batch of ``shape``
    in layout "NCHW" or "NHWC", without an array (for device views)."""
    if layout == "NCHW":
        b, c, h, w = shape
        return (b, c * h, w), h, 1
    b, h, w, c = shape
    return (b, h, w * c), h, c


def row_view(x, layout: str) -> RowView:
    """Reshape a C-contiguous batch into the kernels' (B, R, L) row view."""
    if layout == "NCHW":
        b, c, h, w = x.shape
        return RowView(x.reshape(b, c * h, w), h, 1)
    if layout == "NHWC":
        b, h, w, c = x.shape
        return RowView(x.reshape(b, h, w * c), h, c)
    if layout == "NHW":
        return RowView(x, x.shape[1], 1)
    raise ValueError(f"layout must be 'NCHW', 'NHWC' or 'NHW', got {layout!r}")


def numpy_dtype(dtype) -> np.dtype | None:
    """NumPy dtype of a NumPy, CuPy or torch dtype (None if NumPy has no such type)."""
    try:
        return np.dtype(dtype)
    except TypeError:
        try:
            return np.dtype(str(dtype).removeprefix("torch."))
        except TypeError:
            return None


def check_image_dtype(dtype, name: str = "images") -> None:
    """TypeError unless dtype is one of the image dtypes the kernels support."""
    if numpy_dtype(dtype) not in IMAGE_DTYPES:
        raise TypeError(f"{name} must have dtype uint8, float16 or float32, got {dtype}")


def row_grid(n_rows: int, row_length: int) -> tuple[tuple[int, int], int]:
    """(grid, block) for the row/column grid-stride loops of the CUDA kernels."""
    blocks_x = max(1, min(-(-row_length // THREADS_PER_BLOCK), 32))
    blocks_y = max(1, min(n_rows, MAX_GRID_Y))
    return (blocks_x, blocks_y), THREADS_PER_BLOCK


class LazyCudaKernel:
    """A CUDA kernel compiled on first launch from a plain Python function.

    ``pyfunc`` stays available for ``numba.cuda.compile_ptx`` (PTX tests) and
    the simulator.

    Launches go through :meth:`launch`. The first launch of each argument
    signature goes through Numba's dispatcher, which compiles; later launches
    whose arguments are all CuPy / Numba device arrays and scalars call the
    same compiled cubin through CuPy's driver wrapper (:class:`DirectLaunch`):
    Numba's dispatcher spends about 100-200 us of Python per launch on typing
    and argument marshalling (measured on an H100 host: 760 us for one
    ``mix_images`` call of three small uploads and one launch), more than
    the kernels themselves take on a batch of 64 images.
    """

    def __init__(self, pyfunc):
        self.pyfunc = pyfunc
        self._kernel = None
        self._direct = {}  # argument key -> DirectLaunch, or None where unavailable
        self.direct_failure = None  # why the last DirectLaunch could not be built

    @property
    def kernel(self):
        if self._kernel is None:
            from numba import cuda

            self._kernel = cuda.jit(self.pyfunc)
        return self._kernel

    def launch(self, grid, block, stream, *args) -> None:
        """Launch with ``grid`` x ``block`` on ``stream`` (a Numba stream, a
        :class:`StreamHandle`, or None for the default stream)."""
        key = argument_key(args)
        if key is not None:  # a module is loaded per device
            key = (_current_device(), key)
        direct = self._direct.get(key) if key is not None else None
        if direct is not None:
            direct(grid, block, stream, args)
            return
        if stream is None:
            self.kernel[grid, block](*args)
        else:
            numba_stream = stream.numba() if isinstance(stream, StreamHandle) else stream
            self.kernel[grid, block, numba_stream](*args)
        if key is not None and key not in self._direct:
            try:
                self._direct[key] = DirectLaunch.of(self.kernel, args)
            except Exception as error:  # noqa: BLE001 - any failure keeps Numba's path
                self._direct[key] = None
                self.direct_failure = f"{type(error).__name__}: {error}"

    def launch_rows(self, n_rows: int, row_length: int, stream, *args) -> None:
        """Launch over ``n_rows`` rows of ``row_length`` columns on ``stream``."""
        if n_rows == 0:
            return
        grid, block = row_grid(n_rows, row_length)
        self.launch(grid, block, stream, *args)


def _current_device() -> int:
    import cupy

    return cupy.cuda.runtime.getDevice()


def _device_array_kind(a):
    """'cupy' or 'numba' for the device arrays a direct launch takes, else None."""
    module = type(a).__module__
    if module.startswith("cupy"):
        return "cupy" if hasattr(a, "data") and hasattr(a.data, "ptr") else None
    if module.startswith("numba") and hasattr(a, "device_ctypes_pointer"):
        return "numba"
    return None


def argument_key(args):
    """A hashable key of the Numba types ``args`` would get, cheap to compute,
    or None if an argument is not a device array or a plain scalar."""
    key = []
    for a in args:
        if isinstance(a, (bool, int, float, np.generic)):
            key.append(type(a))
        elif (kind := _device_array_kind(a)) is not None:
            c, f = (a.flags.c_contiguous, a.flags.f_contiguous) if kind == "cupy" else \
                (a.is_c_contiguous(), a.is_f_contiguous())
            key.append((np.dtype(a.dtype).str, len(a.shape), "C" if c else "F" if f else "A"))
        else:
            return None
    return tuple(key)


def _device_pointer(a) -> int:
    if hasattr(a, "device_ctypes_pointer"):
        return a.device_ctypes_pointer.value or 0
    if isinstance(a, np.ndarray):  # only to lay out parameters (tests); never launched
        return a.ctypes.data
    return a.data.ptr


_NULL = np.uint64(0)


def flatten_array(a, out: list) -> None:
    """Append a device array as the parameters of Numba's array model: meminfo,
    parent, nitems, itemsize, data pointer, shape, strides (bytes)."""
    out += (_NULL, _NULL, np.int64(a.size), np.int64(np.dtype(a.dtype).itemsize),
            np.uint64(_device_pointer(a)))
    out += [np.int64(n) for n in a.shape]
    out += [np.int64(s) for s in a.strides]


def parameter_converters(argtypes) -> list:
    """For each Numba argument type, a function appending that argument's
    kernel parameters (as NumPy scalars of the parameter's width) to a list."""
    from numba import types

    converters = []
    for t in argtypes:
        if isinstance(t, types.Array):
            converters.append(flatten_array)
        elif isinstance(t, (types.Boolean, types.Integer, types.Float)):
            scalar = np.dtype(t.name).type
            converters.append(lambda value, out, scalar=scalar: out.append(scalar(value)))
        else:
            raise TypeError(f"no direct launch for a kernel argument of type {t}")
    return converters


class StreamHandle:
    """A raw CUDA stream handle in the shapes CuPy takes (``.ptr``, the CUDA
    stream protocol): Numba's stream objects name it differently per version."""

    __slots__ = ("ptr",)

    def __init__(self, stream):
        if hasattr(stream, "ptr"):  # CuPy streams, StreamHandle
            self.ptr = int(stream.ptr)
            return
        handle = 0 if stream is None else getattr(stream, "handle", stream)
        self.ptr = int(getattr(handle, "value", handle) or 0)

    def numba(self):
        """The same stream as a Numba stream."""
        from numba import cuda

        return cuda.external_stream(self.ptr)

    def __cuda_stream__(self):
        return (0, self.ptr)


def cupy_stream(stream):
    """A context making CuPy work on ``stream`` (a Numba stream or anything
    with a raw handle; None: CuPy's current stream), so its copies and
    allocations stay ordered with the kernels launched there."""
    import contextlib

    if stream is None:
        return contextlib.nullcontext()
    import cupy as cp

    handle = StreamHandle(stream)
    if hasattr(cp.cuda.Stream, "from_external"):
        return cp.cuda.Stream.from_external(handle)
    return cp.cuda.ExternalStream(handle.ptr)


STAGING_SLOTS = 8  # pinned staging buffers of the process, used in turn
STAGING_LIMIT = 1 << 20  # bytes per call staged through them


class _PinnedSlot:
    """A page-locked host buffer and the event of the last copy out of it."""

    def __init__(self, nbytes: int):
        import cupy as cp

        self.memory = cp.cuda.alloc_pinned_memory(nbytes)
        self.buffer = np.frombuffer(self.memory, np.uint8, nbytes)
        self.event = cp.cuda.Event(disable_timing=True)


# One ring per device for the process, not one per thread: DALI runs
# python_function callbacks on threads whose Python state (threading.local
# included) is new at every call. Per device: a slot's event can only be
# recorded on a stream of the device it was made on.
_STAGING: dict = {}
_STAGING_LOCK = threading.Lock()


def _staged_copy(parts, offsets, total: int, stream):
    """Pack ``parts`` into the next pinned slot (a fresh one if its last copy
    is still queued) and copy them to a new device block on ``stream``;
    returns the block. Nothing here waits for the device."""
    import cupy as cp

    with _STAGING_LOCK:
        ring = _STAGING.setdefault(cp.cuda.runtime.getDevice(),
                                   {"slots": [None] * STAGING_SLOTS, "next": 0, "retired": []})
        i = ring["next"]
        ring["next"] = (i + 1) % STAGING_SLOTS
        slot = ring["slots"][i]
        # A slot whose last copy is still queued is replaced, never waited for,
        # and kept until that copy is done (its memory must not be reused).
        if slot is None or slot.buffer.size < total or not slot.event.done:
            if slot is not None:
                ring["retired"].append(slot)
            slot = ring["slots"][i] = _PinnedSlot(max(total, 4096))
        ring["retired"] = [old for old in ring["retired"] if not old.event.done]
        for part, offset in zip(parts, offsets):
            slot.buffer[offset:offset + part.nbytes] = part.reshape(-1).view(np.uint8)
        device = cp.empty(total, cp.uint8)
        device.set(slot.buffer[:total], stream=stream)
        slot.event.record(stream)
    return device


def upload_many(arrays, stream=None) -> list:
    """CuPy copies of small host arrays, given as ``(array, dtype)`` pairs, in
    one asynchronous copy on ``stream``: packed (8-byte aligned) into a
    pinned staging buffer, copied to one block of CuPy's memory pool, and
    returned as views of it, where separate copies from pageable memory
    would each be a synchronous ``cudaMemcpy``."""
    import cupy as cp

    parts = [np.ascontiguousarray(a, dtype=d) for a, d in arrays]
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += -(-part.nbytes // 8) * 8
    total = max(total, 8)
    with cupy_stream(stream):
        if total > STAGING_LIMIT:  # big arrays: their own (pageable) copies
            return [cp.asarray(part) for part in parts]
        device = _staged_copy(parts, offsets, total, cp.cuda.get_current_stream())
    return [device[offset:offset + part.nbytes].view(part.dtype).reshape(part.shape)
            for part, offset in zip(parts, offsets)]


class DirectLaunch:
    """One compiled signature of a Numba CUDA kernel, launched through CuPy.

    Numba's compiled cubin is loaded into a CuPy module once; each launch
    flattens the arguments into the kernel's parameters exactly as Numba's
    data model lays them out (tests/test_ptx.py checks the layout against the
    PTX parameter list) and calls ``cuLaunchKernel`` on the caller's stream.
    """

    def __init__(self, function, converters):
        self.function = function
        self.converters = converters

    @classmethod
    def of(cls, dispatcher, args) -> "DirectLaunch":
        from cupy.cuda import function as cupy_function

        argtypes = tuple(dispatcher.typeof_pyval(a) for a in args)
        compiled = dispatcher.overloads[argtypes]
        library = compiled._codelibrary
        if getattr(library, "_setup_functions", None):
            raise RuntimeError("the module needs Numba's own set-up")
        cubin = library.get_cubin()
        module = cupy_function.Module()
        module.load(bytes(getattr(cubin, "code", cubin)))  # cuda.core ObjectCode, or bytes
        return cls(module.get_function(library._entry_name), parameter_converters(argtypes))

    def parameters(self, args) -> list:
        flat = []
        for convert, value in zip(self.converters, args):
            convert(value, flat)
        return flat

    def __call__(self, grid, block, stream, args) -> None:
        grid = tuple(grid) if isinstance(grid, tuple) else (grid,)
        block = tuple(block) if isinstance(block, tuple) else (block,)
        if not isinstance(stream, StreamHandle):
            stream = StreamHandle(stream)
        self.function(grid, block, self.parameters(args), stream=stream)


def as_index_array(indices) -> np.ndarray:
    """Sample indices as a contiguous int64 array."""
    return np.ascontiguousarray(indices, dtype=np.int64)


def float16_via_float32(cpu_func):
    """Run a CPU kernel on float16 data by widening to float32 and back.

    Numba's CPU target has no float16 type. Widening is exact and the final
    cast rounds to nearest even, which is what the CUDA kernels' float32 ->
    float16 store does, so the results agree.
    """

    def run(x, *args, out, **options):
        if x.dtype == np.float16:
            wide_out = out.astype(np.float32)
            cpu_func(x.astype(np.float32), *args, out=wide_out, **options)
            out[...] = wide_out.astype(np.float16)
            return out
        return cpu_func(x, *args, out=out, **options)

    return run


def cpu_workers() -> int:
    """Threads the CPU kernels use: ``GPUMIX_NUM_THREADS`` if set, else the
    cores this process may run on (its CPU affinity)."""
    setting = os.environ.get("GPUMIX_NUM_THREADS", "").strip()
    if setting:
        if not setting.isdigit() or int(setting) < 1:
            raise ValueError(f"GPUMIX_NUM_THREADS must be a positive integer, got {setting!r}")
        return int(setting)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_SCRATCH = threading.local()


def scratch(name: str, shape, dtype, store: dict | None = None) -> np.ndarray:
    """A reusable array of ``shape`` and ``dtype`` (contents undefined).

    The same ``name`` in the same ``store`` returns the same memory (grown
    when a larger one is asked for), so use a name only for a buffer that is
    dead before its store is asked for that name again; never return one to
    a caller. The default store is the calling thread's; pass an owner's
    dict instead where calls are serialised anyway (a DALI operator never
    runs two iterations at once) to keep one set of buffers, not one per
    thread that happens to run it.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffers = _SCRATCH.__dict__.setdefault("buffers", {}) if store is None else store
    block = buffers.get(name)
    if block is None or block.size < nbytes:
        block = buffers[name] = np.empty(max(nbytes, 1), np.uint8)
    return block[:nbytes].view(dtype).reshape(shape)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(1, cpu_workers() - 1),
                                       thread_name_prefix="gpumix-cpu")
        return _POOL


def _forget_pool_in_child() -> None:
    """A forked child (a DataLoader worker, say) inherits the pool object but
    none of its threads; it must start its own or its tasks never run."""
    global _POOL, _POOL_LOCK
    _POOL = None
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


CHUNKS_PER_WORKER = 4
# Batches of less data than this (``item_bytes`` per item) run on the
# calling thread alone: one core mixes them in about the time a pool thread
# takes to wake (35-55 us here), so waiting for a helper gains nothing.
MIN_PARALLEL_BYTES = 2 << 20


class _Job:
    """The chunks of one run_parallel call, claimed one at a time by whoever
    is free: the caller starts at once, pool threads join as they wake."""

    def __init__(self, function, args, bounds):
        self.function, self.args, self.bounds = function, args, bounds
        self.claims = itertools.count()  # next() is atomic under the GIL
        self.left = len(bounds) - 1
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.error = None

    def work(self) -> None:
        outer = getattr(_IN_SLICE, "active", False)
        _IN_SLICE.active = True
        try:
            while (chunk := next(self.claims)) < len(self.bounds) - 1:
                self._run(chunk)
        finally:
            _IN_SLICE.active = outer

    def _run(self, chunk: int) -> None:
        try:
            if self.error is None:  # after a failure the rest are only counted
                self.function(*self.args, self.bounds[chunk], self.bounds[chunk + 1])
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            self.error = self.error or error
        finally:
            with self.lock:
                self.left -= 1
                if self.left == 0:
                    self.finished.set()


_IN_SLICE = threading.local()  # set while a thread runs a slice: nested calls run inline


def run_parallel(function, n_items: int, *args, min_items: int = 1,
                 item_bytes: int = 0) -> None:
    """Call ``function(*args, lo, hi)`` over contiguous slices covering
    ``range(n_items)``, on the calling thread and the pool, concurrently.

    ``function`` must release the GIL for the slices to overlap (Numba
    ``nogil`` kernels, ducc0's FFT). Slices hold at least ``min_items``
    items; where each item has ``item_bytes`` of data (an image batch's
    samples), less than MIN_PARALLEL_BYTES in all runs inline. There are up
    to ``CHUNKS_PER_WORKER`` slices per core, claimed dynamically: a pool
    thread that wakes late (35-55 us here) or is busy with another caller's
    work takes fewer, so the caller never idles waiting for it. Returns when
    every slice has run; re-raises the first error of any slice. Called from
    inside a slice, it runs inline: the cores are busy with the outer call
    already.
    """
    workers = cpu_workers()
    n_chunks = min(n_items // max(1, min_items), workers * CHUNKS_PER_WORKER)
    small = 0 < n_items * item_bytes < MIN_PARALLEL_BYTES
    if n_chunks <= 1 or workers == 1 or small or getattr(_IN_SLICE, "active", False):
        if n_items > 0:
            function(*args, 0, n_items)
        return
    job = _Job(function, args, [n_items * c // n_chunks for c in range(n_chunks + 1)])
    for _ in range(min(workers, n_chunks) - 1):
        _pool().submit(job.work)
    job.work()
    job.finished.wait()
    if job.error is not None:
        raise job.error


@intrinsic
def copy_bytes(typingctx, dst, src, nbytes):
    """``memcpy(dst, src, nbytes)`` for Numba nopython code, on integer
    addresses (``array.ctypes.data``): LLVM's memcpy intrinsic, so functions
    using it can still be cached (a ctypes pointer to libc's could not)."""
    if not all(isinstance(t, types.Integer) for t in (dst, src, nbytes)):
        return None

    def codegen(context, builder, signature, args):
        to_pointer = [builder.inttoptr(a, cgutils.voidptr_t) for a in args[:2]]
        cgutils.raw_memcpy(builder, to_pointer[0], to_pointer[1], args[2], 1)
        return context.get_dummy_value()

    return types.void(dst, src, nbytes), codegen


@intrinsic
def prefetch(typingctx, address):
    """Ask the CPU to bring the cache line at integer ``address`` closer
    (LLVM's prefetch intrinsic: a read, kept in every cache level). A hint
    only: it never faults and changes no result."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32, pointer = ir.IntType(32), cgutils.voidptr_t
        function = builder.module.declare_intrinsic(  # named for typed or opaque pointers
            "llvm.prefetch", [pointer], ir.FunctionType(ir.VoidType(), [pointer, i32, i32, i32]))
        # read (0), keep in every cache level (3), data (1)
        builder.call(function, [builder.inttoptr(args[0], pointer), ir.Constant(i32, 0),
                                ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(address), codegen


CACHE_LINE = 64


@njit(inline="always")
def prefetch_bytes(address, nbytes):
    """:func:`prefetch` every cache line of ``nbytes`` bytes at ``address``:
    for rows a loop will read soon that the hardware prefetcher cannot
    predict (rows scattered through an image, as a resize reads them)."""
    for offset in range(0, nbytes, CACHE_LINE):
        prefetch(address + offset)


@intrinsic
def float32_bits(typingctx, value):
    """The IEEE bits of a float32 as a uint32 (a bitcast, no conversion)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen
