"""Degenerate sets and invalid arguments of the set-to-model layer."""

import warnings

import numpy as np
import pytest
import torch

from s2m.mixture import (
    GaussianMixtureFit,
    VariancePrior,
    fit_diagonal_gaussian,
    fit_diagonal_gmm,
    implicit_gradient_dense,
    mixture_log_prob,
)
from s2m.mixture import em
from s2m.mixture.em import expansion_error
from s2m.mixture.implicit import failure_remedy
from s2m.mixture.prior import resolve_penalty
from s2m.mixture.synthetic import clustered_sets

PRIOR = VariancePrior(variance=0.01, pseudo_count=1.0)


def layer_loss(fit, queries):
    """Return a scalar loss that uses every parameter of the fit."""
    return mixture_log_prob(fit, queries).sum() + fit.variances.sum() + fit.weights[:, 0].sum()


def loss_and_gradient(points, fit, queries):
    """Return the loss and its gradient with respect to the points, through the layer."""
    loss = layer_loss(fit, queries)
    (gradient,) = torch.autograd.grad(loss, points)
    return loss, gradient


def dense_gradient(points, fit, queries, mask=None, **prior):
    """Return the gradient of the same loss through the dense-reference implicit backward."""
    leaves = [tensor.detach().requires_grad_(True) for tensor in (fit.weights, fit.means, fit.variances)]
    detached = GaussianMixtureFit(*leaves, fit.converged, fit.n_iter, fit.lower_bound.detach())
    cotangents = torch.autograd.grad(layer_loss(detached, queries), leaves)
    return implicit_gradient_dense(points, fit, *cotangents, mask, **prior)


def test_set_smaller_than_components_raises():
    x = clustered_sets(3, 5, 4, 2, seed=30)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 1:] = False
    mask[2, 2:] = False

    with pytest.raises(ValueError, match=r"n_components=3 members, but sets \[1, 2\] have \[1, 2\] members"):
        fit_diagonal_gmm(x, 3, mask)


def test_empty_set_raises_for_gaussian():
    x = clustered_sets(2, 4, 3, 1, seed=31)
    mask = torch.tensor([[True] * 4, [False] * 4])

    with pytest.raises(ValueError, match=r"sets \[1\] have \[0\] members. Drop those sets") as error:
        fit_diagonal_gaussian(x, mask)
    assert "fit_diagonal_gaussian" not in str(error.value)
    assert "Every set needs at least 1 member," in str(error.value)
    assert "n_components" not in str(error.value)


def test_duplicated_points_fit_and_gradient():
    x = clustered_sets(2, 6, 3, 2, noise=0.6, normalize=False, seed=32)
    doubled = torch.cat([x, x], dim=1).requires_grad_(True)
    queries = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(161), dtype=torch.float64)

    fit = fit_diagonal_gmm(doubled, 2, tol=0.0, max_iter=5000, variance_prior=PRIOR)
    _, gradient = loss_and_gradient(doubled, fit, queries)

    assert bool(fit.converged.all())
    assert bool((fit.variances > 0).all())
    assert bool(torch.isfinite(gradient).all())
    # Both copies of a point get the same gradient, since the objective is symmetric in them.
    torch.testing.assert_close(gradient[:, :6], gradient[:, 6:], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gradient, dense_gradient(doubled.detach(), fit, queries, variance_prior=PRIOR), rtol=1e-6, atol=1e-8)


def test_identical_points_keep_second_component_on_prior():
    point = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)
    x = point.expand(1, 7, 3).clone().requires_grad_(True)
    queries = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(177), dtype=torch.float64)

    fit = fit_diagonal_gmm(x, 2, variance_prior=PRIOR, mean_prior_count=0.01, weight_prior_count=0.1)
    _, gradient = loss_and_gradient(x, fit, queries)

    # k-means++ repeats the point as the second seed, and the tie goes to component 0, which
    # takes every member. Component 1 is then held by the priors alone.
    torch.testing.assert_close(fit.means[0, 0], 7 * point / 7.01, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(fit.weights[0, 1], torch.tensor(0.1 / 7.2, dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(fit.variances[0, 1], torch.full((3,), 0.01, dtype=torch.float64), rtol=1e-9, atol=0)
    assert bool((fit.variances[0, 0] > 0).all())
    assert bool(torch.isfinite(gradient).all())
    torch.testing.assert_close(gradient, dense_gradient(x.detach(), fit, queries, variance_prior=PRIOR), rtol=1e-6, atol=1e-8)


def test_constant_dimension_gets_prior_variance():
    x = clustered_sets(2, 8, 4, 1, normalize=False, seed=33)
    x[:, :, 2] = 0.3
    prior = VariancePrior(variance=0.02, pseudo_count=2.0)

    fit = fit_diagonal_gaussian(x, variance_prior=prior, mean_prior_count=0.5)

    mean = 8 * 0.3 / 8.5
    expected = (8 * (0.3 - mean) ** 2 + 0.5 * mean**2 + 2.0 * 0.02) / 10.0
    torch.testing.assert_close(fit.variances[:, 0, 2], torch.full((2,), expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_constant_dimension_mixture_gradient_is_finite():
    x = clustered_sets(2, 10, 3, 2, noise=0.6, normalize=False, seed=34)
    x[:, :, 1] = -0.4
    x.requires_grad_(True)
    queries = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(208), dtype=torch.float64)

    fit = fit_diagonal_gmm(x, 2, tol=0.0, max_iter=5000, variance_prior=PRIOR)
    _, gradient = loss_and_gradient(x, fit, queries)

    assert bool((fit.variances[:, :, 1] >= PRIOR.variance / 11).all())
    assert bool(torch.isfinite(gradient).all())
    torch.testing.assert_close(gradient, dense_gradient(x.detach(), fit, queries, variance_prior=PRIOR), rtol=1e-6, atol=1e-8)


def collapsing_start(x, far=50.0):
    """Return initial parameters whose component 1 sits far from every point, so it gets no responsibility."""
    batch_size, _, dim = x.shape
    weights = torch.full((batch_size, 2), 0.5, dtype=x.dtype)
    means = torch.stack([x.mean(dim=1), torch.full((batch_size, dim), far, dtype=x.dtype)], dim=1)
    variances = torch.full((batch_size, 2, dim), 0.05, dtype=x.dtype)
    return weights, means, variances


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_collapsed_component_is_kept_by_prior(backward):
    # The points sit far from the origin, where the collapsed component settles.
    x = (clustered_sets(2, 9, 3, 1, normalize=False, seed=35) + 3.0).requires_grad_(True)
    queries = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(231), dtype=torch.float64) + 3.0

    fit = fit_diagonal_gmm(x, 2, init=collapsing_start(x.detach()), backward=backward, variance_prior=PRIOR)
    _, gradient = loss_and_gradient(x, fit, queries)

    torch.testing.assert_close(fit.weights[:, 1], torch.full((2,), 0.1 / 9.2, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(fit.means[:, 1], torch.zeros(2, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(fit.variances[:, 1], torch.full((2, 3), 0.01, dtype=torch.float64), rtol=1e-12, atol=0)
    assert bool(torch.isfinite(gradient).all())
    torch.testing.assert_close(gradient, dense_gradient(x.detach(), fit, queries, variance_prior=PRIOR), rtol=1e-7, atol=1e-9)


def test_collapse_without_priors_zeroes_gradient():
    x = clustered_sets(2, 9, 3, 1, normalize=False, seed=36).requires_grad_(True)
    start = collapsing_start(x.detach())
    start[1][0, 1] = x[0].detach().mean(dim=0) + 0.1
    queries = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(247), dtype=torch.float64)

    fit = fit_diagonal_gmm(x, 2, init=start, variance_prior=PRIOR, mean_prior_count=0.0, weight_prior_count=0.0)
    with pytest.warns(RuntimeWarning, match=r"implicit gradient of 1 of 2 sets \[1\] is not finite") as record:
        _, gradient = loss_and_gradient(x, fit, queries)
    message = str(record[0].message)
    assert "Raise mean_prior_count and weight_prior_count above 0" in message
    assert "unrolled" not in message

    assert fit.weights[1, 1].item() == 0.0
    assert torch.equal(gradient[1], torch.zeros(9, 3, dtype=torch.float64))
    assert bool(torch.isfinite(gradient[0]).all())
    assert bool((gradient[0] != 0).any())


def test_failure_remedy_depends_on_priors():
    positive = resolve_penalty(3, PRIOR, 0.01, 0.1)
    zero_weight = resolve_penalty(3, PRIOR, 0.01, 0.0)

    assert "backward='unrolled'" in failure_remedy(positive)
    assert "backward='implicit'" in failure_remedy(positive, "unrolled")
    assert "Raise mean_prior_count and weight_prior_count" in failure_remedy(zero_weight)
    assert "Raise mean_prior_count and weight_prior_count" in failure_remedy(zero_weight, "unrolled")


def test_unrolled_empty_component_zeroes_gradient():
    # Five copies of one point and one other point: with K = 3 one component ends with no
    # points, and without a weight prior its weight is exactly 0.
    duplicates = torch.tensor([[0.1, 0.2, 0.3]] * 5 + [[0.5, -0.2, 0.1]], dtype=torch.float64)
    x = torch.stack([duplicates, clustered_sets(1, 6, 3, 3, seed=47)[0]]).requires_grad_(True)
    queries = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(48), dtype=torch.float64)
    options = dict(backward="unrolled", weight_prior_count=0.0)

    fit = fit_diagonal_gmm(x, 3, **options)
    with pytest.warns(RuntimeWarning, match=r"unrolled gradient of 1 of 2 sets \[0\] is not finite") as record:
        _, gradient = loss_and_gradient(x, fit, queries)
    alone = x[1:].detach().clone().requires_grad_(True)
    _, gradient_alone = loss_and_gradient(alone, fit_diagonal_gmm(alone, 3, **options), queries[1:])

    assert fit.weights[0].min().item() == 0.0
    assert "Raise mean_prior_count and weight_prior_count above 0" in str(record[0].message)
    assert torch.equal(gradient[0], torch.zeros(6, 3, dtype=torch.float64))
    torch.testing.assert_close(gradient[1], gradient_alone[0], rtol=1e-12, atol=1e-14)


NEAR_FLAT = dict(variance_prior=VariancePrior(variance=1.0, pseudo_count=1e-10), mean_prior_count=0.0, weight_prior_count=0.0)


def outlier_sets(dtype):
    """Return two normalised sets of 12 points in 64 dimensions whose last point is far from the others."""
    x = clustered_sets(2, 12, 64, 1, noise=0.3, seed=40)
    x[:, -1] = torch.nn.functional.normalize(torch.randn(2, 64, generator=torch.Generator().manual_seed(41), dtype=torch.float64), dim=-1)
    return x.to(dtype)


def outlier_start(x):
    """Return initial parameters with component 0 on the first 11 points and component 1 on the outlier."""
    weights = torch.tensor([[11 / 12, 1 / 12]] * 2, dtype=x.dtype)
    means = torch.stack([x[:, :-1].mean(dim=1), x[:, -1]], dim=1)
    variances = torch.stack([x[:, :-1].var(dim=1), torch.full_like(x[:, -1], 1e-3)], dim=1)
    return weights, means, variances


def test_single_point_component_in_float32():
    # With a nearly flat prior the outlier's component collapses to a variance of 1e-10. The
    # expanded quadratic form would then lose about 1e3 nats in float32.
    fits, log_likelihoods = {}, {}
    for dtype in (torch.float32, torch.float64):
        x = outlier_sets(dtype)
        fits[dtype] = fit_diagonal_gmm(x, 2, init=outlier_start(x), **NEAR_FLAT)
        log_likelihoods[dtype] = mixture_log_prob(fits[dtype], x)
    fit32, fit64 = fits[torch.float32], fits[torch.float64]

    scaled_mean_squares = (fit32.means.square() / fit32.variances).sum(dim=-1)
    assert bool((expansion_error(scaled_mean_squares)[:, 1] > 100.0).all())
    torch.testing.assert_close(fit64.variances[:, 1], torch.full((2, 64), 1e-10, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(fit32.variances[:, 1].double(), fit64.variances[:, 1], rtol=1e-3, atol=0)
    torch.testing.assert_close(fit32.lower_bound.double(), fit64.lower_bound, rtol=1e-5, atol=0)
    torch.testing.assert_close(log_likelihoods[torch.float32].double(), log_likelihoods[torch.float64], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_explicit_differences_match_expansion(monkeypatch, backward):
    # A negative limit sends every component through the explicit-difference code of the
    # E-step and the M-step. In float64 the expansion is accurate, so both must agree.
    x = clustered_sets(3, 14, 5, 2, noise=0.8, normalize=False, seed=42)
    queries = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(43), dtype=torch.float64)
    results = []
    for limit in (em.EXPANSION_ERROR_LIMIT, -1.0):
        monkeypatch.setattr(em, "EXPANSION_ERROR_LIMIT", limit)
        points = x.clone().requires_grad_(True)
        fit = fit_diagonal_gmm(points, 2, backward=backward, tol=1e-12, max_iter=500)
        loss = layer_loss(fit, queries) + fit.lower_bound.sum()
        results.append((fit, torch.autograd.grad(loss, points)[0]))

    (expanded, expanded_gradient), (explicit, explicit_gradient) = results
    assert torch.equal(expanded.n_iter, explicit.n_iter)
    for name in ("weights", "means", "variances", "lower_bound"):
        torch.testing.assert_close(getattr(explicit, name), getattr(expanded, name), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(explicit_gradient, expanded_gradient, rtol=1e-8, atol=1e-10)


def test_explicit_differences_on_some_sets():
    # Only sets 1 and 3 of 4 have selected components, as when a few sets of a batch have a
    # collapsed one. The float64 expansion is accurate, so the explicit values must match it.
    x = clustered_sets(4, 10, 6, 3, noise=0.6, normalize=False, seed=44)
    member = torch.ones(4, 10, dtype=torch.float64)
    penalty = resolve_penalty(6, PRIOR, 0.01, 0.1)
    features = em.point_features(x)
    weights, means, variances = em.initial_parameters(x, member, 3, 0, penalty)
    selected = torch.zeros(4, 3, dtype=torch.bool)
    selected[1, 2] = selected[3, 0] = selected[3, 1] = True

    components = em.ExpandedComponents.from_parameters(means, variances)
    log_weights = torch.log(weights)
    joint = components.log_joint(features, log_weights)
    replaced = components.replace_with_explicit(joint, x, log_weights, selected)
    torch.testing.assert_close(replaced, joint, rtol=1e-12, atol=1e-10)
    assert torch.equal(replaced[[0, 2]], joint[[0, 2]])

    responsibilities, _ = em.e_step(features, member, weights, means, variances, penalty)
    _, new_means, new_variances = em.m_step(features, member, responsibilities, penalty)
    counts = responsibilities.sum(dim=1)
    explicit = em.explicit_variances(x, responsibilities, counts, new_means, new_variances, selected, penalty)
    torch.testing.assert_close(explicit, new_variances, rtol=1e-10, atol=1e-14)
    assert torch.equal(explicit[~selected], new_variances[~selected])


def test_float32_descriptors_stay_finite():
    for dim, n_components in ((64, 4), (256, 2), (1280, 4)):
        x = clustered_sets(4, 12, dim, 3, noise=0.7, seed=37, dtype=torch.float32).requires_grad_(True)
        queries = clustered_sets(4, 6, dim, 3, noise=0.7, seed=38, dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fit = fit_diagonal_gmm(x, n_components)
            _, gradient = loss_and_gradient(x, fit, queries)
        assert bool(torch.isfinite(gradient).all()), (dim, n_components)
        assert bool((fit.variances > 0).all()), (dim, n_components)


def test_nan_padding_is_ignored_and_nan_member_rejected():
    x = clustered_sets(2, 6, 3, 2, seed=39)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    x[0, 4:] = float("nan")

    fit = fit_diagonal_gmm(x, 2, mask)
    assert bool(torch.isfinite(fit.means).all())

    x[1, 2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or infinite values in sets \[1\] \(first in set 1, row 2\)"):
        fit_diagonal_gmm(x, 2, mask)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(n_components=0), r"n_components must be an int >= 1, got 0"),
        (dict(max_iter=0), r"max_iter must be an int >= 1, got 0"),
        (dict(tol=-1.0), r"tol must be a number >= 0, got -1.0"),
        (dict(backward="adjoint"), r"backward must be one of .*'implicit'.*got 'adjoint'"),
        (dict(init="random"), r"init must be 'kmeans\+\+' or a \(weights, means, variances\) tuple or list of tensors, got the string 'random'"),
        (dict(mean_prior_count=-0.5), r"mean_prior_count must be a finite number >= 0, got -0.5"),
        (dict(weight_prior_count=float("nan")), r"weight_prior_count must be a finite number >= 0, got nan"),
        (dict(mean_prior_count=None), r"mean_prior_count must be a finite number >= 0, got None"),
        (dict(tol=True), r"tol must be a number >= 0, got True"),
        (dict(n_components=2.0), r"n_components must be an int >= 1, got 2.0"),
        (dict(seed=2**70), r"seed must be an int from 0 to 2\*\*64 - 1, got 1180591620717411303424"),
        (dict(seed=-1), r"seed must be an int from 0 to 2\*\*64 - 1, got -1"),
    ],
)
def test_invalid_options_raise(arguments, message):
    x = clustered_sets(2, 6, 3, 2, seed=40)
    options = dict(n_components=2) | arguments
    n_components = options.pop("n_components")

    with pytest.raises(ValueError, match=message):
        fit_diagonal_gmm(x, n_components, **options)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(variance=-1.0), r"variance_prior.variance must be .* got -1.0"),
        (dict(variance="a"), r"variance_prior.variance must be .* got 'a'"),
        (dict(variance=float("inf")), r"variance_prior.variance must be .* got inf"),
        (dict(pseudo_count=0.0), r"variance_prior.pseudo_count must be .* got 0.0"),
        (dict(pseudo_count=float("nan")), r"variance_prior.pseudo_count must be .* got nan"),
    ],
)
def test_invalid_variance_prior_raises_at_creation(fields, message):
    with pytest.raises(ValueError, match=message):
        VariancePrior(**fields)


def test_variance_prior_object_required():
    x = clustered_sets(2, 6, 3, 2, seed=40)

    with pytest.raises(ValueError, match=r"variance_prior must be a VariancePrior, got dict"):
        fit_diagonal_gmm(x, 2, variance_prior={"variance": 1.0})


@pytest.mark.parametrize(
    ("x", "mask", "message"),
    [
        (torch.zeros(6, 3), None, r"x must have shape \(B, N, D\), got shape \(6, 3\)"),
        (torch.zeros(2, 6, 3, dtype=torch.int64), None, r"x must be float32 or float64, got torch.int64"),
        (torch.zeros(2, 6, 3), torch.ones(2, 5, dtype=torch.bool), r"mask must have shape \(2, 6\)"),
        (torch.zeros(2, 6, 3), torch.ones(2, 6), r"mask must be a bool tensor .* got torch.float32; convert it"),
        (torch.zeros(2, 6, 3), np.ones((2, 6), dtype=bool), r"got ndarray; convert it with torch.as_tensor"),
    ],
)
def test_invalid_points_raise(x, mask, message):
    with pytest.raises(ValueError, match=message):
        fit_diagonal_gmm(x, 2, mask)


def test_invalid_init_tuple_raises():
    x = clustered_sets(2, 6, 3, 2, seed=41)
    weights, means, variances = collapsing_start(x)

    with pytest.raises(ValueError, match=r"init means must have shape \(2, 2, 3\), got \(2, 2, 2\)"):
        fit_diagonal_gmm(x, 2, init=(weights, means[:, :, :2], variances))
    with pytest.raises(ValueError, match=r"init means must be a torch.Tensor of shape \(2, 2, 3\), got ndarray"):
        fit_diagonal_gmm(x, 2, init=(weights, means.numpy(), variances))
    with pytest.raises(ValueError, match=r"init means is torch.float32 on cpu, but x is torch.float64 on cpu"):
        fit_diagonal_gmm(x, 2, init=(weights, means.float(), variances))
    with pytest.raises(ValueError, match=r"tuple or list of tensors, got a tuple of 2 items"):
        fit_diagonal_gmm(x, 2, init=(weights, means))
    with pytest.raises(ValueError, match=r"init variances must be positive, got -\d"):
        fit_diagonal_gmm(x, 2, init=(weights, means, -variances))
    with pytest.raises(ValueError, match=r"init variances must be at least the smallest normal torch.float64 number"):
        fit_diagonal_gmm(x, 2, init=(weights, means, variances * 1e-310))
    tiny_variances = variances.clone()
    tiny_variances[0, 1, 2] = 1e-320
    with pytest.raises(ValueError, match=r"got 1e-320 at set 0, component 1, dimension 2"):
        fit_diagonal_gmm(x, 2, init=(weights, means, tiny_variances))
    one_hot_weights = weights.clone()
    one_hot_weights[1] = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match=r"init weights must be positive, got 0 at set 1, component 0"):
        fit_diagonal_gmm(x, 2, init=(one_hot_weights, means, variances))
    with pytest.raises(ValueError, match=r"init weights must sum to 1 for every set, got 2 for set 0"):
        fit_diagonal_gmm(x, 2, init=(2 * weights, means, variances))

    # A single non-finite entry is detected, whatever its sign.
    for bad in (float("nan"), float("inf"), -float("inf")):
        bad_means, bad_variances = means.clone(), variances.clone()
        bad_means[1, 0, 2] = bad
        bad_variances[0, 1, 1] = bad
        with pytest.raises(ValueError, match=rf"init means must be finite, got {bad} at set 1, component 0, dimension 2"):
            fit_diagonal_gmm(x, 2, init=(weights, bad_means, variances))
        with pytest.raises(ValueError, match=rf"init variances must be finite, got {bad} at set 0, component 1, dimension 1"):
            fit_diagonal_gmm(x, 2, init=(weights, means, bad_variances))


def test_init_requiring_grad_accepted_quietly():
    x = clustered_sets(2, 6, 3, 2, seed=41)
    start = tuple(tensor.clone().requires_grad_(True) for tensor in collapsing_start(x))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_diagonal_gmm(x, 2, init=start, tol=1e-3)

    assert fit.converged.all()


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_init_gets_no_gradient(backward):
    x = clustered_sets(2, 6, 3, 2, seed=41).requires_grad_(True)
    start = tuple(tensor.clone().requires_grad_(True) for tensor in collapsing_start(x.detach()))

    fit = fit_diagonal_gmm(x, 2, init=start, max_iter=3, backward=backward)
    (fit.means.sum() + fit.variances.sum() + fit.weights[:, 0].sum()).backward()

    assert x.grad is not None
    assert all(tensor.grad is None for tensor in start)


def test_init_list_matches_tuple():
    x = clustered_sets(2, 6, 3, 2, seed=41)
    start = collapsing_start(x)

    from_tuple = fit_diagonal_gmm(x, 2, init=tuple(start), tol=1e-3)
    from_list = fit_diagonal_gmm(x, 2, init=list(start), tol=1e-3)

    assert torch.equal(from_list.means, from_tuple.means)
    assert torch.equal(from_list.variances, from_tuple.variances)


def test_overflowing_init_warns_not_finite():
    x = clustered_sets(3, 6, 3, 2, seed=41)
    weights, means, variances = collapsing_start(x)
    means = means.clone()
    means[1] = 1e200

    with pytest.warns(RuntimeWarning, match=r"NaN or infinite objective for 1 of 3 sets \[1\]"):
        fit = fit_diagonal_gmm(x, 2, init=(weights, means, variances))

    assert not torch.isfinite(fit.lower_bound[1])
    assert torch.isfinite(fit.lower_bound[[0, 2]]).all()


def test_numpy_scalar_options_accepted():
    x = clustered_sets(2, 6, 3, 2, seed=45)

    with_numpy = fit_diagonal_gmm(x, np.int64(2), max_iter=np.int32(50), tol=np.float32(1e-6), seed=np.int64(3))
    with_python = fit_diagonal_gmm(x, 2, max_iter=50, tol=float(np.float32(1e-6)), seed=3)

    assert torch.equal(with_numpy.means, with_python.means)
    assert torch.equal(with_numpy.n_iter, with_python.n_iter)


@pytest.mark.parametrize("value", [3e38, 2e19])
def test_overflowing_squares_raise(value):
    x = clustered_sets(1, 4, 3, 2, seed=46, dtype=torch.float32)
    x[0, 2, 1] = value

    with pytest.raises(ValueError, match=r"finite values so large that their squares, summed over a set, overflow"):
        fit_diagonal_gmm(x, 2)


def test_overflowing_set_sum_of_squares_raises():
    # Each square, 6.4e37, and each row's sum, 1.9e38, is finite in float32, but the set's sum is not.
    x = torch.full((1, 6, 3), 8e18)

    with pytest.raises(ValueError, match=r"squares, summed over a set, overflow torch.float32 \(largest magnitude 8e\+18\)"):
        fit_diagonal_gmm(x, 2)


def test_large_padding_passes_overflow_check():
    x = clustered_sets(1, 4, 3, 2, seed=46, dtype=torch.float32)
    x[0, 3] = 2e19
    mask = torch.tensor([[True, True, True, False]])

    fit = fit_diagonal_gmm(x, 2, mask)

    assert bool(torch.isfinite(fit.means).all())
    assert bool(torch.isfinite(fit.variances).all())


def test_mixture_log_prob_rejects_mismatched_queries():
    x = clustered_sets(2, 6, 3, 2, seed=42)
    fit = fit_diagonal_gmm(x, 2)

    with pytest.raises(ValueError, match=r"y must have shape \(B=2, M, D=3\)"):
        mixture_log_prob(fit, torch.zeros(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"y must have shape \(B, M, D\), got shape \(4, 3\).*y.unsqueeze\(0\)"):
        mixture_log_prob(fit, torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"y is torch.float32 on cpu but the fit is torch.float64"):
        mixture_log_prob(fit, torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match=r"fit must be a GaussianMixtureFit.*got Tensor"):
        mixture_log_prob(fit.means, torch.zeros(2, 4, 3, dtype=torch.float64))
