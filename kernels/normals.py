"""Counter-based standard normals: ``out[s, i]`` is a pure function of
``(keys[s], i)``. FMix expands one 62-bit key per sample into its spectrum.

Why a kernel. A 224 x 224 FMix spectrum takes 2 x 224 x 113 = 50,624 normals,
3.2 M for a batch of 64 per-sample masks: drawn with NumPy's generators they
cost more than the FFT and the selection together, and on CUDA they would
have to cross the bus. The seeded source at the call site (a NumPy
generator, or DALI's ``random.choice`` inside a pipeline) draws only the
keys, so it stays the single source of randomness; this file expands them
deterministically. Every output depends on its key and its index only, so
the work splits freely (samples x chunks on the CPU, one thread per normal
on CUDA), there is no generator state to carry, and the CPU and CUDA
kernels give the same numbers.

Bits. ``bits(seed, c)`` is SplitMix64's output function (Steele, Lea and
Flood, "Fast Splittable Pseudorandom Number Generators", OOPSLA 2014)
applied to the Weyl sequence ``seed + (c + 1) * GAMMA``. Each key owns three
lanes, ``seed_l = mix(key + (l + 1) * GAMMA)`` (:func:`lane_seeds`), and try
``t`` of output ``i`` reads counter ``c = t << 32 | i``.

Normals. The ziggurat method (Marsaglia and Tsang, "The Ziggurat Method for
Generating Random Variables", J. Stat. Softw. 5(8), 2000) with 256 strips of
equal area ``v`` under ``f(x) = exp(-x^2 / 2)``; the tables are solved here
from the strip equations (:func:`ziggurat_tables`). One try of output ``i``
takes 64 bits of lane 0: 8 pick the strip ``k``, 1 the sign, 53 the position
``U``, and ``x = U * X[k] / 2^53``.

* ``U < K[k]`` (``x`` under the strip above): accept ``x``. About 98.5% of
  outputs end here: one hash, two table reads, a compare and a multiply.
* strip 0 past ``r``: a draw from the tail ``x > r`` by Marsaglia's method
  (``a = -log(u1) / r``, ``b = -log(u2)``, accept ``r + a`` when ``2b > a^2``),
  with ``u1``, ``u2`` from lanes 1 and 2 at tries ``t, t + 1, ...``;
* otherwise the wedge: ``y = f(X[k]) + u (f(X[k+1]) - f(X[k]))`` with ``u``
  from lane 1 at try ``t``; accept when ``y < f(x)``, else try ``t + 1``.

The fast path is integer compare plus one float64 multiply, exact on every
IEEE machine; only the rare wedge and tail paths call ``exp`` and ``log``,
whose last bit may differ between a CPU's libm and CUDA's libdevice.

``pair_scale`` (optional, ``count // 2`` float32) multiplies outputs ``2j``
and ``2j + 1`` by ``pair_scale[j]`` after the cast to float32: an FMix
spectrum, (re, im) pairs scaled by their frequency's amplitude, comes out in
one pass.

Three versions, as for every kernel here: :func:`reference` (vectorised
NumPy, the oracle), :func:`cpu` (Numba, parallel over samples x chunks) and
:func:`cuda` (Numba CUDA, grid-stride over every output).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda as _cuda_api, njit

from gpumix.kernels._launch import LazyCudaKernel, run_parallel, upload_many

STRIPS = 256
GAMMA = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, odd
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_ONE = np.uint64(1)
_S8, _S11, _S32 = np.uint64(8), np.uint64(11), np.uint64(32)
_STRIP_BITS = np.uint64(STRIPS - 1)
_TWO_POW_M53 = 2.0 ** -53
MAX_COUNT = 2**32  # outputs per key: the index fills the low 32 counter bits
CPU_CHUNK = 8192   # outputs per CPU task (tasks = samples x chunks)


def _f(x):
    return math.exp(-0.5 * x * x)


def _strip_edges(r: float, strips: int) -> tuple[list[float], float]:
    """X[0..strips] for tail start ``r`` and the top strip's overshoot.

    X[1] = r and every strip k >= 1 is the rectangle [0, X[k]] x [f(X[k]),
    f(X[k+1])] of area v = r f(r) + (tail area beyond r); strip 0 is the
    base [0, r] x [0, f(r)] plus the tail, given the pseudo-width
    X[0] = v / f(r). The right r makes the top strip end at f = 1 exactly,
    i.e. overshoot 0.
    """
    v = r * _f(r) + math.sqrt(math.pi / 2) * math.erfc(r / math.sqrt(2))
    xs = [v / _f(r), r]
    for _ in range(1, strips - 1):
        height = _f(xs[-1]) + v / xs[-1]
        if height >= 1.0:
            return xs, 1.0  # out of height before the top strip: r too small
        xs.append(math.sqrt(-2.0 * math.log(height)))
    return xs + [0.0], _f(xs[-1]) + v / xs[-1] - 1.0


@functools.cache
def ziggurat_tables(strips: int = STRIPS):
    """(X, F, K, W, r): strip edges X (strips + 1), f(X), the integer fast-path
    bounds K[k] = floor(2^53 X[k+1] / X[k]) (uint64) and the position scales
    W[k] = X[k] / 2^53. ``r`` (where the tail starts) is solved by bisection
    so that the top strip closes at f(0) = 1."""
    lo, hi = 2.0, 5.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        xs, overshoot = _strip_edges(mid, strips)
        if len(xs) < strips + 1 or overshoot > 0:
            lo = mid  # strips too tall: the tail must start further out
        else:
            hi = mid
    xs, _ = _strip_edges(hi, strips)
    x = np.array(xs, np.float64)
    f = np.exp(-0.5 * x * x)
    ratio = np.append(x[1:] / x[:-1], 0.0)[:strips]
    k = np.floor(ratio * 2.0**53).astype(np.uint64)
    w = x[:strips] * _TWO_POW_M53
    return x, f, k, w, float(hi)


def _mix64(z):
    """SplitMix64's output function (a bijection of 64-bit words)."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def _mix64_array(z: np.ndarray) -> np.ndarray:
    # uint64 arrays wrap silently; only NumPy scalars would warn.
    return _mix64(np.asarray(z, np.uint64))


def lane_seeds(keys) -> np.ndarray:
    """(n, 3) uint64: the three lane seeds of every key."""
    keys = np.asarray(keys).astype(np.uint64).reshape(-1, 1)
    lanes = np.arange(1, 4, dtype=np.uint64).reshape(1, 3)
    return _mix64_array(keys + lanes * GAMMA)


def _bits_array(seed, counter) -> np.ndarray:
    return _mix64_array(np.asarray(seed, np.uint64) + (np.asarray(counter, np.uint64) + _ONE)
                        * GAMMA)


def _open_uniform(bits):
    """(0, 1]: the top 53 bits plus one, times 2^-53."""
    return ((bits >> _S11) + _ONE).astype(np.float64) * _TWO_POW_M53


def reference(keys, count: int, pair_scale=None) -> np.ndarray:
    """NumPy oracle: ``(n, count)`` float32 normals, every try vectorised."""
    x_edge, f_edge, k_bound, w_scale, r = ziggurat_tables()
    seeds = lane_seeds(keys)
    n = seeds.shape[0]
    out = np.empty((n, count), np.float32)
    sample, index = np.divmod(np.arange(n * count, dtype=np.int64), count)
    index = index.astype(np.uint64)
    pending = np.arange(n * count)
    attempt = np.uint64(0)
    while pending.size:
        s, i = sample[pending], index[pending]
        counter = (attempt << _S32) | i
        h = _bits_array(seeds[s, 0], counter)
        strip = (h & _STRIP_BITS).astype(np.int64)
        negative = ((h >> _S8) & _ONE).astype(bool)
        position = h >> _S11
        x = position.astype(np.float64) * w_scale[strip]
        value = np.full(pending.size, np.nan)
        fast = position < k_bound[strip]
        value[fast] = x[fast]
        tail = ~fast & (strip == 0)
        if tail.any():
            value[tail] = _reference_tail(seeds[s[tail]], i[tail], attempt, r)
        wedge = ~fast & (strip > 0)
        u = _open_uniform(_bits_array(seeds[s[wedge], 1], counter[wedge])) - _TWO_POW_M53
        sw = strip[wedge]
        y = f_edge[sw] + u * (f_edge[sw + 1] - f_edge[sw])
        inside = y < np.exp(-0.5 * x[wedge] * x[wedge])
        value[np.flatnonzero(wedge)[inside]] = x[wedge][inside]
        done = ~np.isnan(value)
        out.reshape(-1)[pending[done]] = np.where(negative[done], -value[done], value[done])
        pending = pending[~done]
        attempt += _ONE
    if pair_scale is not None:
        out *= np.repeat(np.asarray(pair_scale, np.float32), 2)[None, :]
    return out


def _reference_tail(seeds, index, attempt, r):
    """Marsaglia's tail draws for the given outputs (vectorised over them)."""
    value = np.full(index.size, np.nan)
    todo = np.arange(index.size)
    t = attempt
    while todo.size:
        counter = (t << _S32) | index[todo]
        a = -np.log(_open_uniform(_bits_array(seeds[todo, 1], counter))) / r
        b = -np.log(_open_uniform(_bits_array(seeds[todo, 2], counter)))
        ok = b + b > a * a
        value[todo[ok]] = r + a[ok]
        todo = todo[~ok]
        t += _ONE
    return value


def _build(jit):
    """The per-output function, compiled for one target."""
    mix = jit(_mix64)

    @jit
    def bits(seed, counter):
        return mix(seed + (counter + _ONE) * GAMMA)

    @jit
    def open_uniform(h):
        return float((h >> _S11) + _ONE) * _TWO_POW_M53

    @jit
    def normal_value(seed0, seed1, seed2, index, x_edge, f_edge, k_bound, w_scale, r):
        attempt = np.uint64(0)
        while True:
            counter = (attempt << _S32) | index
            h = bits(seed0, counter)
            strip = int(h & _STRIP_BITS)
            position = h >> _S11
            x = float(position) * w_scale[strip]
            accept = position < k_bound[strip]
            if not accept:
                if strip == 0:
                    t = attempt
                    while True:
                        c = (t << _S32) | index
                        a = -math.log(open_uniform(bits(seed1, c))) / r
                        b = -math.log(open_uniform(bits(seed2, c)))
                        if b + b > a * a:
                            x = r + a
                            break
                        t += _ONE
                    accept = True
                else:
                    u = open_uniform(bits(seed1, counter)) - _TWO_POW_M53
                    y = f_edge[strip] + u * (f_edge[strip + 1] - f_edge[strip])
                    accept = y < math.exp(-0.5 * x * x)
            if accept:
                if (h >> _S8) & _ONE:
                    return -x
                return x
            attempt += _ONE

    return bits, normal_value


_bits_cpu, _normal_cpu = _build(njit(inline="always"))


@njit(cache=True, nogil=True)
def _normals_cpu(seeds, count, chunk, x_edge, f_edge, k_bound, w_scale, r, pair_scale, out,
                 first_task, stop_task):
    # Per chunk, three loops rather than one fused loop: the first try's bits
    # of every output (integer hashing, which LLVM vectorises); the
    # ziggurat's fast path for every output, noting the ~1.5% that need
    # more; then those, through normal_value from the start (the function
    # the CUDA kernel runs). The fast path always scales (by ones when there
    # is no pair_scale) and writes through 1-D views of the chunk: no branch
    # and no 2-D indexing in the loop.
    chunks = (count + chunk - 1) // chunk
    first_bits = np.empty(chunk, np.uint64)
    slow = np.empty(chunk, np.int64)
    for task in range(first_task, stop_task):
        s = task // chunks
        start = (task - s * chunks) * chunk  # even (chunk is), so pairs stay whole
        size = min(chunk, count - start)
        s0 = seeds[s, 0]
        for c in range(size):
            first_bits[c] = _bits_cpu(s0, np.uint64(start + c))
        o = out[s, start:start + size]
        scale = pair_scale[start >> 1:]
        n_slow = 0
        for c in range(size):
            h = first_bits[c]
            strip = h & _STRIP_BITS
            position = h >> _S11
            x = float(position) * w_scale[strip]
            o[c] = np.float32(-x if (h >> _S8) & _ONE else x) * scale[c >> 1]
            if position >= k_bound[strip]:
                slow[n_slow] = c
                n_slow += 1
        for q in range(n_slow):
            c = slow[q]
            o[c] = np.float32(_normal_cpu(s0, seeds[s, 1], seeds[s, 2], np.uint64(start + c),
                                          x_edge, f_edge, k_bound, w_scale, r)) * scale[c >> 1]


def _check(keys, count: int, pair_scale=None) -> np.ndarray:
    if not 0 <= count <= MAX_COUNT:
        raise ValueError(f"count must be in [0, 2**32], got {count}")
    if pair_scale is not None and (pair_scale.shape != (count // 2,) or count % 2
                                   or pair_scale.dtype != np.float32):
        raise ValueError(f"pair_scale must be float32 of shape ({count // 2},) for an even "
                         f"count, got {pair_scale.dtype} {pair_scale.shape} for count {count}")
    keys = np.asarray(keys).reshape(-1)
    if keys.dtype.kind not in "iu" or (keys.dtype.kind == "i" and keys.size and keys.min() < 0):
        raise ValueError(f"keys must be non-negative integers, got dtype {keys.dtype}")
    return keys


@functools.lru_cache(maxsize=4)
def _ones(size: int) -> np.ndarray:
    ones = np.ones(size, np.float32)
    ones.flags.writeable = False
    return ones


def cpu(keys, count: int, out=None, pair_scale=None) -> np.ndarray:
    """``(n, count)`` float32 normals for n keys on the CPU (all cores)."""
    keys = _check(keys, count, pair_scale)
    if out is None:
        out = np.empty((keys.size, count), np.float32)
    # Unscaled outputs are scaled by ones: exact, and one loop in the kernel.
    scale = _ones((count + 1) // 2) if pair_scale is None else pair_scale
    x_edge, f_edge, k_bound, w_scale, r = ziggurat_tables()
    tasks = keys.size * -(-count // CPU_CHUNK)
    run_parallel(_normals_cpu, tasks, lane_seeds(keys), count, CPU_CHUNK, x_edge, f_edge, k_bound,
                 w_scale, r, scale, out)
    return out


_, _normal_gpu = _build(_cuda_api.jit(device=True, inline=True))


def _normals_cuda(seeds, count, x_edge, f_edge, k_bound, w_scale, r, pair_scale, scaled, out):
    total = seeds.shape[0] * count
    start = _cuda_api.blockIdx.x * _cuda_api.blockDim.x + _cuda_api.threadIdx.x
    step = _cuda_api.blockDim.x * _cuda_api.gridDim.x
    for flat in range(start, total, step):
        s = flat // count
        i = flat - s * count
        v = np.float32(_normal_gpu(seeds[s, 0], seeds[s, 1], seeds[s, 2], np.uint64(i),
                                   x_edge, f_edge, k_bound, w_scale, r))
        if scaled:
            v = v * pair_scale[i >> 1]
        out[s, i] = v


cuda_kernel = LazyCudaKernel(_normals_cuda)


@functools.cache
def _device_tables(device_id: int):
    """The ziggurat tables on one device (copied once per device)."""
    from numba import cuda as numba_cuda

    x_edge, f_edge, k_bound, w_scale, r = ziggurat_tables()
    return (*(numba_cuda.to_device(a) for a in (x_edge, f_edge, k_bound, w_scale)), r)


CUDA_THREADS = 256
CUDA_MAX_BLOCKS = 4096


def cuda(keys, count: int, *, out, pair_scale=None, stream=None):
    """Normals into the device array ``out`` ``(n, count)`` float32 on ``stream``
    (``pair_scale``: a host array, copied with the keys)."""
    from numba import cuda as numba_cuda

    keys = _check(keys, count, pair_scale)
    total = keys.size * count
    if total == 0:
        return out
    x_edge, f_edge, k_bound, w_scale, r = _device_tables(numba_cuda.get_current_device().id)
    scaled = pair_scale is not None
    seeds, scale = upload_many([(lane_seeds(keys), None),
                                (pair_scale if scaled else np.ones(1, np.float32), None)], stream)
    blocks = max(1, min(-(-total // CUDA_THREADS), CUDA_MAX_BLOCKS))
    cuda_kernel.launch(blocks, CUDA_THREADS, stream, seeds, count, x_edge, f_edge, k_bound,
                       w_scale, r, scale, scaled, out)
    return out
