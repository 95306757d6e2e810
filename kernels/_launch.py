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
Python threads, one per core, the calling thread taking the first. Not
Numba's ``parallel=True``: its OpenMP workers spin after every parallel
loop, and in a data loader, where DALI's thread pool and NumPy's FFT want
the same cores a moment later, that spinning cost about 30 ms of CPU time
per batch of FMix masks here (benchmarks/README.md). Pool threads sleep
when idle, and any number of callers (two pipelines, a DALI thread and the
training loop) can share the pool: tasks never wait on other tasks.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32))
LAYOUTS = ("NCHW", "NHWC")

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
    """

    def __init__(self, pyfunc):
        self.pyfunc = pyfunc
        self._kernel = None

    @property
    def kernel(self):
        if self._kernel is None:
            from numba import cuda

            self._kernel = cuda.jit(self.pyfunc)
        return self._kernel

    def launch_rows(self, n_rows: int, row_length: int, stream, *args) -> None:
        """Launch over ``n_rows`` rows of ``row_length`` columns on ``stream``."""
        if n_rows == 0:
            return
        grid, block = row_grid(n_rows, row_length)
        if stream is None:
            self.kernel[grid, block](*args)
        else:
            self.kernel[grid, block, stream](*args)


def as_index_array(indices) -> np.ndarray:
    """Sample indices as a contiguous int64 array."""
    return np.ascontiguousarray(indices, dtype=np.int64)


def float16_via_float32(cpu_func):
    """Run a CPU kernel on float16 data by widening to float32 and back.

    Numba's CPU target has no float16 type. Widening is exact and the final
    cast rounds to nearest even, which is what the CUDA kernels' float32 ->
    float16 store does, so the results agree.
    """

    def run(x, *args, out):
        if x.dtype == np.float16:
            wide_out = out.astype(np.float32)
            cpu_func(x.astype(np.float32), *args, out=wide_out)
            out[...] = wide_out.astype(np.float16)
            return out
        return cpu_func(x, *args, out=out)

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


def run_parallel(function, n_items: int, *args, min_items: int = 1) -> None:
    """Call ``function(*args, lo, hi)`` over contiguous slices covering
    ``range(n_items)``, one slice per core, concurrently.

    ``function`` must release the GIL for the slices to overlap (Numba
    ``nogil`` kernels, NumPy's FFT). Slices hold at least ``min_items``
    items; the calling thread runs the first one, then waits for the rest.
    """
    workers = min(cpu_workers(), n_items // max(1, min_items))
    if workers <= 1:
        if n_items > 0:
            function(*args, 0, n_items)
        return
    bounds = [n_items * w // workers for w in range(workers + 1)]
    futures = [_pool().submit(function, *args, lo, hi)
               for lo, hi in zip(bounds[1:-1], bounds[2:])]
    try:
        function(*args, bounds[0], bounds[1])
    finally:
        wait(futures)  # every slice has finished before the caller goes on
    for future in futures:
        future.result()  # re-raises a slice's error


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
