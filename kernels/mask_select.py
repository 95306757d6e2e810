"""FMix threshold selection: grey image -> mask by rank (docs/semantics.md, "FMix").

For each sample, rank the N grey values from largest (rank 0) to smallest,
ties broken by lower flat index. With ``num_low <= num_high``:

    mask = 1                                  for rank <  num_low
    mask = linspace(1, 0, num_high - num_low) for num_low <= rank < num_high
    mask = 0                                  for rank >= num_high

A hard mask is ``num_low == num_high == k``: exactly the k largest values
take the primary. This is FMix's ``binarise_mask`` (Harris et al. 2020,
ecs-vlc/FMix) without its full argsort: only a selection is needed.

Values are compared through :func:`order_key` (float32 bits -> an integer
that sorts like the float), so every backend ranks identically, -0.0 and
+0.0 included.

* :func:`reference` - NumPy, a stable argsort of the keys (the oracle);
* :func:`cpu` - Numba, per sample: radix select of the thresholds (an
  11-bit top digit over every element, then 7-bit digits over the few
  elements of the threshold's bucket, see :func:`_hard_mask_cpu`), then a
  stable sort of the ramp band only (empty for hard masks);
* :func:`cuda` - Numba CUDA, hard masks: one block per sample, an 8-bit-digit
  radix select of the k-th largest key (four passes of a 256-bin shared
  histogram), then an in-order block scan that takes the tied elements of
  lowest index. Soft masks on the GPU rank with a sort (see gpumix.fmix).
"""

from __future__ import annotations

import numpy as np
from numba import cuda as _cuda_api, float32, int32, int64, njit

from gpumix.kernels._element import element_functions
from gpumix.kernels._launch import LazyCudaKernel, run_parallel

_cpu = element_functions("cpu")
_order_key_cpu = _cpu.order_key
_ramp_value_cpu = _cpu.ramp_value


def _keys_reference(grey: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(grey, np.float32).view(np.uint32).astype(np.int64)
    return np.where(bits >= 2**31, 2**32 - 1 - bits, bits + 2**31)


def reference(grey: np.ndarray, num_low, num_high) -> np.ndarray:
    """NumPy masks (B, N) float32 from grey values (B, N) and rank bounds (B,)."""
    keys = _keys_reference(grey)
    masks = np.zeros(keys.shape, np.float32)
    for i, row in enumerate(keys):
        order = np.argsort(-row, kind="stable")  # rank -> flat index
        lo, hi = int(num_low[i]), int(num_high[i])
        masks[i, order[:lo]] = 1.0
        if hi > lo:
            masks[i, order[lo:hi]] = np.linspace(1.0, 0.0, hi - lo) if hi - lo > 1 else 1.0
    return masks


_DIGIT_BITS = 11
_DIGIT_MASK = (1 << _DIGIT_BITS) - 1


@njit(cache=True, nogil=True)
def _bucket_holding(hist, rank):
    """(digit, above): the histogram bucket holding the rank-th largest key
    (1-based) and how many keys lie in higher buckets."""
    above = np.int64(0)
    for d in range(hist.size - 1, -1, -1):
        if above + hist[d] >= rank:
            return d, above
        above += hist[d]
    return 0, above


_LOW_BITS = 32 - _DIGIT_BITS  # bits below the top digit
_LOW_DIGIT_BITS = 7            # three 128-bin passes cover them
_LOW_DIGIT_MASK = (1 << _LOW_DIGIT_BITS) - 1


@njit(cache=True, nogil=True)
def _kth_largest_in_bucket(keys, k, hist):
    """(threshold, ties): the k-th largest of ``keys`` (1 <= k <= size), which
    share their top digit, and how many keys equal to it belong to the top k.
    Radix select on the low 21 bits, 7-bit digits from the top: three
    counting passes over the bucket's few keys, each with a 128-bin
    histogram to clear and scan (11-bit digits cost more in bins than the
    keys themselves), no sort, no copy."""
    prefix = np.int64(0)
    prefix_mask = np.int64(0)
    remaining = np.int64(k)
    for shift in range(_LOW_BITS - _LOW_DIGIT_BITS, -1, -_LOW_DIGIT_BITS):
        hist[:_LOW_DIGIT_MASK + 1] = 0
        for e in range(keys.size):
            key = keys[e]
            if (key & prefix_mask) == prefix:
                hist[(key >> shift) & _LOW_DIGIT_MASK] += 1
        digit, above = _bucket_holding(hist[:_LOW_DIGIT_MASK + 1], remaining)
        prefix = prefix | (np.int64(digit) << shift)
        remaining -= above
        prefix_mask = prefix_mask | (np.int64(_LOW_DIGIT_MASK) << shift)
    return (keys[0] >> _LOW_BITS << _LOW_BITS) | prefix, remaining


@njit(cache=True, nogil=True)
def _hard_mask_cpu(bits, k, out, hist, in_bucket, cand_keys, cand_index):
    """out[e] = 1 for the k top-ranked elements, else 0 (one sample).

    One counting pass over the top digit finds the bucket holding the k-th
    largest key. A second pass writes the mask of every element outside that
    bucket (1 above it, 0 below) and flags the bucket's elements, both
    without branches, so LLVM vectorises it; the flags are then read eight
    at a time, and the flagged keys and indices (a few percent) copied out.
    The radix select finishes on that copy, which then sets its own
    elements, ties at the threshold in increasing index order. Keys are
    recomputed from the bits rather than stored. ``in_bucket`` holds at
    least ``bits.size`` bytes, rounded up to whole uint64 words, zero past
    ``bits.size``."""
    n = bits.size
    if k <= 0 or k >= n:
        value = float32(1.0) if k >= n else float32(0.0)
        for e in range(n):
            out[e] = value
        return
    # Four interleaved histograms: neighbouring grey values are close, so one
    # histogram would chain every increment on the one before (same bin).
    hist[:] = 0
    body = n - n % 4
    for e in range(0, body, 4):
        hist[0, _order_key_cpu(bits[e]) >> _LOW_BITS] += 1
        hist[1, _order_key_cpu(bits[e + 1]) >> _LOW_BITS] += 1
        hist[2, _order_key_cpu(bits[e + 2]) >> _LOW_BITS] += 1
        hist[3, _order_key_cpu(bits[e + 3]) >> _LOW_BITS] += 1
    for e in range(body, n):
        hist[0, _order_key_cpu(bits[e]) >> _LOW_BITS] += 1
    for d in range(_DIGIT_MASK + 1):
        hist[0, d] += hist[1, d] + hist[2, d] + hist[3, d]
    top, above = _bucket_holding(hist[0], k)
    for e in range(n):
        digit = _order_key_cpu(bits[e]) >> _LOW_BITS
        out[e] = float32(1.0) if digit > top else float32(0.0)
        in_bucket[e] = digit == top
    words = in_bucket.view(np.uint64)
    m = 0
    for w in range(words.size):
        if words[w] != 0:  # bucket elements cluster (grey images are smooth)
            for e in range(8 * w, min(8 * w + 8, n)):
                if in_bucket[e]:
                    cand_keys[m] = _order_key_cpu(bits[e])
                    cand_index[m] = e
                    m += 1
    threshold, ties_left = _kth_largest_in_bucket(cand_keys[:m], k - above, hist[0])
    for c in range(m):
        key = cand_keys[c]
        if key > threshold or (key == threshold and ties_left > 0):
            out[cand_index[c]] = float32(1.0)
            if key == threshold:
                ties_left -= 1


@njit(cache=True, nogil=True)
def _select_cpu(bits, num_low, num_high, out, first, stop):
    # Hard masks are one _hard_mask_cpu; soft ones are the top num_high
    # (out) less the top num_low (scratch), the band between sorted by key.
    n = bits.shape[1]
    hist = np.empty((4, _DIGIT_MASK + 1), np.int64)  # the top digit's four lanes
    in_bucket = np.zeros(-(-n // 8) * 8, np.uint8)   # zero past n: read as words
    cand_keys = np.empty(n, np.int64)
    cand_index = np.empty(n, np.int64)
    in_low = np.empty(n, np.float32)
    for i in range(first, stop):
        lo = num_low[i]
        hi = num_high[i]
        _hard_mask_cpu(bits[i], hi, out[i], hist, in_bucket, cand_keys, cand_index)
        if hi == lo:
            continue
        _hard_mask_cpu(bits[i], lo, in_low, hist, in_bucket, cand_keys, cand_index)
        band = np.empty(hi - lo, np.int64)
        m = 0
        for e in range(n):
            if out[i, e] > in_low[e]:
                band[m] = e
                m += 1
        band_keys = np.empty(m, np.int64)
        for c in range(m):
            band_keys[c] = _order_key_cpu(bits[i, band[c]])
        band_order = np.argsort(-band_keys, kind="mergesort")  # stable: index order on ties
        for position in range(m):
            out[i, band[band_order[position]]] = _ramp_value_cpu(lo + position, lo, hi)


def cpu(grey: np.ndarray, num_low, num_high, *, out=None) -> np.ndarray:
    """Masks (B, N) float32 from float32 grey values (B, N), on the CPU."""
    grey = np.ascontiguousarray(grey, np.float32)
    if out is None:
        out = np.empty(grey.shape, np.float32)
    run_parallel(_select_cpu, grey.shape[0], grey.view(np.uint32),
                 np.asarray(num_low, np.int64), np.asarray(num_high, np.int64), out)
    return out


_order_key_gpu = element_functions("cuda").order_key
_HIST_BINS = 256
SELECT_THREADS = 256  # block size; shared scan buffer is sized for it


def _select_hard_cuda(bits, num_top, out):
    """One block per sample (grid-stride over samples): rank < num_top -> 1."""
    hist = _cuda_api.shared.array(_HIST_BINS, int32)
    scan = _cuda_api.shared.array(SELECT_THREADS, int32)
    state = _cuda_api.shared.array(3, int64)  # threshold key, ties to take, ties taken
    tid = _cuda_api.threadIdx.x
    n_threads = _cuda_api.blockDim.x
    n_samples = bits.shape[0]
    n = bits.shape[1]
    for i in range(_cuda_api.blockIdx.x, n_samples, _cuda_api.gridDim.x):
        k = num_top[i]
        if k <= 0 or k >= n:
            fill = float32(1.0) if k >= n else float32(0.0)
            for e in range(tid, n, n_threads):
                out[i, e] = fill
            continue
        # Radix select of the k-th largest key, 8 bits per pass, top digit first.
        prefix = int64(0)
        prefix_mask = int64(0)
        remaining = int64(k)
        for level in range(4):
            shift = 24 - 8 * level
            for d in range(tid, _HIST_BINS, n_threads):
                hist[d] = 0
            _cuda_api.syncthreads()
            for e in range(tid, n, n_threads):
                key = _order_key_gpu(bits[i, e])
                if (key & prefix_mask) == prefix:
                    _cuda_api.atomic.add(hist, (key >> shift) & 255, 1)
            _cuda_api.syncthreads()
            if tid == 0:
                above = int64(0)
                for d in range(_HIST_BINS - 1, -1, -1):
                    count = int64(hist[d])
                    if above + count >= remaining:
                        state[0] = prefix | (int64(d) << shift)
                        state[1] = remaining - above
                        break
                    above += count
            _cuda_api.syncthreads()
            prefix = state[0]
            remaining = state[1]
            prefix_mask = prefix_mask | (int64(255) << shift)
            _cuda_api.syncthreads()
        threshold = prefix
        ties_to_take = remaining
        if tid == 0:
            state[2] = 0
        _cuda_api.syncthreads()
        # Write in index order, chunk by chunk; a block scan numbers the ties.
        for base in range(0, n, n_threads):
            e = base + tid
            key = int64(-1)
            tie = 0
            if e < n:
                key = _order_key_gpu(bits[i, e])
                if key == threshold:
                    tie = 1
            scan[tid] = tie
            _cuda_api.syncthreads()
            offset = 1
            while offset < n_threads:
                add = scan[tid - offset] if tid >= offset else 0
                _cuda_api.syncthreads()
                scan[tid] += add
                _cuda_api.syncthreads()
                offset *= 2
            tie_number = state[2] + scan[tid] - tie  # ties before e, in index order
            if e < n:
                take = key > threshold or (tie == 1 and tie_number < ties_to_take)
                out[i, e] = float32(1.0) if take else float32(0.0)
            _cuda_api.syncthreads()
            if tid == n_threads - 1:
                state[2] += scan[tid]
            _cuda_api.syncthreads()


cuda_kernel = LazyCudaKernel(_select_hard_cuda)  # launched one block per sample, below


def cuda(bits, num_top, *, out, stream=None, threads: int = SELECT_THREADS):
    """Hard masks on the GPU: ``bits`` is the uint32 view of float32 grey (B, N)."""
    if not 1 <= threads <= SELECT_THREADS:
        raise ValueError(f"threads must be in [1, {SELECT_THREADS}], got {threads}")
    n_samples = bits.shape[0]
    if n_samples == 0:
        return out
    grid = min(n_samples, 65535)
    cuda_kernel.launch(grid, threads, stream, bits, num_top, out)
    return out
