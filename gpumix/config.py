"""MixConfig: every mixing option, validated once (docs/semantics.md,
"Granularity, probability and the choice of method" and "Errors").

Pairing: "flip" (timm), "roll" (torchvision), "permutation" (a random
derangement), or partners drawn per sample with probability proportional to
a weight w[i, j] (w[i, i] = 0): "c-mixup" (Yao et al., NeurIPS 2022:
exp(-||y_i - y_j||^2 / (2 cmixup_bandwidth^2)) for regression targets),
"cross-class" (1 where the classes differ) or "weights" (a (B, B) matrix the
caller gives with each batch). A row with no positive weight falls back to
every other sample alike.

``cutmix_axes``: "both" (a box), "width" (a band of every row: time bands
of (F, T) spectrograms, segments of 1-D signals) or "height" (a band of
every column: frequency bands); a band's width is int(W (1 - lam)).

``mixup_lam``: a fixed MixUp lam instead of the Beta draw (Midpoint Mixup:
0.5); MixUp still needs ``mixup_alpha > 0`` to be on.

Option names follow timm's ``Mixup`` (mixup_alpha, cutmix_alpha,
cutmix_minmax, prob, switch_prob, mode, correct_lam, label_smoothing,
num_classes) plus FMix's (fmix_alpha, decay_power, max_soft, reformulate),
one group per further method (``resizemix_*``, ``smoothmix_*``,
``gridmix_*``, ``saliencymix_alpha``) and gpumix's own (pairing,
box_placement, method_weights, reference_compatible). An alpha of 0 turns
its method off; with every method off mixing is the identity and targets are
smoothed one-hots.

Methods (:data:`METHODS`, codes 1..7 in that order, 0 = no mixing): MixUp,
CutMix, FMix, ResizeMix, SmoothMix, GridMix, SaliencyMix. Which are on and
how often each is chosen once mixing happens:

* ``method_weights`` a mapping ``{name: weight}``: exactly the named methods
  with a positive weight are on, chosen in proportion to the weights. A
  named method that has an alpha needs it positive (``cutmix_alpha`` for
  "cutmix", ...); ResizeMix, SmoothMix and GridMix have none.
* ``method_weights`` three numbers (timm-style, MixUp, CutMix, FMix): those
  of the three whose alpha is positive, in proportion to the weights.
* None: the methods whose alpha is positive; with exactly MixUp and CutMix
  on, CutMix with probability ``switch_prob`` (timm's meaning); otherwise
  uniform over them.

``cutmix_minmax=(lo, hi)`` draws the CutMix lam from Uniform(lo, hi) (the
contract in docs/semantics.md; timm instead draws box sides directly) and
turns CutMix on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

METHODS = ("mixup", "cutmix", "fmix", "resizemix", "smoothmix", "gridmix", "saliencymix")
# The per-sample method codes of MixParams.method and the params table.
NONE, MIXUP, CUTMIX, FMIX, RESIZEMIX, SMOOTHMIX, GRIDMIX, SALIENCYMIX = range(len(METHODS) + 1)
MASK_METHODS = (FMIX, SMOOTHMIX, GRIDMIX)  # applied through a (B, H, W) mask
BOX_METHODS = (CUTMIX, SALIENCYMIX)  # a box of the partner's pixels at the same place
ALPHA_OF = {"mixup": "mixup_alpha", "cutmix": "cutmix_alpha", "fmix": "fmix_alpha",
            "saliencymix": "saliencymix_alpha"}
SMOOTHMIX_SHAPES = ("circle", "square")
INTERPOLATIONS = ("nearest", "bilinear")
SALIENCY_METHODS = ("spectral_residual", "fine_grained")  # gpumix.saliency
MAX_GRID = 8  # GridMix cells per side: n * n <= 64 cells fit two 32-bit table columns

MODES = ("batch", "elem")
PAIRINGS = ("flip", "roll", "permutation", "c-mixup", "cross-class", "weights")
LABEL_PAIRINGS = ("c-mixup", "cross-class", "weights")  # partners drawn from the labels
BOX_PLACEMENTS = ("clip", "inside", "uniform")
CUTMIX_AXES = ("both", "width", "height")  # a box, a band of every row, of every column


def _check_number(name: str, value, low: float, high: float = math.inf, *, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = low <= value and (value < high if high_open else value <= high)
    if not ok or not math.isfinite(value):  # NaN and inf too, whatever the bounds
        bracket = ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


def _check_range(name: str, value, low: float, high: float, *, integer=False) -> tuple:
    """A (lo, hi) pair with low <= lo <= hi <= high, as floats (ints if ``integer``)."""
    if not isinstance(value, (tuple, list, np.ndarray)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (lo, hi), got {value!r}")
    for k, v in enumerate(value):
        if integer and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise TypeError(f"{name}[{k}] must be an int, got {type(v).__name__}")
        _check_number(f"{name}[{k}]", v, low, high)
    if value[0] > value[1]:
        raise ValueError(f"{name} must have lo <= hi, got {tuple(value)!r}")
    kind = int if integer else float
    return kind(value[0]), kind(value[1])


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@dataclass(frozen=True)
class MixConfig:
    """Validated mixing options; see the module docstring for their meaning."""

    mixup_alpha: float = 1.0
    mixup_lam: float | None = None
    cutmix_alpha: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    fmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    method_weights: tuple[float, float, float] | dict | None = None
    mode: str = "batch"
    pairing: str = "flip"
    cmixup_bandwidth: float = 1.0
    correct_lam: bool = True
    label_smoothing: float = 0.1
    num_classes: int = 1000
    box_placement: str = "clip"
    cutmix_axes: str = "both"
    decay_power: float = 3.0
    max_soft: float = 0.0
    reformulate: bool = False
    reference_compatible: bool = False
    resizemix_scale: tuple[float, float] = (0.1, 0.8)
    resizemix_interpolation: str = "nearest"
    smoothmix_sigma: tuple[float, float] = (0.25, 0.5)
    smoothmix_shape: str = "circle"
    gridmix_grid: tuple[int, int] = (2, 8)
    gridmix_prob: float = 0.5
    saliencymix_alpha: float = 0.0
    saliencymix_saliency: str = "spectral_residual"

    def __post_init__(self):
        if self.mixup_lam is not None:
            _check_number("mixup_lam", self.mixup_lam, 0.0, 1.0)
        for name in ALPHA_OF.values():
            _check_number(name, getattr(self, name), 0.0)
        _check_number("prob", self.prob, 0.0, 1.0)
        _check_number("switch_prob", self.switch_prob, 0.0, 1.0)
        _check_number("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        _check_number("decay_power", self.decay_power, 0.0)
        _check_number("max_soft", self.max_soft, 0.0, 0.5)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)):
            raise TypeError(f"num_classes must be an int, got {type(self.num_classes).__name__}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        _check_choice("mode", self.mode, MODES)
        _check_choice("pairing", self.pairing, PAIRINGS)
        _check_number("cmixup_bandwidth", self.cmixup_bandwidth, 0.0)
        if self.cmixup_bandwidth <= 0:
            raise ValueError(f"cmixup_bandwidth must be positive, got {self.cmixup_bandwidth}")
        _check_choice("box_placement", self.box_placement, BOX_PLACEMENTS)
        _check_choice("cutmix_axes", self.cutmix_axes, CUTMIX_AXES)
        if self.cutmix_minmax is not None:
            object.__setattr__(self, "cutmix_minmax",
                               _check_range("cutmix_minmax", self.cutmix_minmax, 0.0, 1.0))
        fields = {"resizemix_scale": _check_range("resizemix_scale", self.resizemix_scale,
                                                  0.0, 1.0),
                  "smoothmix_sigma": _check_range("smoothmix_sigma", self.smoothmix_sigma,
                                                  0.0, math.inf),
                  "gridmix_grid": _check_range("gridmix_grid", self.gridmix_grid, 1, MAX_GRID,
                                               integer=True)}
        if fields["smoothmix_sigma"][0] <= 0:
            raise ValueError(f"smoothmix_sigma must be positive, got {self.smoothmix_sigma!r}")
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        _check_number("gridmix_prob", self.gridmix_prob, 0.0, 1.0)
        _check_choice("smoothmix_shape", self.smoothmix_shape, SMOOTHMIX_SHAPES)
        _check_choice("resizemix_interpolation", self.resizemix_interpolation, INTERPOLATIONS)
        _check_choice("saliencymix_saliency", self.saliencymix_saliency, SALIENCY_METHODS)
        if self.method_weights is not None:
            object.__setattr__(self, "method_weights", self._checked_weights())

    def _checked_weights(self):
        """method_weights as a tuple of floats or a {name: float} dict, checked."""
        weights = self.method_weights
        if isinstance(weights, dict):
            checked = {}
            for name, w in weights.items():
                _check_choice("method_weights key", name, METHODS)
                _check_number(f"method_weights[{name!r}]", w, 0.0)
                alpha = ALPHA_OF.get(name)
                if w > 0 and alpha and not self._alpha_on(name):
                    raise ValueError(f"method_weights gives {name!r} a weight but {alpha} is 0: "
                                     f"set {alpha} > 0 (or drop {name!r})")
                checked[name] = float(w)
            return checked
        if isinstance(weights, (str, bytes)) or len(weights) != 3:
            raise ValueError("method_weights must be three weights (mixup, cutmix, fmix) or a "
                             f"mapping of method names to weights, got {weights!r}")
        for name, w in zip(METHODS, weights):
            _check_number(f"method_weights[{name}]", w, 0.0)
        return tuple(float(w) for w in weights)

    def _alpha_on(self, name: str) -> bool:
        if name == "cutmix" and self.cutmix_minmax is not None:
            return True
        return getattr(self, ALPHA_OF[name]) > 0

    @functools.cached_property
    def enabled(self) -> tuple[bool, ...]:
        """Whether each method of :data:`METHODS` is on (MixUp, CutMix, FMix first)."""
        if isinstance(self.method_weights, dict):
            return tuple(self.method_weights.get(name, 0.0) > 0 for name in METHODS)
        return tuple(name in ALPHA_OF and self._alpha_on(name) for name in METHODS)

    def on(self, name: str) -> bool:
        """Whether the method called ``name`` (one of :data:`METHODS`) is on."""
        return self.enabled[METHODS.index(name)]

    @property
    def uses_masks(self) -> bool:
        """Whether some method on is applied through masks (FMix, SmoothMix, GridMix)."""
        return any(self.enabled[code - 1] for code in MASK_METHODS)

    @functools.cached_property
    def cumulative_method_probabilities(self) -> np.ndarray:
        """The running sum of :meth:`method_probabilities` (computed once)."""
        cumulative = np.cumsum(self.method_probabilities())
        cumulative.flags.writeable = False
        return cumulative

    def method_probabilities(self) -> np.ndarray:
        """P(method) for each of :data:`METHODS` given that mixing happens
        (zeros if all are off)."""
        on = np.array(self.enabled, dtype=np.float64)
        if isinstance(self.method_weights, dict):
            weights = np.array([self.method_weights.get(name, 0.0) for name in METHODS]) * on
        elif self.method_weights is not None:
            weights = np.array([*self.method_weights, 0, 0, 0, 0], np.float64) * on
        elif on[0] and on[1] and on.sum() == 2:
            weights = np.zeros(len(METHODS))
            weights[:2] = 1.0 - self.switch_prob, self.switch_prob
        else:
            weights = on
        total = weights.sum()
        return weights / total if total > 0 else weights
