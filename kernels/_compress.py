"""Picking chosen bytes out of a row with a bit mask: LLVM's masked
compress-store, for the CPU kernels whose outputs read an increasing
subset of a source row (a downscale: ResizeMix's nearest pixels and
bilinear taps). Values of any width are picked as their bytes.

``compress_store(dst, src, mask)`` stores, one after another at ``dst``,
the bytes of the 64 at ``src`` whose bit is set in the uint64 ``mask``
(bit i: byte i). x86 CPUs with AVX-512 VBMI2 do this in one instruction
(``vpcompressb``), where a gather loads one value at a time. Elsewhere
LLVM expands it into a test and a store per byte (the same result,
without the speed), so kernels take this route only where :data:`NATIVE`
says the CPU has the instruction.

A row is taken in chunks of 64 bytes (:func:`plan_row`): the chunks at
0, 64, 128, ... that fit, then, where the row's length is not a multiple
of 64, one last chunk ending at the row's end that holds only the
positions no earlier chunk had. Every load stays inside the row.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import binding as _llvm_binding, ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

CHUNK_BYTES = 64


def _target_has(feature: str) -> bool:
    """Whether the CPU Numba compiles for has ``feature`` (an LLVM name):
    NUMBA_CPU_FEATURES when set, else the host's own features unless
    NUMBA_CPU_NAME names another CPU."""
    if numba.config.CPU_FEATURES:
        return f"+{feature}" in numba.config.CPU_FEATURES.split(",")
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    return bool(_llvm_binding.get_host_cpu_features().get(feature, False))


NATIVE = _target_has("avx512vbmi2")  # vpcompressb: one instruction per chunk


@intrinsic
def compress_store(typingctx, dst, src, mask):
    """Store the bytes of the 64 at address ``src`` that ``mask``'s bits
    choose, contiguously at address ``dst``."""
    if not all(isinstance(t, types.Integer) for t in (dst, src, mask)):
        return None
    chunk = ir.VectorType(ir.IntType(8), CHUNK_BYTES)

    def codegen(context, builder, signature, args):
        flags, pointer = ir.VectorType(ir.IntType(1), CHUNK_BYTES), cgutils.voidptr_t
        store = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [chunk, pointer, flags]),
            f"llvm.masked.compressstore.v{CHUNK_BYTES}i8")
        values = builder.load(builder.inttoptr(args[1], chunk.as_pointer()), align=1)
        chosen = builder.bitcast(args[2], flags)  # the uint64's bits, lowest first
        builder.call(store, [values, builder.inttoptr(args[0], pointer), chosen])
        return context.get_dummy_value()

    return types.void(dst, src, types.uint64), codegen


@njit(cache=True, nogil=True)
def new_plans(n_plans, row_bytes):
    """Room for ``n_plans`` plans of rows of ``row_bytes`` (>= 64) bytes:
    (starts, masks, counts, n_chunks)."""
    size = row_bytes // CHUNK_BYTES + 1
    return (np.empty((n_plans, size), np.int64), np.empty((n_plans, size), np.uint64),
            np.empty((n_plans, size), np.int64), np.empty(n_plans, np.int64))


@njit(cache=True, nogil=True)
def plan_row(positions, row_bytes, plans, which):
    """Make plan ``which`` of ``plans`` (:func:`new_plans`): the chunks that
    pick the bytes at ``positions`` (strictly increasing, in [0,
    row_bytes)) out of a row of ``row_bytes`` >= 64 bytes. Each chunk has
    its first byte, its mask and the number of bytes it stores."""
    starts, masks, counts, n_chunks = plans
    n_full = row_bytes // CHUNK_BYTES
    n_chunks[which] = n_full + (1 if row_bytes % CHUNK_BYTES else 0)
    for c in range(n_chunks[which]):
        starts[which, c] = c * CHUNK_BYTES if c < n_full else row_bytes - CHUNK_BYTES
        masks[which, c] = 0
        counts[which, c] = 0
    for p in positions:
        c = p // CHUNK_BYTES  # past the last whole chunk: the end chunk, number n_full
        masks[which, c] |= np.uint64(1) << np.uint64(p - starts[which, c])
        counts[which, c] += 1


@njit(inline="always")
def compress_row(dst, src, plans, which):
    """Store the bytes that plan ``which`` of ``plans`` picks from the row
    at address ``src``, one after another from address ``dst``. Addresses
    and plan indices, not array views: a view made per row costs two
    atomic reference counts, more than the row's stores."""
    starts, masks, counts, n_chunks = plans
    for c in range(n_chunks[which]):
        compress_store(dst, src + starts[which, c], masks[which, c])
        dst += counts[which, c]


@njit(inline="always")
def strictly_increasing(values) -> bool:
    for k in range(1, values.shape[0]):
        if values[k] <= values[k - 1]:
            return False
    return True


@njit(inline="always")
def byte_positions(positions, itemsize):
    """The bytes of the values at ``positions`` of a row of ``itemsize``-byte values."""
    out = np.empty(positions.shape[0] * itemsize, np.int64)
    for k in range(positions.shape[0]):
        for j in range(itemsize):
            out[k * itemsize + j] = positions[k] * itemsize + j
    return out
