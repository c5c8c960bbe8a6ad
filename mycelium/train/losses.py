"""Class weights and losses for imbalanced classification.

The seed's three recipes map onto ``class_weights`` schemes:

- C4/C5 ``balanced``: sklearn's ``n / (k * count)``. At 2.6% BRIDGING that is ~19.2, the seed's
  "BRIDGING up-weighted ~19x".
- C6 ``clipped``: balanced, then no class above ``clip`` x the smallest (base) weight. The seed's
  second C6 attempt used unclipped inverse frequency and collapsed to "RADICAL only".
- C6 remedy ``sqrt_inv``: the square root of the balanced weights, i.e. proportional to
  sqrt(1 / frequency); the spread between classes is the square root of balanced's.
- C6 remedy ``focal``: ``FocalLoss`` with gamma 2 (optionally on top of any weights).
- ``effective``: class-balanced weights by the effective number of samples (Cui et al., CVPR
  2019), ``(1 - beta) / (1 - beta^n)``: between ``none`` (beta -> 0) and ``balanced`` (beta -> 1).
- ``logit_adjusted`` loss (Menon et al., ICLR 2021): cross-entropy on ``logits + tau * log(prior)``
  during training; the served logits are the plain ones, so the prior is taken out at inference.

Weights keep sklearn's scale (the majority class gets a weight below 1). The scale does not
matter for training: the weighted mean is normalised by the sum of the target weights, as in
``F.cross_entropy(weight=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

WEIGHT_SCHEMES: tuple[str, ...] = ("none", "balanced", "clipped", "sqrt_inv", "effective", "explicit")
LOSSES: tuple[str, ...] = ("ce", "focal", "logit_adjusted")


def class_counts(y_train: Sequence[int], n_classes: int) -> np.ndarray:
    """Examples per class index; raises on labels outside ``0..n_classes-1``."""
    y = np.asarray(y_train, dtype=np.int64).reshape(-1)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        bad = sorted({int(v) for v in y if v < 0 or v >= n_classes})
        raise ValueError(f"label indices {bad} are outside 0..{n_classes - 1}")
    return np.bincount(y, minlength=n_classes)


def class_weights(
    y_train: Sequence[int],
    n_classes: int,
    scheme: str,
    clip: float = 5.0,
    explicit: Sequence[float] | None = None,
    label_names: Sequence[str] | None = None,
    beta: float = 0.999,
) -> np.ndarray:
    """Per-class loss weights (float64, length ``n_classes``) for the given scheme.

    ``y_train`` holds class indices. The count-based schemes (balanced, clipped, sqrt_inv) raise
    ``ValueError`` naming any class without training examples: its weight would be infinite and
    the class cannot be learnt anyway. ``none`` and ``explicit`` do not look at the counts.
    """
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown class weight scheme {scheme!r}: choose one of {', '.join(WEIGHT_SCHEMES)}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be positive, got {n_classes}")
    names = list(label_names) if label_names is not None else [str(i) for i in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} label names for {n_classes} classes")

    if scheme == "none":
        return np.ones(n_classes, dtype=np.float64)
    if scheme == "explicit":
        if explicit is None:
            raise ValueError("class weight scheme 'explicit' needs a list of weights")
        w = np.asarray(list(explicit), dtype=np.float64)
        if w.shape != (n_classes,):
            raise ValueError(
                f"explicit class weights have {w.size} values for {n_classes} classes ({', '.join(names)})"
            )
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"explicit class weights must be finite and non-negative, got {w.tolist()}")
        return w

    counts = class_counts(y_train, n_classes)
    missing = [names[i] for i in range(n_classes) if counts[i] == 0]
    if missing:
        raise ValueError(
            f"no training examples for class(es) {', '.join(missing)}: scheme {scheme!r} needs every class "
            f"in the training data (counts: {dict(zip(names, counts.tolist()))})"
        )
    y = np.asarray(y_train, dtype=np.int64).reshape(-1)
    # n / (k * count): every class contributes the same total weight to the loss.
    balanced = compute_class_weight("balanced", classes=np.arange(n_classes), y=y).astype(np.float64)

    if scheme == "balanced":
        return balanced
    if scheme == "sqrt_inv":
        return np.sqrt(balanced)
    if scheme == "effective":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"effective-number beta must be in (0, 1), got {beta}")
        w = (1.0 - beta) / (1.0 - np.power(beta, counts.astype(np.float64)))
        return w * n_classes / w.sum()  # Cui et al.'s normalisation: the weights sum to the class count
    # clipped: the seed's "no class gets more than 5x the base weight"; the base is the smallest
    # weight, i.e. the majority class's.
    if not clip >= 1.0:
        raise ValueError(f"class weight clip must be >= 1 (a multiple of the smallest weight), got {clip}")
    return np.minimum(balanced, clip * balanced.min())


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): ``-w_y (1 - p_y)^gamma log p_y``.

    Reduced like ``F.cross_entropy(weight=...)``: ``mean`` divides by the sum of the targets'
    weights, so with ``gamma=0`` this is weighted cross-entropy exactly (same ops, same numbers).
    """

    def __init__(self, weight: torch.Tensor | None = None, gamma: float = 2.0, reduction: str = "mean"):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
        self.gamma = float(gamma)
        self.reduction = reduction
        # A buffer so model.to(device) / loss.to(device) moves the weights with it.
        self.register_buffer("weight", None if weight is None else weight.detach().clone().float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Softmax in float32: fp16/bf16 logits lose the small probabilities focal loss relies on.
        logp = F.log_softmax(logits.float(), dim=-1)
        if self.gamma != 0.0:
            # Modulate every class's log-prob; nll_loss then picks the target column and applies
            # the weighted-mean reduction, which keeps the reduction identical to cross_entropy.
            p = logp.exp()
            logp = (1.0 - p).clamp_min(0.0).pow(self.gamma) * logp
        return F.nll_loss(logp, target, weight=self.weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, weighted={self.weight is not None}, reduction={self.reduction!r}"


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy (Menon et al. 2021): ``CE(logits + tau * log(prior), y)``.

    Only training sees the adjustment; evaluation and serving use the plain logits, which then
    estimate the class-balanced posterior. ``train_mode`` is set by the caller's ``.train()``.
    """

    def __init__(self, prior: torch.Tensor, tau: float = 1.0, weight: torch.Tensor | None = None):
        super().__init__()
        if tau < 0:
            raise ValueError(f"logit adjustment tau must be >= 0, got {tau}")
        self.tau = float(tau)
        self.register_buffer("log_prior", torch.log(prior.detach().clone().float().clamp_min(1e-12)))
        self.register_buffer("weight", None if weight is None else weight.detach().clone().float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        adjusted = logits.float() + self.tau * self.log_prior if self.training else logits.float()
        return F.cross_entropy(adjusted, target, weight=self.weight)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, weighted={self.weight is not None}"


def make_loss(name: str, weight: torch.Tensor | None = None, gamma: float = 2.0, prior: torch.Tensor | None = None,
              tau: float = 1.0) -> nn.Module:
    """``ce`` -> ``nn.CrossEntropyLoss(weight)``; ``focal`` -> ``FocalLoss(weight, gamma)``;
    ``logit_adjusted`` -> ``LogitAdjustedLoss(prior, tau, weight)`` (``prior``: training class shares)."""
    if name == "ce":
        return nn.CrossEntropyLoss(weight=None if weight is None else weight.detach().clone().float())
    if name == "focal":
        return FocalLoss(weight=weight, gamma=gamma)
    if name == "logit_adjusted":
        if prior is None:
            raise ValueError("loss 'logit_adjusted' needs the training class prior")
        return LogitAdjustedLoss(prior, tau, weight)
    raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
