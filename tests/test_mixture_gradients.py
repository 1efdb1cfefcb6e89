"""Gradients of the set-to-model layer: gradcheck, structured against dense solve, implicit against unrolled."""

import math

import pytest
import torch

from s2m.mixture import (
    GaussianMixtureFit,
    VariancePrior,
    fit_diagonal_gaussian,
    fit_diagonal_gmm,
    implicit_gradient_dense,
    mixture_log_prob,
    objective_hessian_dense,
    solve_hessian_structured,
)
from s2m.mixture.checks import validate_points
from s2m.mixture.em import e_step, initial_parameters, point_features, run_em
from s2m.mixture.implicit import (
    ImplicitEMFit,
    gather_soft_points,
    hard_assignment_vjp,
    lower_bound_terms,
    objective_direct,
    pack_parameters,
    parameter_cotangent,
    solve_structured,
    stationarity_vjp,
)
from s2m.mixture.prior import resolve_penalty
from s2m.mixture.synthetic import clustered_sets

# Run EM until the objective stops growing at all. The objective is flat at the maximum, so
# this leaves the parameters accurate to about sqrt(machine epsilon), 1e-8 in float64.
TIGHT = dict(tol=0.0, max_iter=20000)

# Iterations of a fixed-length EM run, enough for the test data to reach the fixed point
# to rounding error. Finite differences through it are then smooth, whereas the public
# API's objective-based stop leaves 1e-8 noise that gradcheck's step of 1e-6 would amplify.
LONG_RUN = 400

# The gradcheck data reaches a bitwise fixed point within 60 iterations, and gradcheck runs
# the forward pass twice per input entry.
GRADCHECK_RUN = 100


def weighted_loss_terms(fit, queries, generator):
    """Return a vector of random weighted sums of every output of the layer."""
    log_prob = mixture_log_prob(fit, queries)
    terms = [
        (torch.randn(fit.weights.shape, generator=generator, dtype=torch.float64) * fit.weights).sum(),
        (torch.randn(fit.means.shape, generator=generator, dtype=torch.float64) * fit.means).sum(),
        (torch.randn(fit.variances.shape, generator=generator, dtype=torch.float64) * fit.variances).sum(),
        (torch.randn(log_prob.shape, generator=generator, dtype=torch.float64) * log_prob).sum(),
        log_prob.sum(),
        fit.lower_bound.sum(),
    ]
    return torch.stack(terms)


def random_cotangents(fit, seed):
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        for tensor in (fit.weights, fit.means, fit.variances)
    )


def parameter_loss(fit, cotangents):
    grad_weights, grad_means, grad_variances = cotangents
    return (fit.weights * grad_weights).sum() + (fit.means * grad_means).sum() + (fit.variances * grad_variances).sum()


def as_fit(weights, means, variances):
    """Wrap parameters in a GaussianMixtureFit, with placeholder bookkeeping fields."""
    batch_size = weights.shape[0]
    flags = torch.ones(batch_size, dtype=torch.bool)
    return GaussianMixtureFit(weights, means, variances, flags, flags.long(), torch.zeros(batch_size))


def stationary_fit(x, n_components, mask=None, n_iter=LONG_RUN):
    """Fit by exactly ``n_iter`` implicit-mode EM iterations, which reach the fixed point to rounding error.

    tol = -inf never stops early. The public API stops on the objective, which leaves the
    parameters accurate to about 1e-8 only.
    """
    points, member = validate_points(x, mask)
    penalty = resolve_penalty(x.shape[-1], VariancePrior(), 0.01, 0.1)
    start = [tensor.detach() for tensor in initial_parameters(points, member, n_components, 0, penalty)]
    weights, means, variances, lower_bound, converged, n_iter = ImplicitEMFit.apply(
        points, member, n_components, start, 0, penalty, n_iter, -math.inf
    )
    return GaussianMixtureFit(weights, means, variances, converged, n_iter, lower_bound)


def count_soft_points(x, fit):
    """Return the largest number of soft points in a set, which size the low-rank part of the Hessian."""
    parameters = [tensor.detach() for tensor in (fit.weights, fit.means, fit.variances)]
    member = torch.ones(x.shape[:2], dtype=x.dtype)
    responsibilities, _ = e_step(point_features(x), member, *parameters, resolve_penalty(x.shape[-1], VariancePrior(), 0.01, 0.1))
    soft = gather_soft_points(x, responsibilities, parameters[1], parameters[2])
    return 0 if soft is None else soft.mixing.shape[1]


def test_gradcheck_diagonal_gaussian():
    x = clustered_sets(2, 6, 3, 2, seed=20).requires_grad_(True)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    queries = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(196), dtype=torch.float64)

    def layer(points):
        fit = fit_diagonal_gaussian(points, mask)
        return weighted_loss_terms(fit, queries, torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("n_components", [2, 3])
def test_gradcheck_implicit_mixture(n_components):
    x = clustered_sets(2, 9, 2, n_components, noise=0.7, normalize=False, seed=21).requires_grad_(True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 7:] = False
    queries = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def layer(points):
        fit = stationary_fit(points, n_components, mask, GRADCHECK_RUN)
        return weighted_loss_terms(fit, queries, torch.Generator().manual_seed(1))

    assert count_soft_points(x.detach(), stationary_fit(x.detach(), n_components, mask, GRADCHECK_RUN)) > 0
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize(("n_components", "dim"), [(2, 3), (3, 2), (2, 5)])
def test_structured_solve_matches_dense(n_components, dim):
    x = clustered_sets(3, 10, dim, n_components, noise=0.8, normalize=False, seed=22)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[2, 6:] = False
    fit = stationary_fit(x, n_components, mask)
    assert count_soft_points(x, fit) > 0

    hessian = objective_hessian_dense(x, fit, mask)
    vector = torch.randn(hessian.shape[:2], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    structured = solve_hessian_structured(x, fit, vector, mask)
    dense = torch.stack([torch.linalg.solve(matrix, rhs) for matrix, rhs in zip(hessian, vector)])

    torch.testing.assert_close(structured, dense, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hessian @ structured.unsqueeze(-1), vector.unsqueeze(-1), rtol=0, atol=1e-9)


@pytest.mark.parametrize("n_components", [1, 2, 4])
def test_implicit_gradient_matches_dense_reference(n_components):
    x = clustered_sets(3, 12, 4, n_components, noise=0.7, normalize=False, seed=23).requires_grad_(True)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 9:] = False
    fit = stationary_fit(x, n_components, mask)
    cotangents = random_cotangents(fit, 3)

    (implicit,) = torch.autograd.grad(parameter_loss(fit, cotangents), x)
    dense = implicit_gradient_dense(x.detach(), fit, *cotangents, mask)

    torch.testing.assert_close(implicit, dense, rtol=1e-8, atol=1e-10)
    assert torch.equal(implicit[0, 9:], torch.zeros(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("n_components", [2, 3])
def test_implicit_gradient_matches_long_unrolled_em(n_components):
    x = clustered_sets(3, 15, 3, n_components, noise=0.8, normalize=False, seed=24).requires_grad_(True)
    queries = torch.randn(3, 6, 3, generator=torch.Generator().manual_seed(255), dtype=torch.float64)
    member = torch.ones(3, 15, dtype=torch.float64)
    penalty = resolve_penalty(3, VariancePrior(), 0.01, 0.1)
    start = initial_parameters(x, member, n_components, 0, penalty)

    # tol = -inf never stops early, so both runs do exactly LONG_RUN iterations and reach
    # the fixed point to rounding error.
    unrolled = run_em(point_features(x), member, *start, penalty, LONG_RUN, -math.inf)
    start = [tensor.detach() for tensor in start]
    implicit = ImplicitEMFit.apply(x, member, n_components, tuple(start), 0, penalty, LONG_RUN, -math.inf)
    assert count_soft_points(x.detach(), as_fit(*implicit[:3])) > 0

    gradients = []
    for weights, means, variances in ((unrolled.weights, unrolled.means, unrolled.variances), implicit[:3]):
        log_prob = mixture_log_prob(as_fit(weights, means, variances), queries)
        gradients.append(torch.autograd.grad(log_prob.sum(), x)[0])

    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("n_components", [2, 3])
def test_hard_assignment_gradient_matches_references(n_components):
    # Tight, distant clusters give one-hot responsibilities, so the backward pass takes the
    # path without soft points. The loss reads every output, the lower bound included.
    x = clustered_sets(3, 12, 6, n_components, noise=0.05, normalize=False, seed=32).requires_grad_(True)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 10:] = False
    queries = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    fit = stationary_fit(x, n_components, mask)
    assert count_soft_points(x.detach(), fit) == 0

    cotangents = random_cotangents(fit, 9)
    (implicit,) = torch.autograd.grad(parameter_loss(fit, cotangents), x, retain_graph=True)
    dense = implicit_gradient_dense(x.detach(), fit, *cotangents, mask)
    torch.testing.assert_close(implicit, dense, rtol=1e-8, atol=1e-10)

    points, member = validate_points(x, mask)
    penalty = resolve_penalty(6, VariancePrior(), 0.01, 0.1)
    start = initial_parameters(points, member, n_components, 0, penalty)
    features = point_features(points)
    unrolled = run_em(features, member, *start, penalty, LONG_RUN, -math.inf)
    _, objective = e_step(features, member, unrolled.weights, unrolled.means, unrolled.variances, penalty)
    unrolled_fit = GaussianMixtureFit(
        unrolled.weights, unrolled.means, unrolled.variances, unrolled.converged, unrolled.n_iter, objective / member.sum(-1)
    )

    gradients = []
    for candidate in (fit, unrolled_fit):
        loss = weighted_loss_terms(candidate, queries, torch.Generator().manual_seed(10)).sum()
        gradients.append(torch.autograd.grad(loss, x)[0])
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("noise", [0.8, 0.05])
@pytest.mark.parametrize("output", ["weights", "means", "variances", "lower_bound"])
def test_single_output_gradient_matches_unrolled(output, noise):
    # A loss on one output leaves the gradients of the others as None in the backward pass.
    # Noise 0.8 gives soft points (Woodbury path) and 0.05 none (hard-assignment path).
    x = clustered_sets(2, 12, 4, 2, noise=noise, normalize=False, seed=34).requires_grad_(True)
    member = torch.ones(2, 12, dtype=torch.float64)
    penalty = resolve_penalty(4, VariancePrior(), 0.01, 0.1)
    start = initial_parameters(x, member, 2, 0, penalty)

    implicit = stationary_fit(x, 2)
    unrolled = run_em(point_features(x), member, *start, penalty, LONG_RUN, -math.inf)
    assert (count_soft_points(x.detach(), implicit) > 0) == (noise > 0.5)

    gradients = []
    for value in (getattr(implicit, output), getattr(unrolled, output)):
        cotangent = torch.randn(value.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
        gradients.append(torch.autograd.grad((value * cotangent).sum(), x)[0])

    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-8, atol=1e-10)


def test_hard_assignment_path_matches_woodbury_path():
    x = clustered_sets(2, 10, 5, 2, noise=0.05, normalize=False, seed=33)
    member = torch.ones(2, 10, dtype=torch.float64)
    penalty = resolve_penalty(5, VariancePrior(), 0.01, 0.1)
    fit = stationary_fit(x, 2)
    parameters = (fit.weights.detach(), fit.means.detach(), fit.variances.detach())
    responsibilities, _ = e_step(point_features(x), member, *parameters, penalty)
    grad_weights, grad_means, grad_variances = random_cotangents(fit, 11)

    hard = hard_assignment_vjp(x, responsibilities, *parameters[1:], grad_means, grad_variances, penalty)
    vector = parameter_cotangent(parameters[0], parameters[2], grad_weights, grad_means, grad_variances)
    solution, soft, _ = solve_structured(x, member, responsibilities, *parameters, vector, penalty)
    assert soft is None
    general = stationarity_vjp(x, responsibilities, *parameters[1:], solution, None)
    torch.testing.assert_close(hard, general, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_points_threshold_eps_squared(dtype):
    eps_squared = torch.finfo(dtype).eps ** 2
    # Other mass per point, spread over 3 components: 0.9, 1.02 and 3 times eps ** 2, then a
    # point with its whole other mass 2 eps ** 2 on one component, then a clearly soft point.
    spread = torch.tensor([0.3, 0.34, 1.0], dtype=torch.float64) * eps_squared
    rows = [[1.0 - 3 * value, value, value, value] for value in spread.tolist()]
    rows += [[2 * eps_squared, 1.0 - 2 * eps_squared, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0]]
    responsibilities = torch.tensor([rows], dtype=dtype)
    x = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(7), dtype=dtype)
    means = torch.zeros(1, 4, 3, dtype=dtype)
    variances = torch.ones(1, 4, 3, dtype=dtype)

    soft = gather_soft_points(x, responsibilities, means, variances)
    assert soft.index.tolist() == [[1, 2, 3, 4]]

    # Each point alone next to a one-hot point, so that no other point decides the batch.
    for row, expected in enumerate([False, True, True, True, True]):
        pair = torch.cat([responsibilities[:, row : row + 1], torch.eye(4, dtype=dtype)[:1].unsqueeze(0)], dim=1)
        soft = gather_soft_points(x[:, :2], pair, means, variances)
        assert (soft is not None) == expected, row
        if expected:
            assert soft.index.tolist() == [[0]]


@pytest.mark.parametrize("n_components", [2, 3])
def test_lower_bound_terms_match_autograd(n_components):
    x = clustered_sets(2, 9, 3, n_components, noise=0.6, normalize=False, seed=34)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    points, member = validate_points(x, mask)
    penalty = resolve_penalty(3, VariancePrior(variance=0.05, pseudo_count=0.5), 0.3, 0.2)
    # Two iterations leave the parameters well away from the stationary point.
    start = initial_parameters(points, member, n_components, 0, penalty)
    result = run_em(point_features(points), member, *start, penalty, 2, -math.inf)
    parameters = (result.weights, result.means, result.variances)
    scale = torch.tensor([0.7, -1.3], dtype=torch.float64)

    cotangent, direct = lower_bound_terms(points, member, result.responsibilities, *parameters, scale, penalty)

    theta = pack_parameters(*parameters)
    for index in range(2):

        def objective(parameters, points, index=index):
            return objective_direct(parameters, points, member[index], n_components, penalty)

        expected_theta = scale[index] * torch.func.grad(objective, argnums=0)(theta[index], points[index])
        expected_x = scale[index] * torch.func.grad(objective, argnums=1)(theta[index], points[index])
        torch.testing.assert_close(cotangent.pack()[index], expected_theta, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(direct[index], expected_x, rtol=1e-10, atol=1e-12)


def test_float32_lower_bound_single_point_component():
    # One outlier gets a component of its own, whose variance sits at the prior floor of
    # about 1e-10, so any rounding in x - mu is divided by 1e-10.
    x = clustered_sets(1, 11, 2, 1, noise=0.1, normalize=False, seed=35)
    x[0, 0] += 3.0
    options = dict(
        variance_prior=VariancePrior(variance=1.0, pseudo_count=1e-10), mean_prior_count=0.0, weight_prior_count=0.0
    )
    gradients = {}
    for dtype in (torch.float64, torch.float32):
        points = x.to(dtype).requires_grad_(True)
        fit = fit_diagonal_gmm(points, 2, **options)
        (gradient,) = torch.autograd.grad(fit.lower_bound.sum(), points)
        gradients[dtype] = gradient.double()

    assert fit.variances.min() < 1e-9
    scale = gradients[torch.float64].abs().max()
    assert gradients[torch.float64][0, 0].abs().max() < 1e-6 * scale
    assert gradients[torch.float32][0, 0].abs().max() < 1e-5 * scale
    torch.testing.assert_close(gradients[torch.float32], gradients[torch.float64], rtol=0, atol=1e-5 * scale.item())


def test_one_component_em_gradient_matches_closed_form():
    x = clustered_sets(3, 8, 5, 2, seed=25).requires_grad_(True)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    queries = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(278), dtype=torch.float64)

    (closed,) = torch.autograd.grad(mixture_log_prob(fit_diagonal_gaussian(x, mask), queries).sum(), x)
    (em,) = torch.autograd.grad(mixture_log_prob(fit_diagonal_gmm(x, 1, mask), queries).sum(), x)

    torch.testing.assert_close(em, closed, rtol=1e-9, atol=1e-12)


def test_padded_batch_gradients_match_single_sets():
    sizes = [6, 11, 9]
    x = clustered_sets(3, 11, 3, 2, noise=0.7, normalize=False, seed=26)
    mask = torch.arange(11).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)
    queries = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(290), dtype=torch.float64)

    batch_points = x.clone().requires_grad_(True)
    batch_fit = fit_diagonal_gmm(batch_points, 2, mask, **TIGHT)
    (batch_grad,) = torch.autograd.grad(mixture_log_prob(batch_fit, queries).sum(), batch_points)

    for index, size in enumerate(sizes):
        points = x[index : index + 1, :size].clone().requires_grad_(True)
        fit = fit_diagonal_gmm(points, 2, **TIGHT)
        (grad,) = torch.autograd.grad(mixture_log_prob(fit, queries[index : index + 1]).sum(), points)
        torch.testing.assert_close(batch_grad[index, :size], grad[0], rtol=1e-8, atol=1e-10)
        assert torch.equal(batch_grad[index, size:], torch.zeros(11 - size, 3, dtype=torch.float64))


def test_float32_gradient_matches_float64():
    x = clustered_sets(4, 15, 64, 4, noise=0.5, seed=27)
    queries = clustered_sets(4, 10, 64, 4, noise=0.5, seed=28)
    gradients = {}
    for dtype in (torch.float32, torch.float64):
        points = x.to(dtype).requires_grad_(True)
        fit = fit_diagonal_gmm(points, 4)
        (gradients[dtype],) = torch.autograd.grad(mixture_log_prob(fit, queries.to(dtype)).mean(), points)

    scale = gradients[torch.float64].abs().max()
    torch.testing.assert_close(gradients[torch.float32].double(), gradients[torch.float64], rtol=0, atol=1e-4 * scale)


def test_saddle_point_gradient_matches_dense():
    # Two identical initial components stay identical under EM, which converges to the
    # single-Gaussian fit split in two: a saddle point, where the capacitance matrix is
    # indefinite and the structured solve falls back from Cholesky to LU.
    x = clustered_sets(2, 12, 3, 2, noise=0.4, normalize=False, seed=29).requires_grad_(True)
    weights = torch.full((2, 2), 0.5, dtype=torch.float64)
    means = x.detach().mean(dim=1, keepdim=True).expand(-1, 2, -1).clone()
    variances = x.detach().var(dim=1, keepdim=True).expand(-1, 2, -1).clone()
    fit = fit_diagonal_gmm(x, 2, init=(weights, means, variances), **TIGHT)
    cotangents = random_cotangents(fit, 4)

    hessian = objective_hessian_dense(x.detach(), fit)
    assert bool((torch.linalg.eigvalsh(hessian)[:, -1] > 0).all())
    torch.testing.assert_close(fit.means[:, 0], fit.means[:, 1], rtol=1e-12, atol=1e-12)

    (implicit,) = torch.autograd.grad(parameter_loss(fit, cotangents), x)
    dense = implicit_gradient_dense(x.detach(), fit, *cotangents)
    torch.testing.assert_close(implicit, dense, rtol=1e-6, atol=1e-8)


def test_large_capacitance_with_explicit_threads():
    # Batched LU on the CPU goes wrong for matrices from about 150 on when set_num_threads
    # was called (torch 2.13 with MKL), so the capacitance solve must not rely on it.
    x = clustered_sets(2, 50, 2, 4, noise=1.5, normalize=False, seed=30).requires_grad_(True)
    fit = stationary_fit(x, 4)
    assert count_soft_points(x.detach(), fit) * 4 >= 160
    cotangents = random_cotangents(fit, 5)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        (implicit,) = torch.autograd.grad(parameter_loss(fit, cotangents), x)
    finally:
        torch.set_num_threads(threads)

    dense = implicit_gradient_dense(x.detach(), fit, *cotangents)
    torch.testing.assert_close(implicit, dense, rtol=1e-7, atol=1e-9)


def test_unrolled_batch_gradients_match_single_sets():
    # The sets converge after different numbers of iterations, so the batch drops them from
    # the running set one by one and the unrolled graph goes through those updates.
    x = clustered_sets(3, 12, 3, 2, noise=0.8, normalize=False, seed=31)
    queries = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    points = x.clone().requires_grad_(True)
    fit = fit_diagonal_gmm(points, 2, backward="unrolled", **TIGHT)
    assert len(set(fit.n_iter.tolist())) == 3
    (batch_grad,) = torch.autograd.grad(mixture_log_prob(fit, queries).sum(), points)

    for index in range(3):
        single_points = x[index : index + 1].clone().requires_grad_(True)
        single = fit_diagonal_gmm(single_points, 2, backward="unrolled", **TIGHT)
        (grad,) = torch.autograd.grad(mixture_log_prob(single, queries[index : index + 1]).sum(), single_points)
        assert single.n_iter[0] == fit.n_iter[index]
        torch.testing.assert_close(batch_grad[index], grad[0], rtol=1e-9, atol=1e-12)
