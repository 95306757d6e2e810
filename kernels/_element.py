"""Per-element logic shared by the CPU and CUDA kernels.

Every kernel in this folder is two loops around the same few scalar
functions: a Numba CPU loop (over a slice of the samples, run on every core
by gpumix.kernels._launch.run_parallel) and a Numba CUDA loop
(grid-stride over rows and columns). The scalar functions are written once,
here, as plain Python, and compiled for each target by :func:`element_functions`:

* ``target="cpu"``: ``numba.njit`` functions, called from ``njit`` loops;
* ``target="cuda"``: ``numba.cuda.jit(device=True)`` functions. On a real
  device every product that is summed (a blend, a bilinear tap, a resize's
  source coordinate, a soft target) goes through libdevice's ``fmul_rn`` and
  ``fadd_rn``, so NVVM, which contracts a multiply and an add into an FMA by
  default, cannot: the CUDA result then rounds exactly like the CPU one
  (plain IEEE multiply, then add), which keeps outputs equal across backends
  (tests/test_ptx.py checks the PTX for FMAs). The CUDA simulator's
  libdevice is a stub, so under the simulator plain Python arithmetic
  (already IEEE) is used.

All arithmetic is float32 (``float32(...)`` casts are explicit so Numba never
widens to float64 behind our back); lam is the weight of the primary sample
(docs/semantics.md).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numba
from numba import float32, int64

# 2**23: adding then subtracting it rounds a float32 in [0, 2**23) to the
# nearest integer, ties to even, using the FPU's own rounding mode. Exact,
# branch-free and vectorisable; it needs IEEE semantics (no fastmath).
_ROUND_MAGIC = 8388608.0


def _plain_mul(x, y):
    return x * y


def _plain_add(x, y):
    return x + y


def _build(jit, fmul, fadd):
    """Compile the scalar functions with ``jit`` and the given float32 mul/add."""

    @jit
    def blend_value(a, b, lam):
        """lam * a + (1 - lam) * b in float32; exactly a when a == b or lam == 1."""
        fa = float32(a)
        fb = float32(b)
        if fa == fb:
            return fa
        return fadd(fmul(lam, fa), fmul(float32(1.0) - lam, fb))

    @jit
    def mask_value(a, b, m):
        """Mask mix of one value: exactly a where m == 1, b where m == 0
        (selection: hard masks never touch the arithmetic), else the blend."""
        if m >= float32(1.0):
            return float32(a)
        if m <= float32(0.0):
            return float32(b)
        return blend_value(a, b, m)

    @jit
    def round_uint8(v):
        """Round to nearest, ties to even (as float32), for v in [0, 255.5).

        A blend with lam in [0, 1] of two values in [0, 255] stays there:
        each product rounds to at most 255 * its weight plus half an ulp, so
        the sum lies below 255.5 and never needs the clamp."""
        return (v + float32(_ROUND_MAGIC)) - float32(_ROUND_MAGIC)

    @jit
    def blend_sum(a, b, lam):
        """lam * a + (1 - lam) * b in float32, without blend_value's a == b test."""
        return fadd(fmul(lam, float32(a)), fmul(float32(1.0) - lam, float32(b)))

    @jit
    def blend_uint8(a, b, lam):
        """The stored uint8 blend (as float32): blend_value rounded, without
        its a == b test. Where a == b the float32 sum is within 2e-5 of a
        (at most three roundings of values below 256), so rounding returns a
        exactly; the test only matters for float outputs. Same results,
        without a branch in the CPU loop."""
        return round_uint8(blend_sum(a, b, lam))

    @jit
    def quantize_uint8(v):
        """Clamp to [0, 255] and round to nearest, ties to even (as float32)."""
        return round_uint8(min(max(v, float32(0.0)), float32(255.0)))

    @jit
    def mixed_value(a, b, m, quantize):
        """The stored value of a mask mix (m = lam for MixUp): uint8 outputs
        are rounded ties-to-even and clamped, float outputs kept as float32."""
        v = mask_value(a, b, m)
        if quantize:
            v = quantize_uint8(v)
        return v

    @jit
    def box_contains(y, col, y0, y1, c0, c1):
        """Whether (row y, column col) lies in [y0, y1) x [c0, c1)."""
        return y0 <= y and y < y1 and c0 <= col and col < c1

    @jit
    def target_value(k, y_i, y_j, lam, off, on):
        """Soft target of class k: lam * onehot_s(y_i) + (1 - lam) * onehot_s(y_j)."""
        if y_i == y_j:
            weight = float32(1.0) if k == y_i else float32(0.0)
        elif k == y_i:
            weight = lam
        elif k == y_j:
            weight = float32(1.0) - lam
        else:
            weight = float32(0.0)
        return fadd(off, fmul(on - off, weight))

    @jit
    def order_key(bits):
        """Map float32 bits (given as an unsigned integer) to an int64 that
        sorts like the float: negative floats reversed below positive ones.
        Exact for every finite value, -0.0 sorting just below +0.0."""
        b = int64(bits)
        if b >= 2147483648:
            return int64(4294967295) - b
        return b + int64(2147483648)

    @jit
    def ramp_value(rank, num_low, num_high):
        """Mask value of the element of a given rank (0 = largest grey value).

        Ranks below num_low take the primary (1), ranks from num_high on the
        partner (0); the ranks in between get a linear ramp from 1 down to 0,
        both ends included, like ``linspace(1, 0, num_high - num_low)``.
        """
        if rank < num_low:
            return float32(1.0)
        if rank >= num_high:
            return float32(0.0)
        width = num_high - num_low
        if width == 1:
            return float32(1.0)
        return float32(1.0 - (rank - num_low) / (width - 1.0))

    @jit
    def source_span(o, n_in, n_out, bilinear):
        """The source indices (i0, i1) and the weight of i1 of output index
        ``o`` when ``n_in`` samples are resized to ``n_out``, as
        ``torch.nn.functional.interpolate`` computes them in float32:
        "nearest" takes floor(o * n_in / n_out) (exact for equal sizes and
        for doubling, as torch special-cases them); "bilinear" uses
        half-pixel centres (align_corners=False), the source clamped at 0."""
        if not bilinear:
            if n_out == n_in:
                i = o
            elif n_out == 2 * n_in:
                i = o // 2
            else:
                scale = float32(n_in) / float32(n_out)
                i = min(int64(math.floor(float32(o) * scale)), n_in - 1)
            return i, i, float32(0.0)
        scale = float32(n_in) / float32(n_out)
        source = max(fadd(fmul(scale, float32(o) + float32(0.5)), float32(-0.5)),
                     float32(0.0))
        i0 = int64(source)
        i1 = i0 + 1 if i0 < n_in - 1 else i0
        return i0, i1, min(max(source - float32(i0), float32(0.0)), float32(1.0))

    @jit
    def lerp(a, b, w):
        """(1 - w) a + w b in float32."""
        return fadd(fmul(float32(1.0) - w, float32(a)), fmul(w, float32(b)))

    @jit
    def bilerp(v00, v01, v10, v11, wy, wx):
        """Bilinear blend of four values (first index y, second x) with the
        weights of the second row and column, in float32: down each column
        first (by wy), then across (by wx), so a CPU loop can blend two whole
        source rows once and then read two values per output, not four."""
        return lerp(lerp(v00, v10, wy), lerp(v01, v11, wy), wx)

    return SimpleNamespace(
        fmul=fmul,
        fadd=fadd,
        source_span=source_span,
        lerp=lerp,
        bilerp=bilerp,
        blend_value=blend_value,
        blend_sum=blend_sum,
        mask_value=mask_value,
        mixed_value=mixed_value,
        quantize_uint8=quantize_uint8,
        round_uint8=round_uint8,
        blend_uint8=blend_uint8,
        box_contains=box_contains,
        target_value=target_value,
        order_key=order_key,
        ramp_value=ramp_value,
    )


def _byte_functions(jit, functions):
    """CPU-only: the uint8 blend returned as the stored byte itself."""
    from gpumix.kernels._launch import float32_bits

    @jit
    def rounded_byte(v):
        """round_uint8(v) as a uint8, for v in [0, 255.5): adding 2**23 leaves
        the rounded integer in the low mantissa bits, read by a bitcast
        instead of a subtraction and a float-to-integer conversion (equal
        values, fewer vector instructions)."""
        return numba.uint8(float32_bits(v + float32(_ROUND_MAGIC)) & 0xFF)

    blend_sum = functions.blend_sum

    @jit
    def blend_byte(a, b, lam):
        """blend_uint8(a, b, lam) as the uint8 it stores."""
        return rounded_byte(blend_sum(a, b, lam))

    functions.rounded_byte = rounded_byte
    functions.blend_byte = blend_byte
    return functions


@functools.cache
def element_functions(target: str) -> SimpleNamespace:
    """The shared scalar functions compiled for ``target`` ("cpu" or "cuda";
    the CPU ones also have ``rounded_byte`` and ``blend_byte``)."""
    if target == "cpu":
        jit = numba.njit(inline="always")
        return _byte_functions(jit, _build(jit, jit(_plain_mul), jit(_plain_add)))
    if target == "cuda":
        from numba import cuda

        jit = cuda.jit(device=True, inline=True)
        if numba.config.ENABLE_CUDASIM:
            return _build(jit, jit(_plain_mul), jit(_plain_add))
        from numba.cuda import libdevice

        return _build(jit, libdevice.fmul_rn, libdevice.fadd_rn)
    raise ValueError(f"target must be 'cpu' or 'cuda', got {target!r}")
