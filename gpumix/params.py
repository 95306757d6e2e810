"""Sample, then apply: the random draws and the parameters derived from them.

Sampling is two pure steps, so any backend (NumPy here, DALI's random
operators inside a pipeline) can supply the draws and everything after is
shared and replayable:

    draws  = draw(config, batch_size, spatial_shape, rng)      # all randomness
    params = params_from_draws(config, spatial_shape, draws)   # deterministic

``MixParams`` is what every backend consumes (NumPy reference, CPU kernels,
CUDA kernels, DALI operators, the torch module):

    pair    (B,)      int64    partner of each primary
    lam     (B,)      float32  weight of the primary in the target (realised
                               pixel fraction for CutMix/FMix)
    method  (B,)      int8     a code of gpumix.config (NONE, MIXUP, ...)
    box     (B, 4)    int64    box (y0, y1, x0, x1), half-open: CutMix's and
                               SaliencyMix's, or where ResizeMix pastes;
                               (B, 6) (z0, z1, y0, y1, x0, x1) for volumes
    mask    (B, H, W) float32  FMix / SmoothMix / GridMix mask (1 = primary),
                               or None when no sample uses one (or when made
                               later, from the keys, ranks and shape params);
                               (B, D, H, W) for volumes, CutMix's cuboids
                               included
    fmix_keys  (B,)   int64    FMix spectrum key (0 where unused), or None
    fmix_ranks (B, 2) int64    FMix ranks (low, high) of the mask's ramp, or None
    smooth  (B, 5)    float64  SmoothMix (centre_y, centre_x, sigma_y, sigma_x,
                               square), or None
    grid    (B, 3)    int64    GridMix (n, cells_low, cells_high), or None
    bilinear          bool     ResizeMix resizes bilinearly (else nearest)
    saliency          str      the saliency map SaliencyMix boxes are placed on
                               (gpumix.config.SALIENCY_METHODS)

Methods beyond MixUp, CutMix and FMix (gpumix.config.METHODS):

* ResizeMix: tau ~ U(resizemix_scale); the box is int(H tau) x int(W tau),
  placed uniformly where it fits (box_u); lam = 1 - box area / (H W).
* SmoothMix: centre (int(u H), int(u W)) from box_u, sigma = s H and s W
  with s ~ U(smoothmix_sigma); lam = the mean of the primary's mask
  1 - G (gpumix.kernels.shape_mask), from the two 1-D profiles.
* GridMix: n uniform on gridmix_grid, each of the n * n cells the
  partner's with probability gridmix_prob; lam = the exact fraction of the
  primary's pixels.
* SaliencyMix: CutMix's box size from lam ~ Beta(saliencymix_alpha), placed
  later on the partner's saliency peak (gpumix.saliency); the box always lies
  inside the image, so lam = 1 - box area / (H W) (the drawn lam without
  ``correct_lam``) is known before the images are.

:func:`to_table` and :func:`from_table` convert MixParams to and from the
params table of gpumix.kernels.table (one float64 row per sample), the form
DALI pipelines hand over. A volume's rows describe images of D * H rows
(its masks likewise) and mark CutMix's rows ``masked``.

Volumes: ``spatial_shape`` may have three axes (D, H, W) (a volume, or a
clip's (T, H, W) when one box spans time). MixUp, CutMix and FMix are
defined there: CutMix cuts a cuboid of sides int(D r), int(H r), int(W r)
with r = cbrt(1 - lam), placed like the 2-D box on each axis, lam = 1 -
its volume fraction; FMix's masks are the paper's 3-D masks. Every hard
method in 3-D is applied through its mask, so the cuboid is also written
into ``mask`` (0 inside). The other methods are 2-D image methods and
refuse three axes.

Draws are per "unit": one unit per batch in mode "batch" (broadcast to every
sample), one per sample in mode "elem". Seeding: pass a
``numpy.random.Generator`` or a ``torch.Generator`` (which seeds a NumPy
generator from one draw, so it is still the single source per call site).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from gpumix import fmix
from gpumix.config import (BOX_PLACEMENTS, CUTMIX, FMIX, GRIDMIX, LABEL_PAIRINGS, MASK_METHODS,
                           MAX_GRID, METHODS, MIXUP, NONE, RESIZEMIX, SALIENCYMIX, SMOOTHMIX,
                           MixConfig)
from gpumix.kernels import shape_mask, table


@dataclass(frozen=True)
class MixParams:
    """Per-sample mixing parameters; see the module docstring."""

    pair: np.ndarray
    lam: np.ndarray
    method: np.ndarray
    box: np.ndarray
    mask: np.ndarray | None = None
    fmix_keys: np.ndarray | None = None
    fmix_ranks: np.ndarray | None = None
    smooth: np.ndarray | None = None
    grid: np.ndarray | None = None
    bilinear: bool = False
    saliency: str = "spectral_residual"

    @property
    def batch_size(self) -> int:
        return int(self.pair.shape[0])

    def samples(self, *methods: int) -> np.ndarray:
        """Indices of the samples mixed with one of ``methods`` (int64, ascending)."""
        return _indices_of(self.method, _code_set(methods))

    def check(self, batch_size: int, spatial_shape: tuple[int, ...]) -> None:
        """ValueError unless these params fit a batch of that size and shape
        ((H, W), or (D, H, W) for volumes)."""
        b = batch_size
        expected = {"pair": (b,), "lam": (b,), "method": (b,),
                    "box": (b, 2 * len(spatial_shape))}
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"params.{name} must have shape {shape}, got {got}")
        check_values(self.pair, self.lam, self.method, self.box, spatial_shape, "params.{}")
        if self.grid is not None:
            n = np.ascontiguousarray(np.asarray(self.grid)[:, 0])
            _raise_grid_fault(_first_bad_grid(self.method, n), n, "params.grid")
        if self.samples(*masked_methods(len(spatial_shape))).size:
            if self.mask is None or tuple(self.mask.shape) != (b, *spatial_shape):
                got = None if self.mask is None else tuple(self.mask.shape)
                raise ValueError(f"params.mask must have shape {(b, *spatial_shape)}, got {got}")


def check_values(pair, lam, method, box, spatial_shape, name: str) -> None:
    """ValueError unless every sample's method code, partner, lam and box
    are valid for a batch of ``len(pair)`` images of ``spatial_shape``
    (:func:`_first_fault`'s rules); ``name`` formats each field's name in
    the message ("params.{}", or a table's "table column {}")."""
    if lam.dtype == np.float16:  # Numba has no float16; float32 holds every value
        lam = lam.astype(np.float32)
    fault, i = _first_fault(pair, lam, method, box, np.asarray(spatial_shape, np.int64),
                            SALIENCYMIX, LAST_CODE)
    _raise_fault(fault, i, pair, lam, method, box, spatial_shape, name)


def _raise_fault(fault, i, pair, lam, method, box, spatial_shape, name: str) -> None:
    """The ValueError of a fault :func:`_first_fault` found at sample ``i``."""
    if fault == _BAD_METHOD:
        raise ValueError(f"{name.format('method')} must hold method codes 0 to {LAST_CODE} "
                         f"(gpumix.config), got {method[i]} for sample {i}")
    if fault == _BAD_PAIR:
        raise ValueError(f"{name.format('pair')} must index the batch [0, {len(pair)}), got "
                         f"{pair[i]} for sample {i}")
    if fault == _BAD_LAM:
        raise ValueError(f"{name.format('lam')} must lie in [0, 1], got {lam[i]} for sample {i}")
    if fault == _BAD_BOX:
        raise ValueError(f"{name.format('box')} must hold half-open boxes inside the image "
                         f"{tuple(spatial_shape)} (0 <= start <= stop <= size on each "
                         f"axis), got {box[i].tolist()} for sample {i}")


def check_table(rows: np.ndarray, spatial_shape) -> None:
    """ValueError unless the params table ``rows`` (gpumix.kernels.table)
    fits a batch of ``len(rows)`` images of ``spatial_shape`` (H, W): every
    row made for that size, its values valid as MixParams.check asks, and
    GridMix's n in [1, MAX_GRID]. The kernels index memory with these values."""
    h, w = (int(s) for s in spatial_shape)
    fault, i = _table_fault(rows, np.array([h, w], np.int64))
    if fault == _BAD_SIZE:
        made_for = (int(rows[i, table.HEIGHT]), int(rows[i, table.WIDTH]))
        raise ValueError(f"images are {h} x {w} but table row {i} was made for size={made_for}")
    if fault == _BAD_GRID:
        _raise_grid_fault(i, rows[:, table.GRID], "table column grid")
    _raise_fault(fault, i, rows[:, table.PAIR], rows[:, table.LAM], rows[:, table.METHOD],
                 rows[:, table.Y0:table.X1 + 1], (h, w), "table column {}")


LAST_CODE = len(METHODS)  # method codes run from NONE (0) to this
_BAD_METHOD, _BAD_PAIR, _BAD_LAM, _BAD_BOX = 1, 2, 3, 4  # the faults _first_fault finds
_BAD_SIZE, _BAD_GRID = 5, 6  # and those of a params table's other columns


@njit(cache=True, nogil=True)
def _first_fault(pair, lam, method, box, sizes, unplaced_method, last_code):
    """(fault, sample) of the first of MixParams.check's value rules that
    these arrays break, in the order checked: a method code outside [0,
    last_code] (_BAD_METHOD), a partner outside [0, B) (_BAD_PAIR), a lam
    outside [0, 1] or NaN (_BAD_LAM), a box not inside the image (_BAD_BOX;
    an unplaced SaliencyMix box's axis is (-side, 0), the side at most the
    axis); (0, 0) when none. One compiled pass instead of a NumPy call per
    rule, which cost more than mixing a small batch."""
    b = pair.shape[0]
    for i in range(b):  # each test is of what is valid, so NaN (a float table's) fails
        if not (0 <= method[i] <= last_code):
            return _BAD_METHOD, i
    for i in range(b):
        if not (0 <= pair[i] < b):
            return _BAD_PAIR, i
    for i in range(b):
        if not (0 <= lam[i] <= 1):
            return _BAD_LAM, i
    for i in range(b):
        # a SaliencyMix box with a negative start is a size on every axis, else placed
        unplaced = False
        if method[i] == unplaced_method:
            for axis in range(sizes.shape[0]):
                unplaced = unplaced or box[i, 2 * axis] < 0
        for axis in range(sizes.shape[0]):
            lo, hi = box[i, 2 * axis], box[i, 2 * axis + 1]
            valid = (hi == 0 and -sizes[axis] <= lo <= 0) if unplaced \
                else 0 <= lo <= hi <= sizes[axis]
            if not valid:
                return _BAD_BOX, i
    return 0, 0


@njit(cache=True, nogil=True)
def _table_fault(rows, sizes):
    """(fault, row) of the first rule a params table breaks: a row made for
    another size (_BAD_SIZE), then :func:`_first_fault`'s rules on its
    columns, then a GridMix n outside [1, MAX_GRID] (_BAD_GRID); (0, 0) when
    none. One compiled pass: :func:`gpumix.torch.apply` runs it every batch."""
    for i in range(rows.shape[0]):
        if rows[i, table.HEIGHT] != sizes[0] or rows[i, table.WIDTH] != sizes[1]:
            return _BAD_SIZE, i
    fault, i = _first_fault(rows[:, table.PAIR], rows[:, table.LAM], rows[:, table.METHOD],
                            rows[:, table.Y0:table.X1 + 1], sizes, SALIENCYMIX, LAST_CODE)
    if fault != 0:
        return fault, i
    i = _first_bad_grid(rows[:, table.METHOD], rows[:, table.GRID])
    return (_BAD_GRID, i) if i >= 0 else (0, 0)


@njit(cache=True, nogil=True)
def _first_bad_grid(method, n):
    """The first GridMix sample whose grid side n[i] is outside [1, MAX_GRID], or -1."""
    for i in range(method.shape[0]):
        if method[i] == GRIDMIX and not (1 <= n[i] <= MAX_GRID):
            return i
    return -1


def _raise_grid_fault(i: int, n, name: str) -> None:
    """The ValueError of :func:`_first_bad_grid`'s finding ``i`` (none when -1)."""
    if i >= 0:
        raise ValueError(f"{name} must give GridMix samples n in [1, {MAX_GRID}], got {n[i]} "
                         f"for sample {i}")


@functools.lru_cache(maxsize=64)
def _code_set(codes: tuple) -> np.ndarray:
    """A read-only lookup table: entry c is True for every method code c in ``codes``."""
    lookup = np.zeros(max((int(c) for c in codes), default=-1) + 1, bool)
    lookup[list(codes)] = True
    lookup.flags.writeable = False
    return lookup


@njit(cache=True, nogil=True)
def _indices_of(method, wanted):
    """Indices i, ascending, whose code method[i] is set in the table
    ``wanted`` (codes past its end are not)."""
    found = np.empty(method.shape[0], np.int64)
    n = 0
    for i in range(method.shape[0]):
        code = method[i]
        if 0 <= code < wanted.shape[0] and wanted[code]:
            found[n] = i
            n += 1
    return found[:n]


VOLUME_METHODS = (MIXUP, CUTMIX, FMIX)  # the methods defined on three axes


def masked_methods(rank: int) -> tuple[int, ...]:
    """The method codes applied through a mask: FMix, SmoothMix, GridMix,
    and in 3-D CutMix's cuboids too."""
    return MASK_METHODS if rank != 3 else (*MASK_METHODS, CUTMIX)


def check_shape(spatial_shape) -> None:
    """ValueError unless ``spatial_shape`` is (H, W) or (D, H, W)."""
    if len(spatial_shape) not in (2, 3) or min(spatial_shape) < 1:
        raise ValueError(f"spatial_shape must be (H, W) or (D, H, W) of sizes >= 1, got "
                         f"{tuple(spatial_shape)}")


def check_rank(config: MixConfig, spatial_shape) -> None:
    """ValueError unless the shape has two axes, or three with only the
    methods defined on volumes (and CutMix's cuboids, not bands)."""
    check_shape(spatial_shape)
    if len(spatial_shape) == 2:
        return

    others = [name for code, name in enumerate(METHODS, 1)
              if config.enabled[code - 1] and code not in VOLUME_METHODS]
    if others:
        raise ValueError(f"{', '.join(others)} mix 2-D images; volumes and clips mixed as "
                         f"(D, H, W) take mixup, cutmix and fmix")
    if config.cutmix_axes != "both":
        raise ValueError(f"cutmix_axes={config.cutmix_axes!r} cuts bands of 2-D images; "
                         f"volumes take 'both' (cuboids)")


@dataclass(frozen=True)
class Draws:
    """Every random number one call needs, per unit (see module docstring)."""

    apply_u: np.ndarray            # (n,) uniform [0, 1): mix iff < prob
    method_u: np.ndarray           # (n,) uniform [0, 1): picks the method
    lam_mixup: np.ndarray          # (n,) Beta(mixup_alpha, mixup_alpha)
    lam_cutmix: np.ndarray         # (n,) Beta(cutmix_alpha, ...) or Uniform(minmax)
    lam_fmix: np.ndarray           # (n,) Beta(fmix_alpha, ...) or Beta(a + 1, a)
    box_u: np.ndarray              # (n, rank) uniform [0, 1): box position ((z,) y, x)
    round_up_u: np.ndarray         # (n,) uniform [0, 1): FMix k = ceil iff < 0.5
    normal_keys: np.ndarray | None  # (n,) int64 FMix spectrum keys; each expands to the
                                    # unit's N(0, 1) normals (gpumix.kernels.normals)
    permutation: np.ndarray | None = field(default=None)  # (B,) pairing="permutation"
    scale_u: np.ndarray | None = None  # (n,) uniform [0, 1): ResizeMix tau, SmoothMix
                                       # sigma, GridMix n (one method per unit uses it)
    cells_u: np.ndarray | None = None  # (n, MAX_GRID**2) uniform [0, 1): GridMix cells
    lam_saliencymix: np.ndarray | None = None  # (n,) Beta(saliencymix_alpha, ...)
    partner_u: np.ndarray | None = None  # (B,) uniform [0, 1): label-aware pairings


def as_numpy_generator(rng) -> np.random.Generator:
    """A NumPy Generator from a NumPy Generator, a torch.Generator, an int seed or None."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(rng, torch.Generator):
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=rng, device=rng.device).item())
        return np.random.default_rng(seed)
    raise TypeError(f"rng must be a numpy.random.Generator, torch.Generator, int or None; "
                    f"got {type(rng).__name__}")


def derangement(batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform random permutation with no fixed points (identity when B == 1)."""
    if batch_size < 2:
        return np.arange(batch_size, dtype=np.int64)
    index = np.arange(batch_size)
    while True:  # acceptance probability -> 1/e, so ~2.7 tries on average
        perm = rng.permutation(batch_size)
        if not np.any(perm == index):
            return perm.astype(np.int64)


def _beta(rng, alpha: float, n: int) -> np.ndarray:
    return rng.beta(alpha, alpha, n) if alpha > 0 else np.ones(n)


def draw(config: MixConfig, batch_size: int, spatial_shape, rng=None) -> Draws:
    """All random numbers for one batch, from one seeded generator."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_rank(config, spatial_shape)
    rng = as_numpy_generator(rng)
    n = 1 if config.mode == "batch" else batch_size
    if config.cutmix_minmax is not None:
        lo, hi = config.cutmix_minmax
        lam_cutmix = rng.uniform(lo, hi, n)
    else:
        lam_cutmix = _beta(rng, config.cutmix_alpha, n)
    fmix_on = config.enabled[2]
    a = config.fmix_alpha
    lam_fmix = (rng.beta(a + 1, a, n) if config.reformulate else rng.beta(a, a, n)) if fmix_on \
        else np.ones(n)
    normal_keys = rng.integers(0, 2**62, n) if fmix_on else None
    permutation = derangement(batch_size, rng) if config.pairing == "permutation" else None
    draws = dict(apply_u=rng.random(n), method_u=rng.random(n),
                 lam_mixup=_beta(rng, config.mixup_alpha, n), lam_cutmix=lam_cutmix,
                 lam_fmix=lam_fmix, box_u=rng.random((n, len(spatial_shape))), round_up_u=rng.random(n),
                 normal_keys=normal_keys, permutation=permutation)
    # Later methods draw after the first three's, so their streams stay as they were.
    if config.on("resizemix") or config.on("smoothmix") or config.on("gridmix"):
        draws["scale_u"] = rng.random(n)
    if config.on("gridmix"):
        draws["cells_u"] = rng.random((n, MAX_GRID ** 2))
    if config.on("saliencymix"):
        draws["lam_saliencymix"] = _beta(rng, config.saliencymix_alpha, n)
    if config.pairing in LABEL_PAIRINGS:
        draws["partner_u"] = rng.random(batch_size)
    return Draws(**draws)


def pairing(config: MixConfig, batch_size: int, permutation=None) -> np.ndarray:
    """Partner index of every primary: flip (timm), roll (torchvision), permutation."""
    index = np.arange(batch_size, dtype=np.int64)
    if config.pairing == "flip":
        return index[::-1].copy()
    if config.pairing == "roll":
        return (index - 1) % batch_size
    if config.pairing in LABEL_PAIRINGS:
        raise ValueError(f"pairing={config.pairing!r} draws partners from the labels: "
                         f"pass labels= (or pair_weights=) to params_from_draws")
    if permutation is None:
        raise ValueError("pairing='permutation' needs draws.permutation")
    return np.asarray(permutation, np.int64)


def partner_weights(config: MixConfig, labels=None, weights=None,
                    batch_size: int | None = None) -> np.ndarray:
    """The (B, B) weights of a label-aware pairing (zero diagonal): c-mixup's
    Gaussian kernel of the label distance, cross-class's 1 where the classes
    differ, or the caller's ``weights`` (B x B when ``batch_size`` is given)."""
    if config.pairing == "weights":
        if weights is None:
            raise ValueError("pairing='weights' needs pair_weights, a (B, B) matrix")
        w = np.array(weights, np.float64)
        square = w.ndim == 2 and w.shape[0] == w.shape[1]
        if not square or not np.all(w >= 0) or batch_size not in (None, w.shape[0]):
            size = "B" if batch_size is None else batch_size
            raise ValueError(f"pair_weights must be a non-negative ({size}, {size}) matrix, "
                             f"got shape {w.shape}")
    else:
        if labels is None:
            raise ValueError(f"pairing={config.pairing!r} needs the labels")
        y = np.asarray(labels)
        v = y.reshape(len(y), -1)  # class ids, or rows of dense or regression targets
        if config.pairing == "cross-class":
            w = np.any(v[:, None, :] != v[None, :, :], axis=2).astype(np.float64)
        else:
            v = v.astype(np.float64)
            distance = ((v[:, None, :] - v[None, :, :]) ** 2).sum(axis=2)
            w = np.exp(-distance / (2 * config.cmixup_bandwidth ** 2))
    np.fill_diagonal(w, 0.0)
    return w


def partner_probabilities(weights: np.ndarray) -> np.ndarray:
    """Each row of ``weights`` normalised; a row with no positive weight is
    uniform over the other samples (a batch of one pairs with itself)."""
    b = weights.shape[0]
    w = np.asarray(weights, np.float64)
    total = w.sum(axis=1, keepdims=True)
    fallback = np.ones((b, b)) - np.eye(b) if b > 1 else np.ones((1, 1))
    w = np.where(total > 0, w, fallback)
    return w / w.sum(axis=1, keepdims=True)


def pairs_from_weights(weights: np.ndarray, partner_u) -> np.ndarray:
    """Partner of every sample, drawn from its row of
    :func:`partner_probabilities` by one uniform number each (inverse CDF)."""
    cumulative = np.cumsum(partner_probabilities(weights), axis=1)
    u = np.asarray(partner_u, np.float64)[:, None] * cumulative[:, -1:]
    pair = (cumulative <= u).sum(axis=1)
    return np.minimum(pair, weights.shape[0] - 1).astype(np.int64)


def choose_methods(config: MixConfig, apply_u, method_u) -> np.ndarray:
    """Method per unit: NONE unless apply_u < prob, then by cumulative weights."""
    cumulative = config.cumulative_method_probabilities
    chosen = MIXUP + np.searchsorted(cumulative, method_u, side="right")
    mixing = (np.asarray(apply_u) < config.prob) & (cumulative[-1] > 0)
    return np.where(mixing, np.minimum(chosen, cumulative.size), NONE).astype(np.int8)


@njit(cache=True, nogil=True)
def _placed_boxes(sizes, sides, u, placement):
    """Boxes (n, 2 axes) int64 = (start0, stop0, start1, stop1, ...) along
    axes of lengths ``sizes``: on axis a, side int(sizes[a] sides[i, a])
    (a negative side spans the axis whole), placed by u[i, a] in [0, 1) as
    BOX_PLACEMENTS[placement] (gpumix.config) says. One compiled pass: the
    float64 and integer steps of cutmix_boxes' docstring, without a NumPy
    call per step (this runs on every call of the CUDA ``Mixup``)."""
    n, axes = sides.shape
    box = np.empty((n, 2 * axes), np.int64)
    for i in range(n):
        for a in range(axes):
            size = sizes[a]
            side = sides[i, a]
            if side < 0:
                start, stop = 0, size
            elif placement == 0:  # clip: centred on any pixel, clipped
                cut = np.int64(size * side)
                centre = min(np.int64(u[i, a] * size), size - 1)
                start = max(centre - cut // 2, 0)
                stop = min(centre + (cut + 1) // 2, size)
            elif placement == 1:  # inside: wherever it fits
                cut = np.int64(size * side)
                start = min(np.int64(u[i, a] * (size - cut + 1)), size - cut)
                stop = start + cut
            else:  # uniform: any origin whose box overlaps, so every pixel equally often
                cut = np.int64(size * side)
                positions = max(size + cut - 1, 1)
                origin = min(np.int64(u[i, a] * positions), positions - 1) - (cut - 1)
                start = min(max(origin, 0), size) if cut > 0 else 0
                stop = min(max(origin + cut, 0), size) if cut > 0 else 0
            box[i, 2 * a] = start
            box[i, 2 * a + 1] = stop
    return box


def _boxes(spatial_shape, sides, box_u, placement: str) -> np.ndarray:
    if placement not in BOX_PLACEMENTS:
        raise ValueError(f"placement must be one of {BOX_PLACEMENTS}, got {placement!r}")
    return _placed_boxes(np.array(spatial_shape, np.int64),
                         np.ascontiguousarray(sides, np.float64),
                         np.ascontiguousarray(box_u, np.float64),
                         BOX_PLACEMENTS.index(placement))


def cutmix_boxes(lam, box_u, spatial_shape, placement: str = "clip",
                 axes: str = "both") -> np.ndarray:
    """Boxes (n, 4) = (y0, y1, x0, x1) for sampled lam and positions in [0, 1);
    for a (D, H, W) shape, cuboids (n, 6) = (z0, z1, y0, y1, x0, x1).

    r = sqrt(1 - lam) (cbrt for cuboids), each side cut = int(size r), the
    axes apart. ``axes="width"``: a band of every row, cut_w = int(W (1 -
    lam)) (time bands of a (F, T) spectrogram, segments of a 1-D signal seen
    as 1 x L); ``axes="height"``: a band of every column, cut_h = int(H (1 -
    lam)). With u the position's draw on an axis of length size:

    * "clip", as timm's ``rand_bbox``: c = min(int(u size), size - 1), box
      [c - cut // 2, c + (cut + 1) // 2) clipped to the axis (exactly ``cut``
      long before clipping);
    * "inside": start = min(int(u (size - cut + 1)), size - cut), so the box
      fits;
    * "uniform" (composer's uniform sampling): origin = int(u P) - (cut - 1)
      over the P = size + cut - 1 positions whose box overlaps the axis,
      then clipped, so every pixel is covered equally often.
    """
    share = 1.0 - np.asarray(lam, np.float64)
    axes_count = len(spatial_shape)
    if axes == "both":
        ratio = np.cbrt(share) if axes_count == 3 else np.sqrt(share)
        sides = np.repeat(ratio[:, None], axes_count, axis=1)
    else:  # a band: one axis cut by the share, the other spanned whole
        sides = np.full((share.shape[0], 2), -1.0)
        sides[:, 1 if axes == "width" else 0] = share
    return _boxes(spatial_shape, sides, box_u, placement)


def resizemix_boxes(scale_u, box_u, spatial_shape, scale_range) -> np.ndarray:
    """ResizeMix boxes: sides int(H tau), int(W tau) with tau ~ U(scale_range),
    placed uniformly where they fit."""
    lo, hi = scale_range
    tau = lo + np.asarray(scale_u, np.float64) * (hi - lo)
    return _boxes(spatial_shape, np.repeat(tau[:, None], 2, axis=1), box_u, "inside")


def smoothmix_shapes(scale_u, box_u, spatial_shape, config: MixConfig) -> np.ndarray:
    """SmoothMix (centre_y, centre_x, sigma_y, sigma_x, square) per unit."""
    h, w = spatial_shape
    lo, hi = config.smoothmix_sigma
    s = lo + np.asarray(scale_u, np.float64) * (hi - lo)
    cy = np.minimum((box_u[:, 0] * h).astype(np.int64), h - 1)
    cx = np.minimum((box_u[:, 1] * w).astype(np.int64), w - 1)
    square = np.full(s.shape, float(config.smoothmix_shape == "square"))
    return np.stack([cy, cx, s * h, s * w, square], axis=1).astype(np.float64)


def smoothmix_lam(smooth, spatial_shape) -> np.ndarray:
    """The mean of each SmoothMix primary mask 1 - G (kernels/shape_mask.py),
    from its 1-D profiles (float32, as the kernels make them), for every unit
    at once: sum gy * sum gx for the circle; for the square, sum over y of
    sum over x of min(gy, gx), by sorting each gx and finding where each gy
    falls (units kept apart by an offset of 2 per unit, as profiles lie in
    [0, 1])."""
    h, w = spatial_shape
    smooth = np.asarray(smooth, np.float64).reshape(-1, 5)
    cy, cx, sy, sx, square = (smooth[:, k:k + 1] for k in range(5))
    gy = np.exp(-0.5 * ((np.arange(h) - cy) / sy) ** 2).astype(np.float32).astype(np.float64)
    gx = np.exp(-0.5 * ((np.arange(w) - cx) / sx) ** 2).astype(np.float32).astype(np.float64)
    total = gy.sum(axis=1) * gx.sum(axis=1)
    squares = np.flatnonzero(square[:, 0] != 0)
    if squares.size:
        offset = 2.0 * np.arange(squares.size)[:, None]
        ordered = np.sort(gx[squares], axis=1) + offset
        prefix = np.concatenate([[0.0], np.cumsum((ordered - offset).reshape(-1))])
        below = np.searchsorted(ordered.reshape(-1), gy[squares] + offset)  # global positions
        start = (np.arange(squares.size) * w)[:, None]
        smaller = prefix[below] - prefix[start]  # the gx below each gy, summed
        count = below - start
        total[squares] = np.sum(smaller + gy[squares] * (w - count), axis=1)
    return 1.0 - total / (h * w)


def gridmix_cells(scale_u, cells_u, config: MixConfig) -> np.ndarray:
    """GridMix (n, cells_low, cells_high) per unit: n uniform on gridmix_grid,
    bit c set (cell c the partner's) where cells_u[c] < gridmix_prob."""
    lo, hi = config.gridmix_grid
    n = lo + np.minimum((np.asarray(scale_u) * (hi - lo + 1)).astype(np.int64), hi - lo)
    taken = (cells_u < config.gridmix_prob) & (np.arange(MAX_GRID ** 2) < (n * n)[:, None])
    weights = np.left_shift(np.int64(1), np.arange(32, dtype=np.int64))
    low = (taken[:, :32] * weights).sum(axis=1)
    high = (taken[:, 32:] * weights).sum(axis=1)
    return np.stack([n, low, high], axis=1).astype(np.int64)


@functools.lru_cache(maxsize=8)
def _cell_areas(h: int, w: int) -> np.ndarray:
    """(MAX_GRID + 1, MAX_GRID**2) pixels of cell c = a n + b of an n x n grid."""
    areas = np.zeros((MAX_GRID + 1, MAX_GRID ** 2), np.int64)
    for n in range(1, MAX_GRID + 1):
        rows = np.bincount(np.arange(h) * n // h, minlength=n)
        cols = np.bincount(np.arange(w) * n // w, minlength=n)
        areas[n, :n * n] = np.outer(rows, cols).reshape(-1)
    areas.flags.writeable = False
    return areas


def gridmix_lam(grid, spatial_shape) -> np.ndarray:
    """The exact fraction of pixels in cells the primary keeps."""
    h, w = spatial_shape
    grid = np.asarray(grid, np.int64).reshape(-1, 3)
    cell = np.arange(MAX_GRID ** 2)
    taken = (grid[:, 1 + cell // 32] >> (cell % 32)) & 1
    partner = (taken * _cell_areas(h, w)[grid[:, 0]]).sum(axis=1)
    return 1.0 - partner / (h * w)


def saliencymix_sizes(lam, spatial_shape) -> np.ndarray:
    """SaliencyMix boxes before placement: CutMix's sides, as the unplaced
    box ``(-cut_h, 0, -cut_w, 0)`` (gpumix.saliency), which covers no pixel."""
    h, w = spatial_shape
    ratio = np.sqrt(1.0 - np.asarray(lam, np.float64))
    zeros = np.zeros(ratio.shape, np.int64)
    return np.stack([-(h * ratio).astype(np.int64), zeros, -(w * ratio).astype(np.int64), zeros],
                    axis=1)


def box_lam(box: np.ndarray, spatial_shape) -> np.ndarray:
    """Fraction of pixels (voxels) outside the box (the primary's share)."""
    extents = box[:, 1::2] - box[:, 0::2]
    covered = extents[:, 0]
    for axis in range(1, extents.shape[1]):
        covered = covered * extents[:, axis]
    return 1.0 - covered / float(math.prod(spatial_shape))


def cuboid_masks(box: np.ndarray, spatial_shape, samples) -> np.ndarray:
    """Hard masks (len(samples), D, H, W) float32 of 3-D boxes: 0 inside."""
    masks = np.ones((len(samples), *spatial_shape), np.float32)
    for m, (z0, z1, y0, y1, x0, x1) in zip(masks, box[samples]):
        m[z0:z1, y0:y1, x0:x1] = 0.0
    return masks


def params_from_draws(config: MixConfig, spatial_shape, draws: Draws, batch_size: int,
                      fmix_masks=None, pair=None, make_masks: bool = True,
                      shape_masks: bool = True, labels=None, pair_weights=None) -> MixParams:
    """Derive MixParams from draws; pure and deterministic.

    ``pair`` overrides the pairing derived from config and draws (the DALI
    step passes the pairing restricted to the real samples of a padded batch).
    Label-aware pairings draw partners from ``labels`` (or ``pair_weights``)
    with ``draws.partner_u``.
    ``fmix_masks(spectrum_keys, lo, hi) -> masks`` makes the FMix masks of
    the units that use FMix: by default :func:`gpumix.fmix.cpu_mask_maker`
    (CPU kernels, ducc0's FFT); the CUDA path passes
    :func:`gpumix.fmix.cuda_mask_maker`. ``make_masks=False`` leaves the
    masks to whoever applies the params (``fmix_keys`` and ``fmix_ranks``
    say how); lam does not depend on them. ``shape_masks=False`` (with
    ``make_masks``) makes only FMix's: the CPU DALI appliers make SmoothMix
    and GridMix masks themselves, from the table.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    check_rank(config, spatial_shape)
    units = draws.apply_u.shape[0]
    method = choose_methods(config, draws.apply_u, draws.method_u)
    present = set(method.tolist())  # each method's block runs only when a unit uses it
    lam = np.ones(units, np.float64)
    if MIXUP in present:
        fixed = config.mixup_lam
        lam = np.where(method == MIXUP, draws.lam_mixup if fixed is None else fixed, lam)

    box = np.zeros((units, 2 * len(spatial_shape)), np.int64)
    if CUTMIX in present:
        is_cut = method == CUTMIX
        sampled = draws.lam_cutmix
        box = np.where(is_cut[:, None], cutmix_boxes(sampled, draws.box_u, spatial_shape,
                                                     config.box_placement, config.cutmix_axes),
                       0)
        realised = box_lam(box, spatial_shape) if config.correct_lam else sampled
        lam = np.where(is_cut, realised, lam)

    smooth = grid = None
    for code, make_boxes in ((RESIZEMIX, lambda: resizemix_boxes(
            draws.scale_u, draws.box_u, spatial_shape, config.resizemix_scale)),
            (SALIENCYMIX, lambda: saliencymix_sizes(draws.lam_saliencymix, spatial_shape))):
        if code in present:
            chosen = method == code
            box = np.where(chosen[:, None], make_boxes(), box)
            realised = box_lam(box, spatial_shape)
            if code == SALIENCYMIX and not config.correct_lam:
                realised = draws.lam_saliencymix
            lam = np.where(chosen, realised, lam)
    if SMOOTHMIX in present:
        is_smooth = method == SMOOTHMIX
        smooth = np.where(is_smooth[:, None],
                          smoothmix_shapes(draws.scale_u, draws.box_u, spatial_shape, config), 0.0)
        lam[is_smooth] = smoothmix_lam(smooth[is_smooth], spatial_shape)
    if GRIDMIX in present:
        is_grid = method == GRIDMIX
        grid = np.where(is_grid[:, None], gridmix_cells(draws.scale_u, draws.cells_u, config), 0)
        lam[is_grid] = gridmix_lam(grid[is_grid], spatial_shape)

    mask = keys = ranks = None
    if FMIX in present:
        is_fmix = method == FMIX
        n_pix = fmix.n_pixels(spatial_shape)
        k, lo, hi = fmix.rank_bounds(draws.lam_fmix, n_pix, draws.round_up_u < 0.5,
                                     config.max_soft)
        used = np.flatnonzero(is_fmix)
        keys = np.where(is_fmix, draws.normal_keys, 0).astype(np.int64)
        ranks = np.where(is_fmix[:, None], np.stack([lo, hi], axis=1), 0).astype(np.int64)
        if make_masks:
            if fmix_masks is None:
                fmix_masks = fmix.cpu_mask_maker(spatial_shape, config.decay_power,
                                                 config.reference_compatible)
            # Spectra are expanded only for the units that use FMix.
            unit_masks = fmix_masks(draws.normal_keys[used], lo[used], hi[used])
            xp = array_module(unit_masks)
            if used.size == units:
                mask = unit_masks
            else:
                mask = xp.zeros((units, *spatial_shape), xp.float32)
                mask[used] = unit_masks
        fmix_lam = ramp_lam(lo, hi, n_pix) if config.max_soft > 0 else k / n_pix
        lam = np.where(is_fmix, fmix_lam, lam)

    if make_masks and shape_masks and (smooth is not None or grid is not None):
        shape_rows = shape_table(method, smooth, grid)
        on_host = mask is None or isinstance(mask, np.ndarray)
        host = mask if mask is not None and on_host else np.zeros((units, *spatial_shape),
                                                                   np.float32)
        shape_mask.cpu(shape_rows, host)
        if mask is None:
            mask = host
        elif not on_host:  # FMix masks made on the GPU: add these to them
            used = np.flatnonzero((method == SMOOTHMIX) | (method == GRIDMIX))
            mask[used] = array_module(mask).asarray(host[used])
    if CUTMIX in present and len(spatial_shape) == 3 and make_masks:  # cuboids as masks
        if mask is None:
            mask = np.zeros((units, *spatial_shape), np.float32)
        used = np.flatnonzero(method == CUTMIX)
        mask[used] = array_module(mask).asarray(cuboid_masks(box, spatial_shape, used))
    if units != batch_size:  # mode "batch": one unit for every sample
        method = np.repeat(method, batch_size)
        lam = np.repeat(lam, batch_size)
        box = np.repeat(box, batch_size, axis=0)
        if mask is not None:
            mask = array_module(mask).repeat(mask, batch_size, axis=0)
        if keys is not None:
            keys = np.repeat(keys, batch_size)
            ranks = np.repeat(ranks, batch_size, axis=0)
        smooth = None if smooth is None else np.repeat(smooth, batch_size, axis=0)
        grid = None if grid is None else np.repeat(grid, batch_size, axis=0)
    if pair is None and config.pairing in LABEL_PAIRINGS:
        pair = pairs_from_weights(partner_weights(config, labels, pair_weights, batch_size),
                                  draws.partner_u)
    return MixParams(
        pair=pairing(config, batch_size, draws.permutation) if pair is None
        else np.asarray(pair, np.int64),
        lam=lam.astype(np.float32),
        method=method.astype(np.int8),
        box=box,
        mask=mask,
        fmix_keys=keys,
        fmix_ranks=ranks,
        smooth=smooth,
        grid=grid,
        bilinear=config.resizemix_interpolation == "bilinear",
        saliency=config.saliencymix_saliency,
    )


def shape_table(method, smooth, grid, pair=None) -> np.ndarray:
    """A params table holding only what SmoothMix and GridMix masks are made
    from (method, shape columns; the partner when ``pair`` is given)."""
    rows = np.zeros((len(method), table.N_COLUMNS))
    rows[:, table.METHOD] = method
    if pair is not None:
        rows[:, table.PAIR] = pair
    _write_shapes(rows, smooth, grid)
    return rows


def _write_shapes(rows, smooth, grid) -> None:
    """Write the SmoothMix and GridMix columns of a table."""
    if smooth is not None:
        rows[:, table.CENTRE_Y:table.SQUARE + 1] = smooth
    if grid is not None:
        rows[:, table.GRID:table.CELLS_HIGH + 1] = grid


def array_module(a):
    """NumPy, or CuPy for CuPy arrays (masks made on the GPU)."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def to_table(params: MixParams, spatial_shape, config: MixConfig, labels=None,
             own_address=None, error_address: int = 0, label_lam=None) -> np.ndarray:
    """The params table (B, N_COLUMNS) float64 of gpumix.kernels.table
    (``labels``: class ids, 0 when not given).
    ``own_address`` (int64 per sample, CPU pipelines): the samples' pixel
    addresses, written as each row's own and partner address. ``label_lam``
    (B,): the targets' weights when they are not lam."""
    check_shape(spatial_shape)
    b = params.batch_size
    out = np.zeros((b, table.N_COLUMNS), np.float64)
    if labels is not None:
        out[:, table.LABEL] = labels
    out[:, table.PAIR] = params.pair
    out[:, table.LAM] = params.lam
    out[:, table.LABEL_LAM] = params.lam if label_lam is None else label_lam
    out[:, table.METHOD] = params.method
    out[:, table.Y0:table.X1 + 1] = params.box[:, -4:]
    if params.fmix_keys is not None:
        keys = np.asarray(params.fmix_keys, np.int64)
        out[:, table.KEY_HIGH] = keys >> 31
        out[:, table.KEY_LOW] = keys & (2**31 - 1)
        out[:, table.RANK_LOW:table.RANK_HIGH + 1] = params.fmix_ranks
    out[:, table.DECAY_POWER] = config.decay_power
    out[:, table.REFERENCE] = config.reference_compatible
    out[:, table.HEIGHT:table.WIDTH + 1] = spatial_shape[-2:]
    if len(spatial_shape) == 3:  # a volume: images of D * H rows; cuboids through masks
        depth = spatial_shape[0]
        out[:, table.Z0:table.Z1 + 1] = params.box[:, :2]
        out[:, table.HEIGHT] = depth * spatial_shape[1]
        out[:, table.DEPTH] = depth
        out[:, table.MASKED] = params.method == CUTMIX
    _write_shapes(out, params.smooth, params.grid)
    out[:, table.BILINEAR] = params.bilinear
    if own_address is not None:
        own = np.asarray(own_address, np.int64)
        if own.size and own.max() >= 2**53:
            raise RuntimeError("an image buffer's address does not fit a float64 exactly")
        out[:, table.OWN_ADDRESS] = own
        out[:, table.PARTNER_ADDRESS] = own[params.pair]
        out[:, table.ERROR_ADDRESS] = error_address
    return out


def from_table(rows, masks=None) -> MixParams:
    """The MixParams of a params table (NumPy rows), with ``masks`` if given."""
    rows = np.asarray(rows, np.float64)
    if rows.ndim != 2 or rows.shape[1] != table.N_COLUMNS:
        raise ValueError(f"table must have shape (B, {table.N_COLUMNS}) (gpumix.kernels.table), "
                         f"got {rows.shape}")
    method = rows[:, table.METHOD].astype(np.int8)
    fmix_on = bool(np.any(method == FMIX))
    keys = (rows[:, table.KEY_HIGH].astype(np.int64) << 31) | rows[:, table.KEY_LOW].astype(
        np.int64)
    smooth_on, grid_on = bool(np.any(method == SMOOTHMIX)), bool(np.any(method == GRIDMIX))
    box = rows[:, table.Y0:table.X1 + 1]
    if len(rows) and rows[0, table.DEPTH] > 0:  # a volume's cuboids
        box = np.concatenate([rows[:, table.Z0:table.Z1 + 1], box], axis=1)
    return MixParams(pair=rows[:, table.PAIR].astype(np.int64),
                     lam=rows[:, table.LAM].astype(np.float32), method=method,
                     box=box.astype(np.int64), mask=masks,
                     fmix_keys=keys if fmix_on else None,
                     fmix_ranks=rows[:, table.RANK_LOW:table.RANK_HIGH + 1].astype(np.int64)
                     if fmix_on else None,
                     smooth=rows[:, table.CENTRE_Y:table.SQUARE + 1].copy() if smooth_on
                     else None,
                     grid=rows[:, table.GRID:table.CELLS_HIGH + 1].astype(np.int64) if grid_on
                     else None,
                     bilinear=bool(np.any(rows[:, table.BILINEAR] != 0)))


def ramp_lam(num_low, num_high, n_pixels: int) -> np.ndarray:
    """The mean of a soft FMix mask with these rank bounds (the label weight
    of the primary): ``num_low`` ranks at 1, then a linear ramp from 1 down
    to 0 over ``num_high - num_low`` ranks (a single-rank ramp is 1), whose
    values sum to half its width. Known from the ranks alone, so the label
    never waits for the mask."""
    low = np.asarray(num_low, np.float64)
    width = np.asarray(num_high, np.float64) - low
    ramp = np.where(width == 1, 1.0, width / 2)
    return (low + ramp) / n_pixels


def sample(config: MixConfig, batch_size: int, spatial_shape, rng=None) -> MixParams:
    """Draw and derive the parameters for one batch (NumPy, CPU masks)."""
    draws = draw(config, batch_size, spatial_shape, rng)
    return params_from_draws(config, spatial_shape, draws, batch_size)
