"""MixConfig: every mixing option, validated once (docs/semantics.md,
"Granularity, probability and the choice of method" and "Errors").

Option names follow timm's ``Mixup`` (mixup_alpha, cutmix_alpha,
cutmix_minmax, prob, switch_prob, mode, correct_lam, label_smoothing,
num_classes) plus FMix's (fmix_alpha, decay_power, max_soft, reformulate)
and gpumix's own (pairing, box_placement, method_weights,
reference_compatible). An alpha of 0 turns its method off; with every method
off mixing is the identity and targets are smoothed one-hots.

Method choice once mixing happens: ``method_weights`` (MixUp, CutMix, FMix)
when given; otherwise, with exactly MixUp and CutMix on, CutMix with
probability ``switch_prob`` (timm's meaning); otherwise uniform over the
methods that are on.

``cutmix_minmax=(lo, hi)`` draws the CutMix lam from Uniform(lo, hi) (the
contract in docs/semantics.md; timm instead draws box sides directly) and
turns CutMix on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

NONE, MIXUP, CUTMIX, FMIX = 0, 1, 2, 3  # the per-sample method codes of MixParams.method

MODES = ("batch", "elem")
PAIRINGS = ("flip", "roll", "permutation")
BOX_PLACEMENTS = ("clip", "inside", "uniform")


def _check_number(name: str, value, low: float, high: float = math.inf, *, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = low <= value and (value < high if high_open else value <= high)
    if not ok or math.isnan(value):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@dataclass(frozen=True)
class MixConfig:
    """Validated mixing options; see the module docstring for their meaning."""

    mixup_alpha: float = 1.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    fmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    method_weights: tuple[float, float, float] | None = None
    mode: str = "batch"
    pairing: str = "flip"
    correct_lam: bool = True
    label_smoothing: float = 0.1
    num_classes: int = 1000
    box_placement: str = "clip"
    decay_power: float = 3.0
    max_soft: float = 0.0
    reformulate: bool = False
    reference_compatible: bool = False

    def __post_init__(self):
        for name in ("mixup_alpha", "cutmix_alpha", "fmix_alpha"):
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
        _check_choice("box_placement", self.box_placement, BOX_PLACEMENTS)
        if self.cutmix_minmax is not None:
            if len(self.cutmix_minmax) != 2:
                raise ValueError(f"cutmix_minmax must be (lo, hi), got {self.cutmix_minmax!r}")
            lo, hi = self.cutmix_minmax
            _check_number("cutmix_minmax[0]", lo, 0.0, 1.0)
            _check_number("cutmix_minmax[1]", hi, 0.0, 1.0)
            if lo > hi:
                raise ValueError(f"cutmix_minmax must have lo <= hi, got {self.cutmix_minmax!r}")
            object.__setattr__(self, "cutmix_minmax", (float(lo), float(hi)))
        if self.method_weights is not None:
            if len(self.method_weights) != 3:
                raise ValueError("method_weights must be three weights (mixup, cutmix, fmix), "
                                 f"got {self.method_weights!r}")
            for name, w in zip(("mixup", "cutmix", "fmix"), self.method_weights):
                _check_number(f"method_weights[{name}]", w, 0.0)
            object.__setattr__(self, "method_weights", tuple(float(w) for w in self.method_weights))

    @property
    def enabled(self) -> tuple[bool, bool, bool]:
        """Whether MixUp, CutMix and FMix are on."""
        return (self.mixup_alpha > 0,
                self.cutmix_alpha > 0 or self.cutmix_minmax is not None,
                self.fmix_alpha > 0)

    @functools.cached_property
    def cumulative_method_probabilities(self) -> np.ndarray:
        """The running sum of :meth:`method_probabilities` (computed once)."""
        cumulative = np.cumsum(self.method_probabilities())
        cumulative.flags.writeable = False
        return cumulative

    def method_probabilities(self) -> np.ndarray:
        """P(MixUp), P(CutMix), P(FMix) given that mixing happens (zeros if all off)."""
        on = np.array(self.enabled, dtype=np.float64)
        if self.method_weights is not None:
            weights = np.array(self.method_weights) * on
        elif on[0] and on[1] and not on[2]:
            weights = np.array([1.0 - self.switch_prob, self.switch_prob, 0.0])
        else:
            weights = on
        total = weights.sum()
        return weights / total if total > 0 else weights
