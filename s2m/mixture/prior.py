"""Priors of the fitted mixture and the penalised log-likelihood that the fit maximises.

For one set of member points :math:`x_1, \\dots, x_N \\in \\mathbb{R}^D` and a mixture of
:math:`K` diagonal Gaussians with weights :math:`\\pi_k`, means :math:`\\mu_{kd}` and
variances :math:`\\sigma^2_{kd}`, the objective is

.. math::

    \\mathcal{L} = \\sum_{i=1}^N \\log \\sum_{k=1}^K \\pi_k\\, \\mathcal{N}(x_i \\mid \\mu_k, \\operatorname{diag} \\sigma^2_k)
    - \\sum_{k,d} \\Big[ \\frac{n_0}{2} \\Big(\\log \\sigma^2_{kd} + \\frac{v_0}{\\sigma^2_{kd}}\\Big)
    + \\frac{\\kappa_0}{2} \\frac{\\mu_{kd}^2}{\\sigma^2_{kd}} \\Big]
    + \\lambda \\sum_k \\log \\pi_k .

The variance term is an inverse-gamma-type prior (shape :math:`n_0/2 - 1`, scale
:math:`n_0 v_0 / 2`): it acts like :math:`n_0` extra points whose squared deviation is
:math:`v_0` in every dimension. The mean term shrinks each mean towards the origin with
:math:`\\kappa_0` pseudo-points, and the weight term is a Dirichlet prior with concentration
:math:`\\lambda + 1`. With responsibilities :math:`r_{ik}` and :math:`N_k = \\sum_i r_{ik}`,
the maximiser of the EM surrogate is, exactly,

.. math::

    \\pi_k = \\frac{N_k + \\lambda}{N + K\\lambda}, \\quad
    \\mu_k = \\frac{\\sum_i r_{ik} x_i}{N_k + \\kappa_0}, \\quad
    \\sigma^2_k = \\frac{\\sum_i r_{ik} (x_i - \\mu_k)^2 + \\kappa_0 \\mu_k^2 + n_0 v_0}{N_k + n_0}.

The priors are what keep every fit well defined: :math:`n_0 v_0 > 0` keeps variances
positive for duplicate points and constant dimensions, and :math:`\\kappa_0 > 0`,
:math:`\\lambda > 0` keep the Hessian of :math:`\\mathcal{L}` invertible when a component
loses all its points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from s2m.mixture.checks import is_real

#: Default prior variance per dimension, as a fraction of ``1 / D``. Unit vectors spread
#: evenly over the sphere in R^D have a per-dimension variance of ``1 / D``, and a set of
#: descriptors of one concept is tighter than that.
DEFAULT_RELATIVE_VARIANCE = 0.1


@dataclass(frozen=True)
class VariancePrior:
    """Inverse-gamma-type prior on every variance of the mixture.

    Adds :math:`-\\frac{n_0}{2}(\\log \\sigma^2 + v_0 / \\sigma^2)` per variance to the
    objective, so that the M-step is :math:`\\sigma^2 = (S_k + n_0 v_0) / (N_k + n_0)`
    (:math:`S_k` the weighted scatter of the component, plus the mean-prior term).

    Attributes
    ----------
    variance : float or None
        :math:`v_0`, the variance the prior pulls towards. ``None`` means
        ``0.1 / D`` for D-dimensional data, which suits L2-normalised descriptors: their
        per-dimension variance is about ``1 / D`` over the whole sphere, less within a set.
        Pass an explicit value for data on another scale.
    pseudo_count : float
        :math:`n_0`, the weight of the prior in points. The default 1.0 lets one point's
        worth of prior variance bound the variance of a component away from zero.

    Raises
    ------
    ValueError
        If ``variance`` is neither None nor a finite number > 0, or ``pseudo_count`` is not
        a finite number > 0.
    """

    variance: float | None = None
    pseudo_count: float = 1.0

    def __post_init__(self) -> None:
        variance = self.variance
        if variance is not None and not (is_real(variance) and math.isfinite(variance) and variance > 0):
            raise ValueError(
                f"variance_prior.variance must be a finite number > 0, got {variance!r}. "
                "Pass None for the default 0.1 / D."
            )

        count = self.pseudo_count
        if not (is_real(count) and math.isfinite(count) and count > 0):
            raise ValueError(
                f"variance_prior.pseudo_count must be a finite number > 0, got {count!r}. "
                "Without it, a dimension with zero variance would get a zero variance. "
                "Pass a small value such as 1e-6 for a nearly flat prior."
            )


@dataclass(frozen=True)
class Penalty:
    """All prior constants of the objective, resolved for one data dimension.

    Attributes
    ----------
    variance : float
        :math:`v_0`.
    variance_count : float
        :math:`n_0`.
    mean_count : float
        :math:`\\kappa_0`.
    weight_count : float
        :math:`\\lambda`, the Dirichlet concentration minus one.
    """

    variance: float
    variance_count: float
    mean_count: float
    weight_count: float


def resolve_penalty(
    dim: int,
    variance_prior: VariancePrior,
    mean_prior_count: float,
    weight_prior_count: float,
) -> Penalty:
    """Validate the prior options and resolve the default prior variance for ``dim``.

    Raises
    ------
    ValueError
        If ``variance_prior`` is not a :class:`VariancePrior`, or a prior count is negative
        or not finite.
    """
    if not isinstance(variance_prior, VariancePrior):
        raise ValueError(
            f"variance_prior must be a VariancePrior, got {type(variance_prior).__name__}; "
            "pass for example VariancePrior(variance=1e-3, pseudo_count=1.0)."
        )

    # VariancePrior checks its own fields when it is created.
    variance = variance_prior.variance
    if variance is None:
        variance = DEFAULT_RELATIVE_VARIANCE / dim
    count = variance_prior.pseudo_count

    for name, value in (("mean_prior_count", mean_prior_count), ("weight_prior_count", weight_prior_count)):
        if not (is_real(value) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")

    return Penalty(float(variance), float(count), float(mean_prior_count), float(weight_prior_count))


def log_prior(
    log_weights: Tensor, means: Tensor, variances: Tensor, penalty: Penalty, log_variances: Tensor | None = None
) -> Tensor:
    """Compute the prior terms of the objective for each set.

    Parameters
    ----------
    log_weights : Tensor of shape (B, K)
    means, variances : Tensor of shape (B, K, D)
    penalty : Penalty
    log_variances : Tensor of shape (B, K, D), optional
        ``log(variances)``, passed by callers that have it already.

    Returns
    -------
    Tensor of shape (B,)
    """
    if log_variances is None:
        log_variances = torch.log(variances)
    precisions = variances.reciprocal()
    return log_prior_from_sums(
        log_weights,
        log_variances.sum(dim=-1),
        precisions.sum(dim=-1),
        (means.square() * precisions).sum(dim=-1),
        penalty,
    )


def log_prior_from_sums(
    log_weights: Tensor,
    sum_log_variances: Tensor,
    sum_precisions: Tensor,
    sum_scaled_mean_squares: Tensor,
    penalty: Penalty,
) -> Tensor:
    """Compute the prior terms of the objective from per-component sums over dimensions.

    The E-step has these sums at hand, so it evaluates the prior without another pass
    over the (B, K, D) parameters.

    Parameters
    ----------
    log_weights : Tensor of shape (B, K)
    sum_log_variances : Tensor of shape (B, K)
        :math:`\\sum_d \\log \\sigma^2_{kd}`.
    sum_precisions : Tensor of shape (B, K)
        :math:`\\sum_d 1 / \\sigma^2_{kd}`.
    sum_scaled_mean_squares : Tensor of shape (B, K)
        :math:`\\sum_d \\mu_{kd}^2 / \\sigma^2_{kd}`.
    penalty : Penalty

    Returns
    -------
    Tensor of shape (B,)
    """
    per_component = penalty.variance_count * (sum_log_variances + penalty.variance * sum_precisions)

    # Zero counts skip their terms, because 0 * log(0) would turn a weight of 0 into NaN.
    if penalty.mean_count > 0:
        per_component = per_component + penalty.mean_count * sum_scaled_mean_squares
    total = -0.5 * per_component.sum(dim=-1)
    if penalty.weight_count > 0:
        total = total + penalty.weight_count * log_weights.sum(dim=-1)
    return total
