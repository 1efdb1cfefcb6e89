"""Implicit-function gradient of the fitted mixture, with a structured and a dense Hessian solve.

The fit :math:`\\theta^*(X)` is a stationary point of the penalised log-likelihood
:math:`\\mathcal{L}(\\theta, X)` of :mod:`s2m.mixture.prior`, with the parameters

.. math::

    \\theta = (\\mu_{kd},\\ s_{kd} = \\log \\sigma^2_{kd},\\ \\eta_1, \\dots, \\eta_{K-1}),
    \\qquad \\pi = \\operatorname{softmax}(\\eta_1, \\dots, \\eta_{K-1}, 0),

laid out per set as ``[means.flatten(), log_variances.flatten(), logits]`` of length
:math:`P = 2KD + K - 1`. Differentiating :math:`\\nabla_\\theta \\mathcal{L}(\\theta^*(X), X) = 0`
gives, for a loss with :math:`v = \\partial \\mathrm{loss} / \\partial \\theta`,

.. math::

    H w = v, \\qquad \\frac{\\partial\\, \\mathrm{loss}}{\\partial X}
    = -\\frac{\\partial^2 \\mathcal{L}}{\\partial X\\, \\partial \\theta}\\, w,
    \\qquad H = \\nabla^2_\\theta \\mathcal{L}.

This is exact only at an exact stationary point. The parameters EM returns are the
M-step of the responsibilities one iteration earlier, so the remaining error is
proportional to the last EM step. Run EM to a tight tolerance when gradients must be
accurate. The gradient of the lower bound also corrects for that step to first order
(:func:`lower_bound_terms`).

With :math:`\\ell_{ik} = \\log \\pi_k + \\log \\mathcal{N}(x_i \\mid \\mu_k, \\sigma^2_k)`,
:math:`r_{ik}` the responsibilities, :math:`g_{ik} = \\nabla_\\theta \\ell_{ik}` and
:math:`\\bar g_i = \\sum_k r_{ik} g_{ik}`, the Hessian splits into

.. math::

    H = A + V V^\\top, \\qquad A = \\sum_i \\sum_k r_{ik} \\nabla^2_\\theta \\ell_{ik} + \\nabla^2 \\log p(\\theta),
    \\qquad V_{:, (i,k)} = \\sqrt{r_{ik}}\\, (g_{ik} - \\bar g_i).

:math:`A` is block diagonal: a 2x2 block per (k, d) for :math:`(\\mu_{kd}, s_{kd})`, which
is diagonal at a stationary point, and a (K-1)x(K-1) block for the logits. Both are
inverted in closed form. :math:`V` has a column per (point, component), so the Woodbury
identity

.. math::

    H^{-1} v = A^{-1} v - A^{-1} V (I + V^\\top A^{-1} V)^{-1} V^\\top A^{-1} v

needs one dense solve of size :math:`SK`, where :math:`S` counts the points with soft
responsibilities. A point whose responsibilities are one-hot up to a mass of
:math:`\\epsilon^2` on the other components (:math:`\\epsilon` the machine epsilon)
contributes below rounding error to :math:`H`, because :math:`|g_{ik} - g_{ij}|^2` grows
only like the squared Mahalanobis distance while :math:`r_{ij}` decays exponentially with
it, so such points are left out. The backward pass costs two (N, K) x (K, D) matrix
products per set plus :math:`O(K S^2 D + (SK)^3)` for the soft points, against
:math:`O(P^3)` for the dense solve.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from s2m.mixture.checks import list_sets, validate_points
from s2m.mixture.em import LOG_2PI, e_step, fit_in_chunks, point_features
from s2m.mixture.model import GaussianMixtureFit
from s2m.mixture.prior import Penalty, VariancePrior, log_prior, resolve_penalty

logger = logging.getLogger(__name__)


@dataclass
class ParameterVector:
    """A vector in the parameter space of :math:`\\theta`, split into its blocks.

    Attributes
    ----------
    means : Tensor of shape (B, K, D)
        The :math:`\\mu` block.
    log_variances : Tensor of shape (B, K, D)
        The :math:`s = \\log \\sigma^2` block.
    logits : Tensor of shape (B, K - 1)
        The :math:`\\eta` block. The last logit is fixed at 0 and has no entry.
    """

    means: Tensor
    log_variances: Tensor
    logits: Tensor

    def __add__(self, other: ParameterVector) -> ParameterVector:
        """Add two vectors block by block."""
        return ParameterVector(
            self.means + other.means, self.log_variances + other.log_variances, self.logits + other.logits
        )

    def __sub__(self, other: ParameterVector) -> ParameterVector:
        """Subtract ``other`` block by block."""
        return ParameterVector(
            self.means - other.means, self.log_variances - other.log_variances, self.logits - other.logits
        )

    def pack(self) -> Tensor:
        """Flatten into the layout ``[means, log_variances, logits]``, shape (B, P)."""
        return torch.cat([self.means.flatten(1), self.log_variances.flatten(1), self.logits], dim=1)

    @classmethod
    def unpack(cls, packed: Tensor, n_components: int, dim: int) -> ParameterVector:
        """Split a (B, P) tensor laid out as ``[means, log_variances, logits]``."""
        size = n_components * dim
        shape = (packed.shape[0], n_components, dim)
        return cls(
            packed[:, :size].reshape(shape),
            packed[:, size : 2 * size].reshape(shape),
            packed[:, 2 * size :],
        )


@dataclass
class BlockDiagonalInverse:
    """Inverse of the block-diagonal part :math:`A` of the Hessian at a stationary point.

    Attributes
    ----------
    means : Tensor of shape (B, K, D)
        :math:`1 / A_{\\mu\\mu} = -\\sigma^2_{kd} / (N_k + \\kappa_0)`.
    log_variances : Tensor of shape (B, K, 1)
        :math:`1 / A_{ss} = -2 / (N_k + n_0)`, the same for every dimension.
    first_logits : Tensor of shape (B, K - 1)
        :math:`-1 / (\\pi_k (N + K\\lambda))` for :math:`k < K`.
    last_logit : Tensor of shape (B, 1)
        :math:`-1 / (\\pi_K (N + K\\lambda))`.

    The inverse of the logits block is
    :math:`-(\\operatorname{diag}(1/\\pi') + \\mathbf{1}\\mathbf{1}^\\top / \\pi_K) / (N + K\\lambda)`
    over the first K - 1 weights :math:`\\pi'`, that is
    ``diag(first_logits) + last_logit * ones``, which is applied without forming it.
    """

    means: Tensor
    log_variances: Tensor
    first_logits: Tensor
    last_logit: Tensor

    def apply(self, vector: ParameterVector) -> ParameterVector:
        """Multiply by :math:`A^{-1}`."""
        return ParameterVector(
            self.means * vector.means,
            self.log_variances * vector.log_variances,
            self.apply_logits(vector.logits),
        )

    def apply_logits(self, logits: Tensor) -> Tensor:
        """Multiply vectors of shape (B, K - 1) or (B, K - 1, M) by the inverse of the logits block."""
        if logits.shape[1] == 0:
            return logits
        extra = (1,) * (logits.dim() - 2)
        first = self.first_logits.view(*self.first_logits.shape, *extra)
        last = self.last_logit.view(-1, 1, *extra)
        return torch.addcmul(logits.sum(dim=1, keepdim=True) * last, logits, first)


@dataclass
class SoftPoints:
    """The points with soft responsibilities, gathered and padded to the same count S per set.

    Attributes
    ----------
    index : Tensor of shape (B, S), int64
        Row of each gathered point in the batch. Padding slots repeat a valid row.
    responsibilities : Tensor of shape (B, S, K)
        :math:`r_{ik}`, zero on padding slots.
    mean_scores : Tensor of shape (B, K, S, D)
        :math:`(x_i - \\mu_k) / \\sigma^2_k`, the mean block of :math:`g_{ik}`.
    logvar_scores : Tensor of shape (B, K, S, D)
        :math:`\\tfrac12 ((x_i - \\mu_k)^2 / \\sigma^2_k - 1)`, the log-variance block of :math:`g_{ik}`.
    mixing : Tensor of shape (B, S, K, K)
        ``mixing[b, i, l, k]`` :math:`= \\sqrt{r_{ik}} (\\delta_{lk} - r_{il})`, so that column
        (i, k) of :math:`V` is :math:`\\sum_l` ``mixing[b, i, l, k]`` :math:`g_{il}`. Zero on padding.
    """

    index: Tensor
    responsibilities: Tensor
    mean_scores: Tensor
    logvar_scores: Tensor
    mixing: Tensor


def parameter_cotangent(
    weights: Tensor,
    variances: Tensor,
    grad_weights: Tensor,
    grad_means: Tensor,
    grad_variances: Tensor,
) -> ParameterVector:
    """Convert gradients with respect to (weights, means, variances) into :math:`v = \\partial\\,\\mathrm{loss} / \\partial \\theta`.

    :math:`\\partial / \\partial s = \\sigma^2\\, \\partial / \\partial \\sigma^2`, and through
    the softmax :math:`\\partial / \\partial \\eta_j = \\pi_j (g_j - \\sum_k \\pi_k g_k)` for
    :math:`j < K`. A gradient along the all-ones direction of the weights has no effect,
    since the weights always sum to 1.
    """
    centred = grad_weights - (grad_weights * weights).sum(dim=-1, keepdim=True)
    logits = (weights * centred)[:, :-1]
    return ParameterVector(grad_means, grad_variances * variances, logits)


def block_diagonal_inverse(
    member: Tensor,
    responsibilities: Tensor,
    weights: Tensor,
    variances: Tensor,
    penalty: Penalty,
) -> BlockDiagonalInverse:
    """Invert :math:`A`, the responsibility-weighted complete-data Hessian plus the prior Hessian, at a stationary point.

    Per (k, d), with :math:`m_1 = \\sum_i r_{ik} x_{id}` and
    :math:`S = \\sum_i r_{ik} (x_{id} - \\mu_{kd})^2`, the 2x2 block over
    :math:`(\\mu_{kd}, s_{kd})` is

    .. math::

        A_{\\mu\\mu} = -\\frac{N_k + \\kappa_0}{\\sigma^2}, \\quad
        A_{\\mu s} = -\\frac{m_1 - (N_k + \\kappa_0) \\mu}{\\sigma^2}, \\quad
        A_{ss} = -\\frac{S + \\kappa_0 \\mu^2 + n_0 v_0}{2 \\sigma^2}.

    The M-step equations hold at a stationary point, so :math:`A_{\\mu s} = 0` and
    :math:`A_{ss} = -(N_k + n_0) / 2`: the blocks are diagonal and need no pass over the
    points. This form is also negative definite away from the fixed point, so the solve
    stays finite for a fit stopped by ``max_iter``. The logits block is
    :math:`-(N + K\\lambda)(\\operatorname{diag} \\pi' - \\pi' \\pi'^\\top)` over the first
    K - 1 weights :math:`\\pi'`, whose inverse is
    :math:`-(\\operatorname{diag}(1/\\pi') + \\mathbf{1}\\mathbf{1}^\\top / \\pi_K) / (N + K\\lambda)`.
    """
    counts = responsibilities.sum(dim=1).unsqueeze(-1)
    means = -variances / (counts + penalty.mean_count)
    log_variances = -2.0 / (counts + penalty.variance_count)
    total = member.sum(dim=-1, keepdim=True) + weights.shape[-1] * penalty.weight_count
    logits = -(weights * total).reciprocal()
    return BlockDiagonalInverse(means, log_variances, logits[:, :-1], logits[:, -1:])


def gather_soft_points(x: Tensor, responsibilities: Tensor, means: Tensor, variances: Tensor) -> SoftPoints | None:
    """Collect the members whose responsibilities are not one-hot up to :math:`\\epsilon^2`.

    Returns None when no set has such a point, which includes every fit with K = 1.
    Padded rows have zero responsibilities and are never gathered.
    """
    n_components = responsibilities.shape[-1]
    if n_components == 1:
        return None

    # A point with at most one responsibility above eps ** 2 / (K - 1) has at most eps ** 2
    # outside its top component. This quick test settles the common all-hard batch.
    threshold = torch.finfo(x.dtype).eps ** 2
    n_above = (responsibilities > threshold / (n_components - 1)).sum(dim=-1)
    if int(n_above.max()) <= 1:
        return None

    # Sum the mass outside the most likely component directly, because 1 - max_k r_ik would
    # round to 0 far above eps ** 2.
    top = responsibilities.argmax(dim=-1, keepdim=True)
    other_mass = responsibilities.scatter(-1, top, 0.0).sum(dim=-1)
    soft = other_mass > threshold
    if not bool(soft.any()):
        return None

    n_soft = soft.sum(dim=-1)
    max_soft = int(n_soft.max())

    index = torch.argsort((~soft).to(torch.int8), dim=1, stable=True)[:, :max_soft]
    valid = torch.arange(max_soft, device=x.device).unsqueeze(0) < n_soft.unsqueeze(1)
    points = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    resp = responsibilities.gather(1, index.unsqueeze(-1).expand(-1, -1, n_components)) * valid.unsqueeze(-1)

    deviations = points.unsqueeze(1) - means.unsqueeze(2)
    mean_scores = deviations / variances.unsqueeze(2)
    logvar_scores = 0.5 * (deviations * mean_scores - 1.0)

    identity = torch.eye(n_components, dtype=x.dtype, device=x.device)
    mixing = resp.sqrt().unsqueeze(-2) * (identity - resp.unsqueeze(-1))
    return SoftPoints(index, resp, mean_scores, logvar_scores, mixing)


def woodbury_correction(
    soft: SoftPoints,
    inverse: BlockDiagonalInverse,
    rhs: ParameterVector,
) -> tuple[ParameterVector, Tensor]:
    """Compute :math:`V (I + V^\\top A^{-1} V)^{-1} V^\\top A^{-1} v` given ``rhs`` :math:`= A^{-1} v`.

    Returns
    -------
    correction : ParameterVector
        The product, before the final multiplication by :math:`A^{-1}`.
    singular : Tensor of shape (B,), bool
        Sets whose capacitance matrix was singular.
    """
    mixing = soft.mixing
    batch_size, n_soft, n_components, _ = mixing.shape
    size = n_soft * n_components

    # gram[b, l, i, j] = g_il^T A_l^{-1} g_jl over the (mu, s) block of component l.
    left = torch.cat(
        [inverse.means.unsqueeze(2) * soft.mean_scores, inverse.log_variances.unsqueeze(2) * soft.logvar_scores], dim=-1
    )
    right = torch.cat([soft.mean_scores, soft.logvar_scores], dim=-1)
    gram = torch.matmul(left, right.transpose(-1, -2))

    capacitance = torch.einsum("bilk,blij,bjlm->bikjm", mixing, gram, mixing).reshape(batch_size, size, size)
    logit_columns = mixing[:, :, :-1, :].permute(0, 2, 1, 3).reshape(batch_size, n_components - 1, size)
    capacitance = capacitance + logit_columns.transpose(1, 2) @ inverse.apply_logits(logit_columns)
    capacitance = capacitance + torch.eye(size, dtype=mixing.dtype, device=mixing.device)

    # Project A^{-1} v on every column of V.
    projection = (soft.mean_scores * rhs.means.unsqueeze(2)).sum(dim=-1)
    projection = projection + (soft.logvar_scores * rhs.log_variances.unsqueeze(2)).sum(dim=-1)
    padded_logits = torch.nn.functional.pad(rhs.logits, (0, 1))
    projection = projection.transpose(1, 2) + padded_logits.unsqueeze(1)
    projected = torch.einsum("bilk,bil->bik", mixing, projection).reshape(batch_size, size, 1)

    solution, singular = solve_symmetric(capacitance, projected)
    coefficients = torch.einsum("bilk,bik->bil", mixing, solution.reshape(batch_size, n_soft, n_components))

    correction = ParameterVector(
        torch.einsum("bil,blid->bld", coefficients, soft.mean_scores),
        torch.einsum("bil,blid->bld", coefficients, soft.logvar_scores),
        coefficients.sum(dim=1)[:, :-1],
    )
    return correction, singular


def solve_symmetric(matrix: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    """Solve a batch of symmetric systems, by Cholesky where positive definite and by LU set by set elsewhere.

    The capacitance matrix :math:`I + V^\\top A^{-1} V` is positive definite exactly when
    :math:`H` is negative definite, that is at a strict local maximum, which is where EM
    usually stops. Saddle points fall back to LU one set at a time, because batched LU on
    the CPU can return wrong pivots or hang when torch uses more than one thread. This was
    seen here with torch 2.13 and MKL and is reported upstream as pytorch/pytorch#142815.

    Parameters
    ----------
    matrix : Tensor of shape (B, M, M)
    rhs : Tensor of shape (B, M, 1)

    Returns
    -------
    solution : Tensor of shape (B, M, 1)
    singular : Tensor of shape (B,), bool
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    solution = torch.cholesky_solve(rhs, factor)
    singular = torch.zeros(matrix.shape[0], dtype=torch.bool, device=matrix.device)

    for index in torch.nonzero(info != 0).flatten().tolist():
        solution[index], lu_info = torch.linalg.solve_ex(matrix[index], rhs[index])
        singular[index] = lu_info != 0
    return solution, singular


def solve_structured(
    x: Tensor,
    member: Tensor,
    responsibilities: Tensor,
    weights: Tensor,
    means: Tensor,
    variances: Tensor,
    vector: ParameterVector,
    penalty: Penalty,
    soft: SoftPoints | None = None,
) -> tuple[ParameterVector, SoftPoints | None, Tensor]:
    """Solve :math:`H w = v` with the block-diagonal plus low-rank structure of :math:`H`.

    ``soft`` are the points of :func:`gather_soft_points`, gathered here when not given.

    Returns
    -------
    solution : ParameterVector
        :math:`w`.
    soft : SoftPoints or None
        The points that make up the low-rank part, for reuse by the caller.
    singular : Tensor of shape (B,), bool
        Sets whose capacitance matrix was singular.
    """
    inverse = block_diagonal_inverse(member, responsibilities, weights, variances, penalty)
    solution = inverse.apply(vector)
    singular = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    if soft is None:
        soft = gather_soft_points(x, responsibilities, means, variances)
    if soft is not None:
        correction, singular = woodbury_correction(soft, inverse, solution)
        solution = solution - inverse.apply(correction)
    return solution, soft, singular


def stationarity_vjp(
    x: Tensor,
    responsibilities: Tensor,
    means: Tensor,
    variances: Tensor,
    solution: ParameterVector,
    soft: SoftPoints | None,
) -> Tensor:
    """Compute :math:`-\\nabla_X (\\nabla_\\theta \\mathcal{L}^\\top w)`, as (B, N, D).

    With :math:`q_{ik} = g_{ik}^\\top w`, :math:`\\bar q_i = \\sum_k r_{ik} q_{ik}` and the
    logit part of :math:`g_{ik}` taken as :math:`e_k` (the shift by :math:`\\pi` cancels in
    :math:`q_{ik} - \\bar q_i`),

    .. math::

        -\\frac{\\partial (\\nabla_\\theta \\mathcal{L}^\\top w)}{\\partial x_i}
        = -\\sum_k r_{ik} \\Big[ \\frac{w^\\mu_k}{\\sigma^2_k}
        + \\big(w^s_k - (q_{ik} - \\bar q_i)\\big) \\frac{x_i - \\mu_k}{\\sigma^2_k} \\Big].

    The term in :math:`q_{ik} - \\bar q_i` vanishes for one-hot responsibilities, so it is
    evaluated on the soft points only.
    """
    # With c_k = w^s_k / sigma^2_k, the sum over k is
    # sum_k r_ik (c_k mu_k - w^mu_k / sigma^2_k) - x_i sum_k r_ik c_k.
    linear = solution.log_variances / variances
    constant = torch.addcmul(-solution.means / variances, linear, means)
    gradient = mix_affine_terms(x, responsibilities, constant, linear)

    if soft is not None:
        scores = (soft.mean_scores * solution.means.unsqueeze(2)).sum(dim=-1)
        scores = scores + (soft.logvar_scores * solution.log_variances.unsqueeze(2)).sum(dim=-1)
        scores = scores.transpose(1, 2) + torch.nn.functional.pad(solution.logits, (0, 1)).unsqueeze(1)
        centred = scores - (soft.responsibilities * scores).sum(dim=-1, keepdim=True)
        soft_term = torch.einsum("bsk,bksd->bsd", soft.responsibilities * centred, soft.mean_scores)
        gradient = gradient.scatter_add(1, soft.index.unsqueeze(-1).expand_as(soft_term), soft_term)
    return gradient


def hard_assignment_vjp(
    x: Tensor,
    responsibilities: Tensor,
    means: Tensor,
    variances: Tensor,
    grad_means: Tensor,
    grad_variances: Tensor,
    penalty: Penalty,
) -> Tensor:
    """Compute the gradient with respect to the points when no point has soft responsibilities, as (B, N, D).

    Then :math:`H = A` to rounding error, :math:`w = A^{-1} v`, and the soft term of
    :func:`stationarity_vjp` vanishes. Substituting :math:`A^{-1}` of
    :func:`block_diagonal_inverse` into :func:`stationarity_vjp`, the variances cancel from
    the mean block and the logits drop out:

    .. math::

        -\\frac{\\partial (\\nabla_\\theta \\mathcal{L}^\\top w)}{\\partial x_i}
        = \\sum_k r_{ik} \\big(b_k + c_k \\odot (\\mu_k - x_i)\\big), \\qquad
        b_k = \\frac{\\bar\\mu_k}{N_k + \\kappa_0}, \\quad
        c_k = -\\frac{2\\, \\bar\\sigma^2_k}{N_k + n_0},

    with :math:`\\bar\\mu_k, \\bar\\sigma^2_k` the gradients of the loss with respect to the
    means and variances. The gradient with respect to the weights has no effect here,
    because the weights depend on the points only through soft responsibilities.
    """
    counts = responsibilities.sum(dim=1).unsqueeze(-1)
    linear = torch.div(grad_variances, counts + penalty.variance_count).mul_(-2.0)
    constant = torch.addcmul(grad_means / (counts + penalty.mean_count), linear, means)
    return mix_affine_terms(x, responsibilities, constant, linear)


def mix_affine_terms(x: Tensor, responsibilities: Tensor, constant: Tensor, linear: Tensor) -> Tensor:
    """Compute :math:`\\sum_k r_{ik} (a_k - x_i \\odot c_k)` for every point, as (B, N, D).

    Parameters
    ----------
    x : Tensor of shape (B, N, D)
    responsibilities : Tensor of shape (B, N, K)
    constant, linear : Tensor of shape (B, K, D)
        :math:`a_k` and :math:`c_k`.
    """
    # With K = 1 the sums over k are broadcasts, and matrix products with an inner size of 1
    # are slower than one elementwise pass.
    if responsibilities.shape[-1] == 1:
        return torch.addcmul(constant, x, linear, value=-1.0).mul_(responsibilities)

    # Two products with contiguous outputs. One product with [a, c] side by side, split
    # afterwards, makes the addcmul read strided halves: measured 1.7 times as slow at
    # B = 8, N = 50, D = 256, K = 4.
    gradient = torch.bmm(responsibilities, constant)
    return gradient.addcmul_(x, torch.bmm(responsibilities, linear), value=-1.0)


def failure_remedy(penalty: Penalty, backward: str = "implicit") -> str:
    """Suggest how to avoid a non-finite gradient of the ``backward`` mode under ``penalty``."""
    if penalty.mean_count == 0 or penalty.weight_count == 0:
        # Both modes fail on the same empty components, so switching modes would not help here.
        return "Raise mean_prior_count and weight_prior_count above 0, so that components without points stay defined."
    if backward == "implicit":
        return "Use backward='unrolled', which does not solve with the Hessian."
    return "Use backward='implicit', or check the points for values large enough to overflow."


def zero_failed_sets(
    grad_x: Tensor, failed: Tensor | None, reason: str, remedy: str, backward: str = "implicit"
) -> Tensor:
    """Replace the gradient of failed sets by zeros, with a warning and a log line naming them.

    A set fails when ``failed`` flags it or its gradient has a NaN or infinite entry, which
    makes its sum non-finite. The sum costs one read of ``grad_x`` and could overflow only for
    entries beyond about 1e32 in float32.
    """
    if failed is None and math.isfinite(grad_x.sum().item()):
        return grad_x

    not_finite = ~torch.isfinite(grad_x.sum(dim=(1, 2)))
    failed = not_finite if failed is None else failed | not_finite
    if not bool(failed.any()):
        return grad_x

    sets = list_sets(torch.nonzero(failed).flatten())
    message = (
        f"The {backward} gradient of {int(failed.sum())} of {failed.numel()} sets {sets} is not finite "
        f"({reason}); their gradient is set to zero. {remedy}"
    )
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return torch.where(failed.view(-1, 1, 1), torch.zeros_like(grad_x), grad_x)


def implicit_gradient(
    x: Tensor,
    member: Tensor,
    responsibilities: Tensor,
    weights: Tensor,
    means: Tensor,
    variances: Tensor,
    grad_weights: Tensor,
    grad_means: Tensor,
    grad_variances: Tensor,
    grad_lower_bound: Tensor,
    penalty: Penalty,
) -> Tensor:
    """Compute the gradient of a loss with respect to the points through the fit, by the structured solve.

    Parameters
    ----------
    x : Tensor of shape (B, N, D), padding zeroed
    member : Tensor of shape (B, N)
    responsibilities : Tensor of shape (B, N, K)
        At the fitted parameters, zero on padding.
    weights : Tensor of shape (B, K)
    means, variances : Tensor of shape (B, K, D)
    grad_weights : Tensor of shape (B, K) or None
    grad_means, grad_variances : Tensor of shape (B, K, D) or None
    grad_lower_bound : Tensor of shape (B,) or None
        The gradients of the loss with respect to the outputs of the fit. None stands for an
        output that the loss does not use.
    penalty : Penalty

    Returns
    -------
    Tensor of shape (B, N, D), zero on padding. Sets with a singular Hessian or a
    non-finite result get zeros and a ``RuntimeWarning``.
    """
    # Outputs that the loss does not use come as None. The lower-bound terms are then left
    # out, and the other gradients become zeros.
    if grad_means is None:
        grad_means = torch.zeros_like(means)
    if grad_variances is None:
        grad_variances = torch.zeros_like(variances)

    direct = None
    if grad_lower_bound is not None:
        scale = grad_lower_bound / member.sum(dim=-1)
        lower_bound_cotangent, direct = lower_bound_terms(
            x, member, responsibilities, weights, means, variances, scale, penalty
        )

    soft = gather_soft_points(x, responsibilities, means, variances)
    if soft is None:
        # The weights do not move the points here, so only the mean and variance parts of
        # the lower-bound cotangent count. The variance part converts from log-variances.
        if direct is not None:
            grad_means = grad_means + lower_bound_cotangent.means
            grad_variances = torch.addcdiv(grad_variances, lower_bound_cotangent.log_variances, variances)
        grad_x = hard_assignment_vjp(x, responsibilities, means, variances, grad_means, grad_variances, penalty)
        singular = None
        reason = "a component without points and mean_prior_count = 0, or overflow"
    else:
        if grad_weights is None:
            grad_weights = torch.zeros_like(weights)
        vector = parameter_cotangent(weights, variances, grad_weights, grad_means, grad_variances)
        if direct is not None:
            vector = vector + lower_bound_cotangent
        solution, soft, singular = solve_structured(
            x, member, responsibilities, weights, means, variances, vector, penalty, soft
        )
        grad_x = stationarity_vjp(x, responsibilities, means, variances, solution, soft)
        reason = "singular Hessian"

    if direct is not None:
        grad_x = grad_x + direct
    return zero_failed_sets(grad_x, singular, reason, failure_remedy(penalty))


def lower_bound_terms(
    x: Tensor,
    member: Tensor,
    responsibilities: Tensor,
    weights: Tensor,
    means: Tensor,
    variances: Tensor,
    scale: Tensor,
    penalty: Penalty,
) -> tuple[ParameterVector, Tensor]:
    """Split the gradient of :math:`\\gamma \\mathcal{L}` through the fit into a cotangent for the solve and a direct term.

    The derivative of :math:`\\mathcal{L}(\\theta^*(X), X)` is
    :math:`\\partial_X \\mathcal{L} + (\\nabla_\\theta \\mathcal{L})^\\top \\partial_X \\theta^*`.
    At an exact stationary point the second term vanishes (envelope theorem). EM stops at a
    tolerance and the M-step rounds, so at the returned parameters
    :math:`\\nabla_\\theta \\mathcal{L}` is small but not zero, and the direct term
    divides it by the variances. In a float32 test with a component on a single point, at a
    variance floor of 1e-10, rounding alone moved the direct term by about 80. Passing
    :math:`\\gamma \\nabla_\\theta \\mathcal{L}` to the solve as a cotangent adds the
    first-order correction towards the stationary point, which cancels that error. Both
    terms use the explicit differences :math:`x_i - \\mu_k`, because the expanded products
    of :func:`mix_affine_terms` would subtract terms that grow like :math:`1 / \\sigma^2`.
    With :math:`S^1_k = \\sum_i r_{ik} (x_i - \\mu_k)` and
    :math:`S^2_k = \\sum_i r_{ik} (x_i - \\mu_k)^2`,

    .. math::

        \\frac{\\partial \\mathcal{L}}{\\partial \\mu_k} = \\frac{S^1_k - \\kappa_0 \\mu_k}{\\sigma^2_k}, \\quad
        \\frac{\\partial \\mathcal{L}}{\\partial s_k} = \\frac{1}{2} \\Big(\\frac{S^2_k + \\kappa_0 \\mu_k^2
        + n_0 v_0}{\\sigma^2_k} - N_k - n_0\\Big), \\quad
        \\frac{\\partial \\mathcal{L}}{\\partial \\eta_j} = N_j + \\lambda - \\pi_j (N + K \\lambda).

    Parameters
    ----------
    x : Tensor of shape (B, N, D), padding zeroed
    member : Tensor of shape (B, N)
    responsibilities : Tensor of shape (B, N, K)
    weights : Tensor of shape (B, K)
    means, variances : Tensor of shape (B, K, D)
    scale : Tensor of shape (B,)
        :math:`\\gamma`, the gradient of the loss with respect to the lower bound over the
        number of members.
    penalty : Penalty

    Returns
    -------
    cotangent : ParameterVector
        :math:`\\gamma \\nabla_\\theta \\mathcal{L}`.
    direct : Tensor of shape (B, N, D)
        :math:`-\\gamma \\sum_k r_{ik} (x_i - \\mu_k) / \\sigma^2_k`.
    """
    n_components = weights.shape[-1]
    precisions = variances.reciprocal()
    direct = torch.zeros_like(x)
    first_sums, second_sums = [], []
    for component in range(n_components):
        deviations = x - means[:, component : component + 1]
        weighted = deviations * responsibilities[:, :, component : component + 1]
        first_sums.append(weighted.sum(dim=1))
        second_sums.append((weighted * deviations).sum(dim=1))
        direct.addcmul_(weighted, precisions[:, component : component + 1], value=-1.0)

    first = torch.stack(first_sums, dim=1)
    second = torch.stack(second_sums, dim=1)
    counts = responsibilities.sum(dim=1)
    mean_gradient = (first - penalty.mean_count * means) * precisions
    scatter = second + penalty.mean_count * means.square() + penalty.variance_count * penalty.variance
    logvar_gradient = 0.5 * (scatter * precisions - (counts + penalty.variance_count).unsqueeze(-1))
    total = member.sum(dim=-1, keepdim=True) + n_components * penalty.weight_count
    logit_gradient = (counts + penalty.weight_count - weights * total)[:, :-1]

    scale = scale.view(-1, 1, 1)
    cotangent = ParameterVector(scale * mean_gradient, scale * logvar_gradient, scale.view(-1, 1) * logit_gradient)
    return cotangent, direct.mul_(scale)


class FiniteSetGradients(torch.autograd.Function):
    """Identity on a batch of sets (B, N, D) whose backward pass zeroes the gradient of sets where it is not finite.

    Wraps the points before unrolled EM, so that a non-finite gradient of a set gets the same
    treatment as in the implicit backward: zeros and a ``RuntimeWarning`` naming the set.
    Inputs: ``x`` and a :class:`Penalty`, which picks the remedy that the warning suggests.
    """

    @staticmethod
    def forward(ctx, x, penalty):
        ctx.penalty = penalty
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        reason = "a component without points and a prior count of 0, or overflow"
        remedy = failure_remedy(ctx.penalty, "unrolled")
        return zero_failed_sets(grad_x, None, reason, remedy, backward="unrolled"), None


class ImplicitEMFit(torch.autograd.Function):
    """EM without autograd in the forward pass, implicit-function gradient in the backward pass.

    Inputs are those of :func:`~s2m.mixture.em.fit_in_chunks`: ``x`` (B, N, D) with padding
    zeroed, ``member`` (B, N), ``n_components``, the initial (weights, means, variances) or
    None for k-means++, ``seed``, a :class:`Penalty`, ``max_iter`` and ``tol``. Outputs:
    weights, means, variances, the lower bound (B,), converged and n_iter. Only ``x``
    receives a gradient: at a fixed point the fit does not depend on its initialisation.
    The backward pass is not itself differentiable.
    """

    @staticmethod
    def forward(ctx, x, member, n_components, start, seed, penalty, max_iter, tol):
        ctx.set_materialize_grads(False)
        fit = fit_in_chunks(x, member, n_components, start, seed, penalty, max_iter, tol)
        ctx.save_for_backward(x, member, fit.responsibilities, fit.weights, fit.means, fit.variances)
        ctx.penalty = penalty
        ctx.mark_non_differentiable(fit.converged, fit.n_iter)
        return fit.weights, fit.means, fit.variances, fit.lower_bound, fit.converged, fit.n_iter

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weights, grad_means, grad_variances, grad_lower_bound, _grad_converged, _grad_n_iter):
        x, member, responsibilities, weights, means, variances = ctx.saved_tensors
        grad_x = implicit_gradient(
            x,
            member,
            responsibilities,
            weights,
            means,
            variances,
            grad_weights,
            grad_means,
            grad_variances,
            grad_lower_bound,
            ctx.penalty,
        )
        return grad_x, None, None, None, None, None, None, None


# Dense reference, for tests and benchmarks at small D.


def pack_parameters(weights: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """Pack fitted parameters into :math:`\\theta` of shape (B, P), with logits relative to the last weight."""
    logits = torch.log(weights[:, :-1]) - torch.log(weights[:, -1:])
    return ParameterVector(means, torch.log(variances), logits).pack()


def unpack_parameters(theta: Tensor, n_components: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Map :math:`\\theta` of shape (B, P) back to weights (B, K), means and variances (B, K, D)."""
    parts = ParameterVector.unpack(theta, n_components, dim)
    weights = torch.softmax(torch.nn.functional.pad(parts.logits, (0, 1)), dim=-1)
    return weights, parts.means, torch.exp(parts.log_variances)


def objective_direct(theta: Tensor, x: Tensor, member: Tensor, n_components: int, penalty: Penalty) -> Tensor:
    """Evaluate :math:`\\mathcal{L}(\\theta, X)` for one set from explicit differences, as a reference.

    Parameters
    ----------
    theta : Tensor of shape (P,)
    x : Tensor of shape (N, D)
    member : Tensor of shape (N,)

    Returns
    -------
    Tensor of shape ()
    """
    dim = x.shape[-1]
    weights, means, variances = unpack_parameters(theta.unsqueeze(0), n_components, dim)
    deviations = x.unsqueeze(1) - means
    log_density = -0.5 * (dim * LOG_2PI + torch.log(variances).sum(-1) + (deviations.square() / variances).sum(-1))
    log_likelihood = torch.logsumexp(log_density + torch.log(weights), dim=-1)
    return (log_likelihood * member).sum() + log_prior(torch.log(weights), means, variances, penalty).squeeze(0)


def _reference_inputs(x, fit, mask, variance_prior, mean_prior_count, weight_prior_count):
    x, member = validate_points(x, mask)
    penalty = resolve_penalty(x.shape[-1], variance_prior, mean_prior_count, weight_prior_count)
    theta = pack_parameters(fit.weights.detach(), fit.means.detach(), fit.variances.detach())
    return x, member, penalty, theta


def objective_hessian_dense(
    x: Tensor,
    fit: GaussianMixtureFit,
    mask: Tensor | None = None,
    *,
    variance_prior: VariancePrior = VariancePrior(),
    mean_prior_count: float = 0.01,
    weight_prior_count: float = 0.1,
    chunk_size: int | None = 256,
) -> Tensor:
    """Compute :math:`H = \\nabla^2_\\theta \\mathcal{L}` at the fit with autograd, set by set.

    Memory is :math:`P^2` per set with :math:`P = 2KD + K - 1`, so this is for small D.

    Returns
    -------
    Tensor of shape (B, P, P)
    """
    x, member, penalty, theta = _reference_inputs(x, fit, mask, variance_prior, mean_prior_count, weight_prior_count)
    n_components = fit.weights.shape[-1]
    hessians = []
    for index in range(x.shape[0]):

        def objective(parameters, index=index):
            return objective_direct(parameters, x[index], member[index], n_components, penalty)

        hessians.append(torch.func.jacrev(torch.func.grad(objective), chunk_size=chunk_size)(theta[index]))
    return torch.stack(hessians)


def solve_hessian_structured(
    x: Tensor,
    fit: GaussianMixtureFit,
    vector: Tensor,
    mask: Tensor | None = None,
    *,
    variance_prior: VariancePrior = VariancePrior(),
    mean_prior_count: float = 0.01,
    weight_prior_count: float = 0.1,
) -> Tensor:
    """Solve :math:`H w = v` at the fit with the structured (Woodbury) solve.

    Parameters
    ----------
    vector : Tensor of shape (B, P)
        :math:`v` in the layout ``[means, log_variances, logits]``.

    Returns
    -------
    Tensor of shape (B, P)
    """
    x, member, penalty, _ = _reference_inputs(x, fit, mask, variance_prior, mean_prior_count, weight_prior_count)
    n_components, dim = fit.means.shape[1:]
    parameters = (fit.weights.detach(), fit.means.detach(), fit.variances.detach())
    responsibilities, _ = e_step(point_features(x), member, *parameters, penalty)
    parts = ParameterVector.unpack(vector, n_components, dim)
    solution, _, _ = solve_structured(x, member, responsibilities, *parameters, parts, penalty)
    return solution.pack()


def implicit_gradient_dense(
    x: Tensor,
    fit: GaussianMixtureFit,
    grad_weights: Tensor,
    grad_means: Tensor,
    grad_variances: Tensor,
    mask: Tensor | None = None,
    *,
    variance_prior: VariancePrior = VariancePrior(),
    mean_prior_count: float = 0.01,
    weight_prior_count: float = 0.1,
    chunk_size: int | None = 256,
) -> Tensor:
    """Compute the implicit gradient with a dense Hessian from autograd, as a reference.

    Builds :math:`H` and :math:`\\partial \\mathrm{loss} / \\partial \\theta` with
    ``torch.func``, solves :math:`H w = v` by LU, and differentiates
    :math:`\\nabla_\\theta \\mathcal{L}^\\top w` with respect to ``x`` by double backward.
    It shares only the objective's definition with the structured backward. The prior
    options must be those of the fit.

    Parameters
    ----------
    x : Tensor of shape (B, N, D)
    fit : GaussianMixtureFit
    grad_weights : Tensor of shape (B, K)
    grad_means, grad_variances : Tensor of shape (B, K, D)
    mask : Tensor of shape (B, N), bool, optional
    chunk_size : int or None
        Rows of :math:`H` computed per vectorised pass, passed to ``torch.func.jacrev``.

    Returns
    -------
    Tensor of shape (B, N, D)
    """
    hessian = objective_hessian_dense(
        x,
        fit,
        mask,
        variance_prior=variance_prior,
        mean_prior_count=mean_prior_count,
        weight_prior_count=weight_prior_count,
        chunk_size=chunk_size,
    )
    x, member, penalty, theta = _reference_inputs(x, fit, mask, variance_prior, mean_prior_count, weight_prior_count)
    n_components, dim = fit.means.shape[1:]

    def outputs(parameters):
        return unpack_parameters(parameters, n_components, dim)

    _, pullback = torch.func.vjp(outputs, theta)
    (vector,) = pullback((grad_weights, grad_means, grad_variances))
    # One set at a time, because batched LU on the CPU is unreliable with several threads
    # (see solve_symmetric).
    solution = torch.stack([torch.linalg.solve(matrix, rhs) for matrix, rhs in zip(hessian, vector)])

    gradients = []
    for index in range(x.shape[0]):

        def stationarity_product(points, index=index):
            def objective(parameters):
                return objective_direct(parameters, points, member[index], n_components, penalty)

            return torch.dot(torch.func.grad(objective)(theta[index]), solution[index])

        gradients.append(-torch.func.grad(stationarity_product)(x[index]))
    return torch.stack(gradients)
