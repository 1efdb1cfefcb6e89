"""Batched EM for mixtures of diagonal Gaussians, with k-means++ seeding.

Every function works on a batch of B sets padded to N points, with a float member mask of
shape (B, N) that is 1 for members and 0 for padding. Padded rows of ``x`` must be finite
(the public functions zero them), because they are multiplied by 0 rather than indexed
out. Nothing here does in-place updates of tensors that may require grad, so the same
code runs under ``torch.no_grad()`` for the implicit backward and with autograd for the
unrolled backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from s2m.mixture.prior import Penalty, log_prior_from_sums

LOG_2PI = math.log(2.0 * math.pi)

#: Largest rounding error, in nats, accepted in a log-density computed from the expanded
#: quadratic form. The error is about the machine epsilon times
#: :math:`\\sum_d \\mu_{kd}^2 / \\sigma^2_{kd}`, which grows without bound as a component
#: collapses onto a single point. Components above the limit get their log-densities and
#: variances recomputed from explicit differences to the mean.
EXPANSION_ERROR_LIMIT = 1e-3

#: Safety factor on that error estimate, for deciding which entries of a component above
#: the limit could matter. The error of a sum of D products also grows with the terms of
#: the points, not only with those of the mean, so the factor is generous.
EXPANSION_ERROR_FACTOR = 16.0

#: Log-ratio below the most likely component at which a component's share of a point is
#: negligible in float64 too, since exp(-50) is about 2e-22.
NEGLIGIBLE_LOG_RATIO = 50.0

#: Target size in bytes of the points and their squares for one chunk of sets in
#: :func:`fit_in_chunks`, which bounds the temporary memory of a fit. Each chunk repeats
#: the same few dozen small tensor operations per EM iteration, so larger chunks spend less
#: time per set on them. On a 2-core CPU with two threads, fits of 256 sets of D = 256
#: were fastest from about this size up, and with one thread the size made no difference.
CHUNK_BYTES = 32 * 2**20


@dataclass
class EMResult:
    """Parameters after EM, with the responsibilities and objective at them and the bookkeeping of the run.

    Attributes
    ----------
    weights : Tensor of shape (B, K)
    means, variances : Tensor of shape (B, K, D)
    responsibilities : Tensor of shape (B, N, K)
        At the returned parameters, zero on padding.
    lower_bound : Tensor of shape (B,)
        Objective per member at the returned parameters.
    converged : Tensor of shape (B,), bool
    n_iter : Tensor of shape (B,), int64
        E-steps per set, each followed by the convergence test.
    """

    weights: Tensor
    means: Tensor
    variances: Tensor
    responsibilities: Tensor
    lower_bound: Tensor
    converged: Tensor
    n_iter: Tensor


@dataclass
class PointFeatures:
    """The points of a batch of sets and their squares, which every E-step and M-step reads.

    Attributes
    ----------
    squares : Tensor of shape (B, N, D)
        :math:`x^2`, elementwise.
    points : Tensor of shape (B, N, D)
        :math:`x`.
    """

    squares: Tensor
    points: Tensor

    def __getitem__(self, index) -> PointFeatures:
        """Select sets, as indexing the batch axis of both tensors would."""
        return PointFeatures(self.squares[index], self.points[index])


def point_features(x: Tensor, out: Tensor | None = None) -> PointFeatures:
    """Compute the squares of the points of a batch (B, N, D) of sets.

    Without autograd and with ``out``, a contiguous tensor with at least B rows of shape
    (N, D), the squares are written into its first B rows. Reusing one buffer for every
    chunk of a fit avoids allocating and first touching new memory for each.
    """
    if out is None or (torch.is_grad_enabled() and x.requires_grad):
        return PointFeatures(x.square(), x)
    return PointFeatures(torch.square(x, out=out[: x.shape[0]]), x)


@dataclass
class ExpandedComponents:
    """Per-component coefficients of the expanded log-density, and the sums the prior needs.

    With precisions :math:`p_{kd} = 1 / \\sigma^2_{kd}`,

    .. math::

        \\log \\mathcal{N}(x \\mid \\mu_k, \\operatorname{diag} \\sigma^2_k)
        = -\\tfrac{1}{2} \\sum_d p_{kd} x_d^2 + \\sum_d p_{kd} \\mu_{kd} x_d + c_k,
        \\qquad
        c_k = -\\tfrac{1}{2} \\Big(D \\log 2\\pi + \\sum_d \\log \\sigma^2_{kd} + \\sum_d p_{kd} \\mu_{kd}^2\\Big),

    so that the densities of all points cost two batched matrix products with the
    :func:`point_features`. The expansion loses precision when :math:`|x|` greatly exceeds
    :math:`|x - \\mu|` in units of :math:`\\sigma`, which the variance prior bounds.

    Components whose expansion would lose more than :data:`EXPANSION_ERROR_LIMIT` get
    their log-densities from explicit differences :math:`x - \\mu_k` instead.

    Attributes
    ----------
    means : Tensor of shape (B, K, D)
        :math:`\\mu_k`.
    precisions : Tensor of shape (B, K, D)
        :math:`p_k`, to multiply :math:`x^2`.
    scaled_means : Tensor of shape (B, K, D)
        :math:`p_k \\mu_k`, to multiply :math:`x`.
    offsets : Tensor of shape (B, K)
        :math:`c_k`.
    sum_log_variances, sum_precisions, sum_scaled_mean_squares : Tensor of shape (B, K)
        :math:`\\sum_d \\log \\sigma^2_{kd}`, :math:`\\sum_d p_{kd}` and :math:`\\sum_d p_{kd} \\mu_{kd}^2`.
    """

    means: Tensor
    precisions: Tensor
    scaled_means: Tensor
    offsets: Tensor
    sum_log_variances: Tensor
    sum_precisions: Tensor
    sum_scaled_mean_squares: Tensor

    @classmethod
    def from_parameters(cls, means: Tensor, variances: Tensor) -> ExpandedComponents:
        """Build the coefficients from means and variances of shape (B, K, D)."""
        precisions = variances.reciprocal()
        scaled_means = means * precisions

        sum_log_variances = torch.log(variances).sum(dim=-1)
        sum_scaled_mean_squares = (means * scaled_means).sum(dim=-1)
        offsets = -0.5 * (means.shape[-1] * LOG_2PI + sum_log_variances + sum_scaled_mean_squares)
        return cls(
            means, precisions, scaled_means, offsets, sum_log_variances, precisions.sum(dim=-1), sum_scaled_mean_squares
        )

    def log_joint(self, features: PointFeatures, log_weights: Tensor) -> Tensor:
        """Compute :math:`\\log \\pi_k + \\log \\mathcal{N}(x_i \\mid \\mu_k, \\operatorname{diag} \\sigma^2_k)`, shape (B, N, K).

        ``log_weights`` (B, K) are the log mixing weights, or zeros for the densities alone.
        """
        # The products are laid out as (B, K, N): in float32 on a 2-core Intel Xeon with torch
        # 2.13 and MKL, that measured about twice as fast as (B, N, K). The M-step's product then
        # reads the responsibilities' transpose contiguously.
        shift = (self.offsets + log_weights).unsqueeze(-1)
        joint = torch.baddbmm(shift, self.precisions, features.squares.transpose(1, 2), alpha=-0.5)
        joint = torch.baddbmm(joint, self.scaled_means, features.points.transpose(1, 2)).transpose(1, 2)

        inaccurate = expansion_error(self.sum_scaled_mean_squares) > EXPANSION_ERROR_LIMIT
        if bool(inaccurate.any()):
            joint = self.replace_with_explicit(joint, features.points, log_weights, inaccurate)
        return joint

    def replace_with_explicit(self, joint: Tensor, points: Tensor, log_weights: Tensor, selected: Tensor) -> Tensor:
        """Recompute entries of ``joint`` (B, N, K) for the ``selected`` (B, K) components from explicit differences.

        Only entries that can matter are recomputed: those that, allowing for the rounding
        error of the expansion, could come within :data:`NEGLIGIBLE_LOG_RATIO` of the
        largest entry of their point. A component that collapsed onto one point thus costs
        one difference, for that point, instead of one per point. The search runs over the
        sets that have a selected component only.
        """
        affected = torch.nonzero(selected.any(dim=-1)).flatten()
        selected = selected.index_select(0, affected)
        sums = self.sum_scaled_mean_squares.index_select(0, affected)
        error = (EXPANSION_ERROR_FACTOR * expansion_error(sums)).unsqueeze(1)
        error = torch.where(selected.unsqueeze(1), error, 0.0)
        affected_joint = joint.index_select(0, affected)
        floor = (affected_joint - error).amax(dim=-1, keepdim=True) - NEGLIGIBLE_LOG_RATIO
        needed = selected.unsqueeze(1) & (affected_joint + error >= floor)
        sets, rows, components = torch.nonzero(needed, as_tuple=True)
        sets = affected.index_select(0, sets)

        n_points = points.shape[1]
        point_rows = points.flatten(0, 1).index_select(0, sets * n_points + rows)
        means, precisions = select_components((self.means, self.precisions), sets, components)
        quadratic = ((point_rows - means).square() * precisions).sum(dim=-1)

        normalizer = self.means.shape[-1] * LOG_2PI + self.sum_log_variances[sets, components]
        values = log_weights[sets, components] - 0.5 * (normalizer + quadratic)
        return joint.index_put((sets, rows, components), values)


def select_components(tensors: tuple[Tensor, ...], sets: Tensor, components: Tensor) -> tuple[Tensor, ...]:
    """Gather the rows ``[sets, components]`` of tensors shaped (B, K, ...), as (F, ...) each."""
    flat = sets * tensors[0].shape[1] + components
    return tuple(tensor.flatten(0, 1).index_select(0, flat) for tensor in tensors)


def expansion_error(sum_scaled_mean_squares: Tensor) -> Tensor:
    """Estimate the rounding error, in nats, of log-densities from the expanded quadratic form.

    Parameters
    ----------
    sum_scaled_mean_squares : Tensor of shape (B, K)
        :math:`\\sum_d \\mu_{kd}^2 / \\sigma^2_{kd}`.

    Returns
    -------
    Tensor of shape (B, K)
    """
    return sum_scaled_mean_squares * torch.finfo(sum_scaled_mean_squares.dtype).eps


def log_component_densities(features: PointFeatures, means: Tensor, variances: Tensor) -> Tensor:
    """Compute :math:`\\log \\mathcal{N}(x_i \\mid \\mu_k, \\operatorname{diag} \\sigma^2_k)` for all points and components.

    Parameters
    ----------
    features : PointFeatures
        Of the points, each of shape (B, N, D).
    means, variances : Tensor of shape (B, K, D)

    Returns
    -------
    Tensor of shape (B, N, K)
    """
    components = ExpandedComponents.from_parameters(means, variances)
    return components.log_joint(features, torch.zeros_like(components.offsets))


def normalize_log_joint(joint: Tensor) -> tuple[Tensor, Tensor]:
    """Normalise log joint probabilities over components into responsibilities and the log-evidence.

    Computes :math:`r_{ik} = \\exp(a_{ik} - m_i) / s_i` and
    :math:`\\log \\sum_k \\exp a_{ik} = m_i + \\log s_i`, with :math:`m_i = \\max_k a_{ik}` and
    :math:`s_i = \\sum_k \\exp(a_{ik} - m_i)`, from one exponential per entry.

    Responsibilities below :math:`\\sqrt{t}`, with :math:`t` the smallest normal number of
    the dtype (about 1e-19 in float32 and 1e-154 in float64), are set to exactly zero. The
    CPU's exp is many times slower on arguments whose result is subnormal or underflows, and
    in high dimension most entries of :math:`a_{ik} - m_i` are such arguments. The cut also
    keeps subnormal products out of the M-step. Relative to the largest responsibility of a
    point, 1, what is cut is far below the resolution of the dtype.

    Parameters
    ----------
    joint : Tensor of shape (..., K)

    Returns
    -------
    responsibilities : Tensor of shape (..., K)
    log_norm : Tensor of shape (...)
    """
    floor = 0.5 * math.log(torch.finfo(joint.dtype).tiny)
    peak = joint.detach().amax(dim=-1, keepdim=True)
    exponent = joint - peak
    scaled = torch.exp(exponent.clamp_min(floor)).masked_fill(exponent < floor, 0.0)
    total = scaled.sum(dim=-1, keepdim=True)
    log_norm = (torch.log(total) + peak).squeeze(-1)
    return scaled / total, log_norm


def e_step(
    features: PointFeatures,
    member: Tensor,
    weights: Tensor,
    means: Tensor,
    variances: Tensor,
    penalty: Penalty,
) -> tuple[Tensor, Tensor]:
    """Compute responsibilities and the objective of each set at the given parameters.

    Parameters
    ----------
    features : PointFeatures
        Of the points, each of shape (B, N, D).
    member : Tensor of shape (B, N), 1.0 for members and 0.0 for padding
    weights : Tensor of shape (B, K)
    means, variances : Tensor of shape (B, K, D)
    penalty : Penalty

    Returns
    -------
    responsibilities : Tensor of shape (B, N, K)
        Zero on padded rows.
    objective : Tensor of shape (B,), float64
        The penalised log-likelihood :math:`\\mathcal{L}` summed over members (see
        :mod:`s2m.mixture.prior`). The sum is taken in float64 whatever the dtype of the
        points. In float32, N log-likelihoods of a few hundred nats each sum with an error
        of about 1e-3, far above the growth per member that the convergence test resolves.
    """
    log_weights = torch.log(weights)
    components = ExpandedComponents.from_parameters(means, variances)
    responsibilities, log_norm = normalize_log_joint(components.log_joint(features, log_weights))

    responsibilities = responsibilities * member.unsqueeze(-1)
    prior = log_prior_from_sums(
        log_weights,
        components.sum_log_variances,
        components.sum_precisions,
        components.sum_scaled_mean_squares,
        penalty,
    )
    objective = (log_norm.double() * member).sum(dim=-1) + prior
    return responsibilities, objective


def m_step(
    features: PointFeatures,
    member: Tensor,
    responsibilities: Tensor,
    penalty: Penalty,
) -> tuple[Tensor, Tensor, Tensor]:
    """Maximise the EM surrogate of the penalised objective exactly.

    Parameters
    ----------
    features : PointFeatures
        Of the points, each of shape (B, N, D).
    member : Tensor of shape (B, N)
    responsibilities : Tensor of shape (B, N, K), zero on padded rows
    penalty : Penalty

    Returns
    -------
    weights : Tensor of shape (B, K)
    means, variances : Tensor of shape (B, K, D)
    """
    n_points = member.sum(dim=-1, keepdim=True)
    n_components = responsibilities.shape[-1]
    counts = responsibilities.sum(dim=1)
    weights = (counts + penalty.weight_count) / (n_points + n_components * penalty.weight_count)

    transposed = responsibilities.transpose(1, 2)
    second_moment = torch.bmm(transposed, features.squares)
    first_moment = torch.bmm(transposed, features.points)

    # With mean_count = 0 a component without points has first_moment = 0 and gets the mean
    # 0 * (1 / tiny) = 0, where the unclamped count would give 0 / 0 = NaN.
    mean_denominator = (counts + penalty.mean_count).clamp_min(torch.finfo(first_moment.dtype).tiny).unsqueeze(-1)
    means = first_moment * mean_denominator.reciprocal()

    # second_moment - first_moment * mu = sum_i r_ik (x_i - mu)^2 + kappa_0 mu^2. Rounding
    # can push it slightly below zero, so the sum with n_0 v_0 is clamped at n_0 v_0.
    prior_scatter = penalty.variance_count * penalty.variance
    scatter = torch.addcmul(second_moment, first_moment, means, value=-1.0) + prior_scatter
    variances = scatter.clamp_min(prior_scatter) * (counts + penalty.variance_count).reciprocal().unsqueeze(-1)

    # The subtraction above loses about eps * mu^2 / sigma^2 of each variance, the same
    # relative error that the next E-step's expansion has.
    inaccurate = expansion_error((means.square() / variances).sum(dim=-1)) > EXPANSION_ERROR_LIMIT
    if bool(inaccurate.any()):
        variances = explicit_variances(features.points, responsibilities, counts, means, variances, inaccurate, penalty)
    return weights, means, variances


def explicit_variances(
    points: Tensor,
    responsibilities: Tensor,
    counts: Tensor,
    means: Tensor,
    variances: Tensor,
    selected: Tensor,
    penalty: Penalty,
) -> Tensor:
    """Recompute the M-step variances of the ``selected`` (B, K) components from explicit differences to the mean.

    Only points with a nonzero responsibility for a selected component enter its scatter,
    so a component that collapsed onto one point costs one difference.

    Returns ``variances`` (B, K, D) with those rows replaced.
    """
    n_points, n_components = responsibilities.shape[1:]
    selected_sets, selected_components = torch.nonzero(selected, as_tuple=True)
    flat = selected_sets * n_components + selected_components

    # Pairs (point, selected component) with a nonzero responsibility, found among the
    # points of the sets that have a selected component.
    affected = torch.unique_consecutive(selected_sets)
    affected_responsibilities = responsibilities.index_select(0, affected)
    needed = (affected_responsibilities > 0) & selected.index_select(0, affected).unsqueeze(1)
    pair_sets, rows, components = torch.nonzero(needed, as_tuple=True)
    pair_responsibilities = affected_responsibilities[pair_sets, rows, components]
    pair_sets = affected.index_select(0, pair_sets)

    # Position of each pair's component among the selected ones.
    slot = torch.full((responsibilities.shape[0] * n_components,), -1, dtype=torch.int64, device=flat.device)
    slot[flat] = torch.arange(flat.numel(), device=flat.device)
    pair_slots = slot.index_select(0, pair_sets * n_components + components)

    selected_means = means.flatten(0, 1).index_select(0, flat)
    point_rows = points.flatten(0, 1).index_select(0, pair_sets * n_points + rows)
    weighted = pair_responsibilities.unsqueeze(-1) * (point_rows - selected_means.index_select(0, pair_slots)).square()
    scatter = torch.zeros_like(selected_means).index_add(0, pair_slots, weighted)

    scatter = scatter + penalty.mean_count * selected_means.square()
    denominator = (counts.flatten().index_select(0, flat) + penalty.variance_count).unsqueeze(-1)
    values = (scatter + penalty.variance_count * penalty.variance) / denominator
    return variances.index_put((selected_sets, selected_components), values)


def sample_by_weight(weights: Tensor, uniform: Tensor) -> Tensor:
    """Draw one index per row with probability proportional to ``weights``, by inverting the CDF.

    Zero-weight entries are never drawn, and padding appended at the end of a row leaves
    the draw unchanged, so a padded set draws the same index as the same set unpadded.

    Parameters
    ----------
    weights : Tensor of shape (B, N), non-negative, each row with a positive sum
    uniform : Tensor of shape (), a number in [0, 1) shared by all rows

    Returns
    -------
    Tensor of shape (B,), int64
    """
    cdf = torch.cumsum(weights, dim=-1)
    target = uniform * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_max(weights.shape[-1] - 1)


def squared_distances(x: Tensor, centers: Tensor) -> Tensor:
    """Compute squared Euclidean distances between points (B, N, D) and centers (B, C, D), as (B, N, C).

    Differences are formed directly, without the expansion
    :math:`|x|^2 - 2 x \\cdot c + |c|^2`, so duplicates are at distance exactly 0 and float32
    and float64 inputs agree to rounding.
    """
    return torch.cdist(x, centers, compute_mode="donot_use_mm_for_euclid_dist").square()


def kmeans_plusplus_centers(x: Tensor, member: Tensor, n_components: int, seed: int) -> Tensor:
    """Choose k-means++ seeds (Arthur and Vassilvitskii, 2007) for every set.

    The first seed is a uniformly drawn member. Each next seed is a member drawn with
    probability proportional to its squared distance to the nearest seed so far. When all
    remaining distances are zero (fewer distinct points than components), the draw falls
    back to a uniform draw over members, so the seed repeats a point.

    The uniform numbers come from a CPU ``torch.Generator`` seeded with ``seed``, and all
    sets share them. A set's seeds thus depend only on its own members and ``seed``, not on
    the rest of the batch, its padding or the device. float32 and float64 inputs draw the
    same seeds except where a draw falls within rounding error of a boundary.

    Parameters
    ----------
    x : Tensor of shape (B, N, D)
    member : Tensor of shape (B, N)
    n_components : int
    seed : int

    Returns
    -------
    Tensor of shape (B, K, D), the seed points
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    uniforms = torch.rand(n_components, generator=generator, dtype=torch.float64).to(device=x.device, dtype=x.dtype)

    batch_index = torch.arange(x.shape[0], device=x.device)
    nearest_sq_distance = torch.full_like(member, math.inf)
    centers = []

    for component in range(n_components):
        if component == 0:
            draw_weights = member
        else:
            draw_weights = nearest_sq_distance * member
            degenerate = draw_weights.sum(dim=-1, keepdim=True) <= 0
            draw_weights = torch.where(degenerate, member, draw_weights)

        index = sample_by_weight(draw_weights, uniforms[component])
        center = x[batch_index, index]
        centers.append(center)

        sq_distance = squared_distances(x, center.unsqueeze(1)).squeeze(-1)
        nearest_sq_distance = torch.minimum(nearest_sq_distance, sq_distance)

    return torch.stack(centers, dim=1)


def initial_parameters(
    x: Tensor,
    member: Tensor,
    n_components: int,
    seed: int,
    penalty: Penalty,
    features: PointFeatures | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Compute initial parameters by one M-step from the hard assignment to k-means++ seeds.

    Each member is assigned to its nearest seed (ties go to the lower component index), and
    the M-step turns these one-hot responsibilities into weights, means and variances. A
    seed that owns no member (possible with duplicate points) starts as a component held
    by the prior alone. ``features`` are :func:`point_features` of ``x``, computed here
    when not given.

    Returns
    -------
    weights : Tensor of shape (B, K)
    means, variances : Tensor of shape (B, K, D)
    """
    with torch.no_grad():
        centers = kmeans_plusplus_centers(x.detach(), member, n_components, seed)
        nearest = squared_distances(x.detach(), centers).argmin(dim=-1)
        responsibilities = torch.nn.functional.one_hot(nearest, n_components).to(x.dtype)
        responsibilities = responsibilities * member.unsqueeze(-1)

    if features is None:
        features = point_features(x)
    return m_step(features, member, responsibilities, penalty)


def run_em(
    features: PointFeatures,
    member: Tensor,
    weights: Tensor,
    means: Tensor,
    variances: Tensor,
    penalty: Penalty,
    max_iter: int,
    tol: float,
) -> EMResult:
    """Iterate EM from the given parameters until each set converges or ``max_iter`` is reached.

    One iteration is an E-step at the current parameters, the convergence test, then an
    M-step. A set has converged when its objective per member grew by at most ``tol`` over
    the previous iteration, and it returns the parameters of that E-step, with their
    responsibilities and objective. The test is one-sided: EM never decreases the objective
    in exact arithmetic, so a decrease only comes from rounding at convergence and also ends
    the iteration. A set that reaches ``max_iter`` returns the parameters of its last
    M-step, after one more E-step for their responsibilities and objective. Either way the
    returned parameters are an M-step of the responsibilities of the iteration before (or
    the initial parameters), so they are stationary up to the size of the last EM step. A
    set's fit does not depend on the rest of the batch.

    Parameters
    ----------
    features : PointFeatures
        Of the points, each of shape (B, N, D).
    member : Tensor of shape (B, N)
    weights : Tensor of shape (B, K)
    means, variances : Tensor of shape (B, K, D)
        Initial parameters.
    penalty : Penalty
    max_iter : int
    tol : float

    Returns
    -------
    EMResult
    """
    batch_size, device = member.shape[0], member.device
    converged = torch.zeros(batch_size, dtype=torch.bool, device=device)
    n_iter = torch.zeros(batch_size, dtype=torch.int64, device=device)

    # Finished sets stay in the gathered batch, each costing an E-step and an M-step per
    # iteration, until that waste since the last gathering reaches the cost of gathering the
    # running sets again (about one such step each). This spends at most about twice the
    # work of the best choice made in hindsight.
    gathered = torch.arange(batch_size, device=device)
    running = torch.ones(batch_size, dtype=torch.bool, device=device)
    rows = [features, member, member.sum(dim=-1)]
    previous = torch.full_like(rows[2], -math.inf, dtype=torch.float64)
    parameters = (weights, means, variances)
    finished_sets, finished_parts = [], []
    n_running, idle_work = batch_size, 0

    for _ in range(max_iter):
        gathered_features, gathered_member, n_members = rows
        responsibilities, objective = e_step(gathered_features, gathered_member, *parameters, penalty)
        n_iter.index_add_(0, gathered, running.long())

        per_member = objective.detach() / n_members
        done = running & (per_member - previous <= tol)
        previous = per_member
        if bool(done.any()):
            lower_bound = (objective[done] / n_members[done]).to(member.dtype)
            finished_sets.append(gathered[done])
            finished_parts.append((*(tensor[done] for tensor in (*parameters, responsibilities)), lower_bound))
            converged[gathered[done]] = True
            running = running & ~done
            n_running = int(running.sum())
            if n_running == 0:
                break

        idle_work += gathered.numel() - n_running
        if idle_work >= n_running:
            idle_work = 0
            gathered = gathered[running]
            rows = [tensor[running] for tensor in rows]
            previous = previous[running]
            parameters = tuple(tensor[running] for tensor in parameters)
            responsibilities = responsibilities[running]
            running = torch.ones(n_running, dtype=torch.bool, device=device)

        parameters = m_step(rows[0], rows[1], responsibilities, penalty)

    if bool(running.any()):
        gathered_features, gathered_member, n_members = (tensor[running] for tensor in rows)
        parameters = tuple(tensor[running] for tensor in parameters)
        responsibilities, objective = e_step(gathered_features, gathered_member, *parameters, penalty)
        finished_sets.append(gathered[running])
        finished_parts.append((*parameters, responsibilities, (objective / n_members).to(member.dtype)))
    return EMResult(*assemble_sets(finished_sets, finished_parts), converged, n_iter)


def assemble_sets(sets: list[Tensor], parts: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Put per-set results, given in groups of set indices, back in the order of the sets.

    Parameters
    ----------
    sets : list of Tensor of shape (G_j,), int64
        Disjoint groups of set indices that together cover 0 .. B - 1.
    parts : list of tuples of Tensor, each of shape (G_j, ...)
        The results of each group, in the order of its indices.

    Returns
    -------
    tuple of Tensor, each of shape (B, ...)
    """
    if len(parts) == 1:
        order = sets[0]
        if bool((order == torch.arange(order.numel(), device=order.device)).all()):
            return parts[0]
    order = torch.argsort(torch.cat(sets))
    return tuple(torch.cat(tensors)[order] for tensors in zip(*parts))


def fit_in_chunks(
    x: Tensor,
    member: Tensor,
    n_components: int,
    start: tuple[Tensor, Tensor, Tensor] | None,
    seed: int,
    penalty: Penalty,
    max_iter: int,
    tol: float,
) -> EMResult:
    """Initialise and run EM without autograd, a chunk of sets at a time (see :data:`CHUNK_BYTES`).

    Every set is fitted independently, so chunking does not change the result.

    Parameters
    ----------
    x : Tensor of shape (B, N, D)
    member : Tensor of shape (B, N)
    n_components : int
    start : (weights, means, variances) or None
        Initial parameters, or None for the k-means++ initialisation with ``seed``.
    seed : int
    penalty : Penalty
    max_iter : int
    tol : float

    Returns
    -------
    EMResult
    """
    bytes_per_set = x.shape[1] * 2 * x.shape[2] * x.element_size()
    chunk_size = max(1, CHUNK_BYTES // bytes_per_set)
    parts = []

    with torch.no_grad():
        buffer = x.new_empty(min(chunk_size, x.shape[0]), *x.shape[1:])
        for begin in range(0, x.shape[0], chunk_size):
            rows = slice(begin, begin + chunk_size)
            points, chunk_member = x[rows], member[rows]
            features = point_features(points, buffer)
            if start is None:
                chunk_start = initial_parameters(points, chunk_member, n_components, seed, penalty, features)
            else:
                chunk_start = tuple(tensor[rows] for tensor in start)
            parts.append(run_em(features, chunk_member, *chunk_start, penalty, max_iter, tol))

    if len(parts) == 1:
        return parts[0]
    return EMResult(*(torch.cat([getattr(part, field.name) for part in parts]) for field in fields(EMResult)))
