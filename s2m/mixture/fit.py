"""Batched fitting of diagonal Gaussians and their mixtures to sets of descriptors.

Both fits maximise the penalised log-likelihood stated in :mod:`s2m.mixture.prior`. The
K = 1 closed form and EM with K = 1 therefore return the same model.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import Tensor

from s2m.mixture.checks import is_integer, is_real, list_sets, validate_points
from s2m.mixture.em import PointFeatures, e_step, initial_parameters, point_features, run_em
from s2m.mixture.implicit import FiniteSetGradients, ImplicitEMFit
from s2m.mixture.model import GaussianMixtureFit
from s2m.mixture.prior import Penalty, VariancePrior, resolve_penalty

logger = logging.getLogger(__name__)

BACKWARD_MODES = ("implicit", "unrolled")
INIT_MODES = ("kmeans++",)
INIT_REQUIREMENT = "'kmeans++' or a (weights, means, variances) tuple or list of tensors"


class ConvergenceWarning(UserWarning):
    """Warning that EM reached ``max_iter`` before the tolerance for some sets."""


def attach_lower_bound(
    features: PointFeatures,
    member: Tensor,
    weights: Tensor,
    means: Tensor,
    variances: Tensor,
    penalty: Penalty,
    converged: Tensor,
    n_iter: Tensor,
) -> GaussianMixtureFit:
    """Evaluate the objective per member at the parameters, with autograd, and build the fit."""
    _, objective = e_step(features, member, weights, means, variances, penalty)
    lower_bound = (objective / member.sum(dim=-1)).to(member.dtype)
    return GaussianMixtureFit(weights, means, variances, converged, n_iter, lower_bound)


def fit_diagonal_gaussian(
    x: Tensor,
    mask: Tensor | None = None,
    *,
    variance_prior: VariancePrior = VariancePrior(),
    mean_prior_count: float = 0.01,
) -> GaussianMixtureFit:
    """Fit one diagonal Gaussian to each set in closed form, differentiable by plain autograd.

    Maximises the objective of :mod:`s2m.mixture.prior` with K = 1:

    .. math::

        \\mu = \\frac{\\sum_i x_i}{N + \\kappa_0}, \\qquad
        \\sigma^2 = \\frac{\\sum_i (x_i - \\mu)^2 + \\kappa_0 \\mu^2 + n_0 v_0}{N + n_0}.

    Parameters
    ----------
    x : Tensor of shape (B, N, D), float32 or float64
        Padded sets of points.
    mask : Tensor of shape (B, N), bool, optional
        True for members. None means all rows are members.
    variance_prior : VariancePrior
        :math:`v_0` and :math:`n_0`. The default :math:`v_0` is ``0.1 / D``.
    mean_prior_count : float
        :math:`\\kappa_0`, pseudo-points that shrink the mean towards the origin.

    Returns
    -------
    GaussianMixtureFit
        Batch shape (B,), K = 1, with ``converged`` all True and ``n_iter`` all 0.

    Raises
    ------
    ValueError
        If the inputs or prior options are invalid, or a set has no member.
    """
    x, member = validate_points(x, mask)
    penalty = resolve_penalty(x.shape[-1], variance_prior, mean_prior_count, 0.0)
    check_set_sizes(member, 1)

    counts = member.sum(dim=-1, keepdim=True)
    weighted = x * member.unsqueeze(-1)
    means = weighted.sum(dim=1) / (counts + penalty.mean_count)
    deviations = (x - means.unsqueeze(1)) * member.unsqueeze(-1)
    scatter = deviations.square().sum(dim=1) + penalty.mean_count * means.square()
    variances = (scatter + penalty.variance_count * penalty.variance) / (counts + penalty.variance_count)

    batch_size = x.shape[0]
    weights = torch.ones(batch_size, 1, dtype=x.dtype, device=x.device)
    converged = torch.ones(batch_size, dtype=torch.bool, device=x.device)
    n_iter = torch.zeros(batch_size, dtype=torch.int64, device=x.device)
    return attach_lower_bound(
        point_features(x), member, weights, means.unsqueeze(1), variances.unsqueeze(1), penalty, converged, n_iter
    )


def fit_diagonal_gmm(
    x: Tensor,
    n_components: int,
    mask: Tensor | None = None,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    init: str | tuple[Tensor, Tensor, Tensor] = "kmeans++",
    backward: str = "implicit",
    variance_prior: VariancePrior = VariancePrior(),
    mean_prior_count: float = 0.01,
    weight_prior_count: float = 0.1,
) -> GaussianMixtureFit:
    """Fit a mixture of diagonal Gaussians to each set by EM, batched over sets.

    The fit is a stationary point of the penalised log-likelihood of
    :mod:`s2m.mixture.prior`,

    .. math::

        \\mathcal{L} = \\sum_i \\log \\sum_k \\pi_k \\mathcal{N}(x_i \\mid \\mu_k, \\operatorname{diag} \\sigma^2_k)
        - \\sum_{k,d} \\Big[\\frac{n_0}{2}\\Big(\\log \\sigma^2_{kd} + \\frac{v_0}{\\sigma^2_{kd}}\\Big)
        + \\frac{\\kappa_0 \\mu_{kd}^2}{2 \\sigma^2_{kd}}\\Big] + \\lambda \\sum_k \\log \\pi_k ,

    with the sum over the members of each set.

    EM starts from k-means++ seeds: every member goes to its nearest seed, and one M-step
    gives the initial parameters. A set stops at the first E-step where its objective per
    member has grown by at most ``tol`` since the previous one, and returns the parameters
    of that E-step (like scikit-learn's convergence test, which then returns one M-step
    later), or after ``max_iter`` iterations with the parameters of the last M-step. Sets
    that reach ``max_iter`` are flagged in ``converged``, and a :class:`ConvergenceWarning`
    and a log line give their number. A set's fit depends only on its own members, ``seed``
    and the options, not on the other sets or on padding. In float32 that holds up to
    rounding. The batched products sum in an order that depends on the batch shape, so the
    rounding noise can change a set's iteration count and move its parameters, by up to
    about 1e-5 on small test sets.

    Degenerate sets: a set with fewer members than components raises ``ValueError``.
    Duplicate points and constant dimensions are fine, because the variance prior keeps
    every variance at least :math:`n_0 v_0 / (N_k + n_0)`. A component that loses its
    points is kept by the priors, with weight :math:`\\lambda / (N + K\\lambda)`, a mean
    pulled to the origin and variance near :math:`v_0`. Its gradient stays finite
    because :math:`\\kappa_0, \\lambda > 0` keep the Hessian invertible. A component that
    collapses onto one or a few points under a weak prior gets its variances and
    log-densities from explicit differences to its mean, where the usual expanded form
    would lose more than ``EXPANSION_ERROR_LIMIT`` nats (see :mod:`s2m.mixture.em`).

    NOTE: the code uses no device-specific calls, but it has only been run on the CPU.

    Gradients come from ``torch.autograd`` (``backward()`` or ``torch.autograd.grad``). The
    ``torch.func`` transforms are not supported, because the layer's autograd Functions do
    not define ``setup_context``.

    float32 and float64 run the same code. The objective of the convergence test is summed
    in float64 in both, because a float32 sum of tens of log-likelihoods of a few hundred
    nats each has an error near 1e-3, far above the default ``tol``. Rounding noise in
    float32 log-densities can still add an iteration, or end one early where the objective
    grows by less than that noise.

    Parameters
    ----------
    x : Tensor of shape (B, N, D), float32 or float64, on any device
        Padded sets of points.
    n_components : int
        K, the number of components, at least 1.
    mask : Tensor of shape (B, N), bool, optional
        True for members. None means all rows are members.
    max_iter : int
        Maximum number of EM iterations, at least 1.
    tol : float
        Tolerance on the growth of the objective per member between iterations, >= 0.
    seed : int
        Seed of the k-means++ draws. The same seed gives the same fit on a rerun.
    init : "kmeans++" or (weights, means, variances)
        Initialisation. A tuple or list gives the initial parameters, tensors of shapes (B, K),
        (B, K, D) and (B, K, D) with the dtype and device of ``x``, and EM starts from
        them. They must be finite, the weights positive with a sum of 1 per set, and the
        variances at least the smallest normal number of the dtype. No gradient flows to them.
    backward : "implicit" or "unrolled"
        "implicit" runs EM without autograd and differentiates the stationarity
        conditions (implicit function theorem, structured Woodbury solve). It is exact at
        an exact stationary point. Its error grows with the size of the last EM step, so
        lower ``tol`` where gradients must be accurate. "unrolled" differentiates through
        the EM iterations with autograd. With either mode, a set whose gradient is not
        finite (for example from a component without points under zero prior counts) gets
        a zero gradient and a ``RuntimeWarning`` naming it. The implicit backward pass is not
        itself differentiable, so it gives no second derivatives.
    variance_prior : VariancePrior
        :math:`v_0` and :math:`n_0`. The default :math:`v_0` is ``0.1 / D``.
    mean_prior_count : float
        :math:`\\kappa_0 \\ge 0`.
    weight_prior_count : float
        :math:`\\lambda \\ge 0`, the Dirichlet concentration minus one.

    Returns
    -------
    GaussianMixtureFit
        Batch shape (B,), event shape (D,), differentiable with respect to ``x``.

    Raises
    ------
    ValueError
        If an argument is invalid or a set has fewer members than ``n_components``.
    """
    x, member = validate_points(x, mask)
    check_fit_options(n_components, max_iter, tol, seed, backward)
    n_components, max_iter, tol, seed = int(n_components), int(max_iter), float(tol), int(seed)
    penalty = resolve_penalty(x.shape[-1], variance_prior, mean_prior_count, weight_prior_count)
    check_set_sizes(member, n_components)

    if isinstance(init, str) and init not in INIT_MODES:
        raise ValueError(f"init must be {INIT_REQUIREMENT}, got the string {init!r}.")

    start = None
    if not isinstance(init, str):
        start = tuple(tensor.detach() for tensor in check_initial_parameters(init, x, n_components))

    if backward == "implicit":
        outputs = ImplicitEMFit.apply(x, member, n_components, start, seed, penalty, max_iter, tol)
        weights, means, variances, lower_bound, converged, n_iter = outputs
        fit = GaussianMixtureFit(weights, means, variances, converged, n_iter, lower_bound)
    else:
        if x.requires_grad:
            x = FiniteSetGradients.apply(x, penalty)
        features = point_features(x)
        if start is None:
            start = initial_parameters(x, member, n_components, seed, penalty, features)
        result = run_em(features, member, *start, penalty, max_iter, tol)
        fit = GaussianMixtureFit(
            result.weights, result.means, result.variances, result.converged, result.n_iter, result.lower_bound
        )

    not_finite = report_non_finite(fit.lower_bound)
    report_convergence(fit.converged | not_finite, max_iter, tol)
    return fit


def check_fit_options(n_components: int, max_iter: int, tol: float, seed: int, backward: str) -> None:
    """Raise ``ValueError`` naming the first invalid EM option."""
    if not is_integer(n_components) or n_components < 1:
        raise ValueError(f"n_components must be an int >= 1, got {n_components!r}.")
    if not is_integer(max_iter) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}.")
    if not (is_real(tol) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}.")
    if not is_integer(seed) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int from 0 to 2**64 - 1, got {seed!r}.")
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}.")


def check_set_sizes(member: Tensor, n_components: int) -> None:
    """Raise ``ValueError`` if a set has fewer members than components."""
    counts = member.sum(dim=-1)
    small = counts < n_components
    if bool(small.any()):
        sets = torch.nonzero(small).flatten()
        if n_components == 1:
            requirement = "Every set needs at least 1 member"
            remedy = "Drop those sets or give them at least one member in the mask."
        else:
            requirement = f"Every set needs at least n_components={n_components} members"
            remedy = "Pass fewer components, drop those sets, or fit them with fit_diagonal_gaussian."
        raise ValueError(
            f"{requirement}, but sets {list_sets(sets)} have {list_sets(counts[sets].long())} members. {remedy}"
        )


def check_initial_parameters(init: tuple, x: Tensor, n_components: int) -> tuple[Tensor, Tensor, Tensor]:
    """Validate explicit initial parameters against the shape, dtype and device of ``x``, and check their values."""
    if not (isinstance(init, (tuple, list)) and len(init) == 3):
        if isinstance(init, (tuple, list)):
            got = f"a {type(init).__name__} of {len(init)} items"
        else:
            got = type(init).__name__
        raise ValueError(f"init must be {INIT_REQUIREMENT}, got {got}.")

    batch_size, _, dim = x.shape
    shapes = ((batch_size, n_components), (batch_size, n_components, dim), (batch_size, n_components, dim))
    # With a subnormal variance, 1 / variance can overflow, and the fit becomes NaN.
    tiny = torch.finfo(x.dtype).tiny
    for name, tensor, shape in zip(("weights", "means", "variances"), init, shapes):
        if not isinstance(tensor, Tensor):
            raise ValueError(
                f"init {name} must be a torch.Tensor of shape {shape}, got {type(tensor).__name__}; "
                f"convert it with torch.as_tensor({name}).to(x)."
            )
        if tuple(tensor.shape) != shape:
            raise ValueError(f"init {name} must have shape {shape}, got {tuple(tensor.shape)}.")
        if tensor.dtype != x.dtype or tensor.device != x.device:
            raise ValueError(
                f"init {name} is {tensor.dtype} on {tensor.device}, but x is {x.dtype} on {x.device}; "
                f"convert it with {name}.to(x)."
            )

        # aminmax propagates NaN, and its one pass measured about 6 times faster than
        # torch.isfinite(tensor).all() on init tensors of 256 sets.
        values = tensor.detach()
        smallest, largest = (float(value) for value in torch.aminmax(values))
        if not (math.isfinite(smallest) and math.isfinite(largest)):
            bad = ~torch.isfinite(values)
            raise ValueError(
                f"init {name} must be finite, got {values[bad][0].item()} at {entry_position(bad)}; "
                "pass finite initial parameters."
            )

        if name == "weights" and smallest <= 0:
            raise ValueError(
                f"init weights must be positive, got {smallest:.3g} at {entry_position(values <= 0)}; "
                "pass positive weights."
            )

        if name == "variances" and smallest <= 0:
            raise ValueError(
                f"init variances must be positive, got {smallest:.3g} at {entry_position(values <= 0)}; "
                "pass positive variances."
            )

        if name == "variances" and smallest < tiny:
            raise ValueError(
                f"init variances must be at least the smallest normal {x.dtype} number, {tiny:.3g}, got "
                f"{smallest:.3g} at {entry_position(values < tiny)}; pass larger variances."
            )

    # A scaled set of weights would shift the first objective by its log and could end EM at
    # the first convergence test.
    weights = init[0].detach()
    tolerance = 16 * n_components * torch.finfo(x.dtype).eps
    off = (weights.sum(dim=-1) - 1).abs() > tolerance
    if bool(off.any()):
        first = int(torch.nonzero(off)[0])
        raise ValueError(
            f"init weights must sum to 1 for every set, got {weights[first].sum().item():.6g} for set {first}; "
            "divide them by their sum."
        )
    return tuple(init)


def entry_position(selected: Tensor) -> str:
    """Describe where the first True entry of a (B, K) or (B, K, D) mask is, for an error message."""
    position = torch.nonzero(selected)[0].tolist()
    labels = ("set", "component", "dimension")
    return ", ".join(f"{label} {index}" for label, index in zip(labels, position))


def report_non_finite(lower_bound: Tensor) -> Tensor:
    """Warn with a ``RuntimeWarning`` and a log line about sets whose objective is not finite, and return their mask.

    Explicit initial parameters far from the points, such as means of 1e200 in float64,
    overflow the objective, and EM never recovers. The k-means++ start keeps the objective
    finite, because its means lie among the points and the variance prior keeps the
    variances positive.
    """
    not_finite = ~torch.isfinite(lower_bound.detach())
    if bool(not_finite.any()):
        sets = list_sets(torch.nonzero(not_finite).flatten())
        message = (
            f"EM gave a NaN or infinite objective for {int(not_finite.sum())} of {not_finite.numel()} sets "
            f"{sets}, so their fitted parameters are not usable. Start them from initial parameters closer "
            "to the points, or from init='kmeans++'."
        )
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return not_finite


def report_convergence(converged: Tensor, max_iter: int, tol: float) -> None:
    """Warn with a :class:`ConvergenceWarning` and a log line when some sets did not converge."""
    n_failed = int((~converged).sum())
    if n_failed == 0:
        return

    message = (
        f"EM did not converge for {n_failed} of {converged.numel()} sets within max_iter={max_iter} "
        f"(tol={tol:g}); raise max_iter or tol, and see GaussianMixtureFit.converged for which sets."
    )
    logger.warning(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=3)
