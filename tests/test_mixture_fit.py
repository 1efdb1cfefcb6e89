"""Forward fits of the set-to-model layer against closed forms, scikit-learn and each other."""

import logging
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.mixture import GaussianMixture

from s2m.mixture import (
    ConvergenceWarning,
    VariancePrior,
    fit_diagonal_gaussian,
    fit_diagonal_gmm,
    mixture_log_prob,
)
from s2m.mixture import em
from s2m.mixture.em import e_step, initial_parameters, point_features
from s2m.mixture.prior import resolve_penalty
from s2m.mixture.synthetic import clustered_sets

# A nearly flat prior, so that the objective is the plain log-likelihood up to about 1e-10
# relative, and scikit-learn's reg_covar of the same size matches it.
FLAT_PRIOR = dict(variance_prior=VariancePrior(variance=1.0, pseudo_count=1e-10), mean_prior_count=0.0, weight_prior_count=0.0)
FLAT_REG_COVAR = 1e-10


def test_gaussian_fit_matches_closed_form():
    x = clustered_sets(3, 9, 5, 2, seed=3)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    prior = VariancePrior(variance=0.02, pseudo_count=2.0)

    fit = fit_diagonal_gaussian(x, mask, variance_prior=prior, mean_prior_count=0.5)

    for index in range(3):
        points = x[index][mask[index]].numpy()
        n = len(points)
        mean = points.sum(axis=0) / (n + 0.5)
        variance = (((points - mean) ** 2).sum(axis=0) + 0.5 * mean**2 + 2.0 * 0.02) / (n + 2.0)
        np.testing.assert_allclose(fit.means[index, 0].numpy(), mean, rtol=1e-12)
        np.testing.assert_allclose(fit.variances[index, 0].numpy(), variance, rtol=1e-12)
    assert torch.equal(fit.weights, torch.ones(3, 1, dtype=torch.float64))
    assert bool(fit.converged.all())


def test_gaussian_lower_bound_is_objective_per_member():
    x = clustered_sets(2, 7, 4, 1, seed=4)
    prior = VariancePrior(variance=0.05, pseudo_count=1.5)
    fit = fit_diagonal_gaussian(x, variance_prior=prior, mean_prior_count=0.2)

    normal = torch.distributions.Normal(fit.means, fit.variances.sqrt())
    log_likelihood = normal.log_prob(x).sum(dim=-1).sum(dim=-1)
    log_variances = fit.variances.log()
    prior_term = -0.75 * (log_variances + 0.05 / fit.variances).sum(dim=(-2, -1))
    prior_term = prior_term - 0.1 * (fit.means.square() / fit.variances).sum(dim=(-2, -1))
    expected = (log_likelihood + prior_term) / 7

    torch.testing.assert_close(fit.lower_bound, expected, rtol=1e-12, atol=0)


def test_one_component_em_matches_closed_form():
    x = clustered_sets(4, 11, 6, 3, seed=5)
    mask = torch.ones(4, 11, dtype=torch.bool)
    mask[2, 4:] = False

    closed = fit_diagonal_gaussian(x, mask)
    em = fit_diagonal_gmm(x, 1, mask)

    torch.testing.assert_close(em.means, closed.means, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(em.variances, closed.variances, rtol=1e-12, atol=0)
    torch.testing.assert_close(em.lower_bound, closed.lower_bound, rtol=1e-12, atol=0)
    assert bool(em.converged.all())


@pytest.mark.parametrize("n_components", [2, 3])
def test_fit_matches_sklearn_from_same_init(n_components):
    x = clustered_sets(3, 30, 4, n_components, noise=0.6, normalize=False, seed=6)
    member = torch.ones(3, 30, dtype=torch.float64)
    penalty = resolve_penalty(4, **FLAT_PRIOR)
    weights0, means0, variances0 = initial_parameters(x, member, n_components, 0, penalty)

    fit = fit_diagonal_gmm(x, n_components, max_iter=500, tol=1e-10, init=(weights0, means0, variances0), **FLAT_PRIOR)
    log_likelihood = mixture_log_prob(fit, x).mean(dim=-1)

    for index in range(3):
        options = dict(
            covariance_type="diag",
            tol=1e-10,
            reg_covar=FLAT_REG_COVAR,
            weights_init=weights0[index].numpy(),
            means_init=means0[index].numpy(),
            precisions_init=1.0 / variances0[index].numpy(),
        )
        reference = GaussianMixture(n_components, max_iter=500, **options).fit(x[index].numpy())
        assert fit.n_iter[index].item() == reference.n_iter_
        np.testing.assert_allclose(log_likelihood[index].item(), reference.score(x[index].numpy()), rtol=1e-9)

        # scikit-learn returns one M-step after its convergence test and we return the
        # parameters the test passed at, so the same parameters are its fit with one
        # iteration fewer.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SklearnConvergenceWarning)
            previous = GaussianMixture(n_components, max_iter=reference.n_iter_ - 1, **options).fit(x[index].numpy())
        np.testing.assert_allclose(fit.weights[index].numpy(), previous.weights_, rtol=1e-7)
        np.testing.assert_allclose(fit.means[index].numpy(), previous.means_, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(fit.variances[index].numpy(), previous.covariances_, rtol=1e-7)


def test_padded_batch_matches_single_sets():
    sizes = [5, 12, 8]
    x = clustered_sets(3, 12, 5, 2, noise=0.6, seed=7)
    mask = torch.arange(12).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)
    padded = torch.where(mask.unsqueeze(-1), x, torch.tensor(float("nan"), dtype=torch.float64))

    batched = fit_diagonal_gmm(padded, 2, mask, tol=1e-12, max_iter=1000)

    for index, size in enumerate(sizes):
        single = fit_diagonal_gmm(x[index : index + 1, :size], 2, tol=1e-12, max_iter=1000)
        torch.testing.assert_close(batched.weights[index], single.weights[0], rtol=1e-10, atol=0)
        torch.testing.assert_close(batched.means[index], single.means[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(batched.variances[index], single.variances[0], rtol=1e-10, atol=0)
        torch.testing.assert_close(batched.lower_bound[index], single.lower_bound[0], rtol=1e-10, atol=0)
        assert batched.n_iter[index] == single.n_iter[0]


def test_chunked_regathered_batch_matches_single_sets(monkeypatch):
    x = clustered_sets(24, 20, 4, 3, noise=0.7, seed=11)
    monkeypatch.setattr(em, "CHUNK_BYTES", 10 * x[0].numel() * 2 * x.element_size())

    chunk_sizes, regathers = [], []
    run_em, select_sets = em.run_em, em.PointFeatures.__getitem__

    def counting_run_em(features, member, *args):
        chunk_sizes.append(member.shape[0])
        return run_em(features, member, *args)

    def counting_select_sets(self, index):
        regathers.append(index)
        return select_sets(self, index)

    monkeypatch.setattr(em, "run_em", counting_run_em)
    monkeypatch.setattr(em.PointFeatures, "__getitem__", counting_select_sets)
    batched = fit_diagonal_gmm(x, 3, tol=1e-10, max_iter=500)
    monkeypatch.undo()

    # The sets stop at many different iterations, so each chunk gathers its running sets again.
    assert chunk_sizes == [10, 10, 4]
    assert len(set(batched.n_iter.tolist())) >= 10
    assert len(regathers) >= 3
    for index in range(x.shape[0]):
        single = fit_diagonal_gmm(x[index : index + 1], 3, tol=1e-10, max_iter=500)
        torch.testing.assert_close(batched.means[index], single.means[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(batched.variances[index], single.variances[0], rtol=1e-10, atol=0)
        assert batched.n_iter[index] == single.n_iter[0]


def test_same_seed_gives_identical_fit():
    x = clustered_sets(4, 20, 8, 3, noise=0.7, seed=8, dtype=torch.float32)

    first = fit_diagonal_gmm(x, 3, seed=123)
    second = fit_diagonal_gmm(x, 3, seed=123)

    for name in ("weights", "means", "variances", "converged", "n_iter", "lower_bound"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_seed_changes_kmeans_plusplus_init():
    x = clustered_sets(8, 20, 8, 3, noise=0.7, seed=8)
    member = torch.ones(8, 20, dtype=torch.float64)
    penalty = resolve_penalty(8, VariancePrior(), 0.01, 0.1)

    _, means_a, _ = initial_parameters(x, member, 3, 1, penalty)
    _, means_b, _ = initial_parameters(x, member, 3, 2, penalty)

    assert not torch.equal(means_a, means_b)


def test_fit_float32_matches_float64():
    x = clustered_sets(6, 15, 64, 3, noise=0.5, seed=9)

    fit64 = fit_diagonal_gmm(x, 3)
    fit32 = fit_diagonal_gmm(x.float(), 3)

    assert torch.equal(fit32.n_iter, fit64.n_iter)
    torch.testing.assert_close(fit32.weights.double(), fit64.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fit32.means.double(), fit64.means, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fit32.variances.double(), fit64.variances, rtol=1e-4, atol=0)
    torch.testing.assert_close(fit32.lower_bound.double(), fit64.lower_bound, rtol=1e-5, atol=0)


def test_float32_fit_leaves_slow_plateau():
    # From this start EM sits near a saddle, where the objective grows by about 1e-4 per
    # member and iteration before it speeds up. A float32 sum of the 50 log-likelihoods
    # (about 460 nats each) cannot resolve that growth, so EM with such a sum stops there.
    x = clustered_sets(256, 50, 256, 3, noise=0.5, seed=0)[250:251]
    member = torch.ones(1, 50, dtype=torch.float64)
    start = initial_parameters(x, member, 2, 0, resolve_penalty(256, **FLAT_PRIOR))

    fits = {}
    for dtype in (torch.float32, torch.float64):
        init = tuple(tensor.to(dtype) for tensor in start)
        fits[dtype] = fit_diagonal_gmm(x.to(dtype), 2, init=init, **FLAT_PRIOR)

    assert fits[torch.float64].n_iter.item() > 5
    torch.testing.assert_close(fits[torch.float32].weights.double(), fits[torch.float64].weights, rtol=1e-4, atol=0)
    torch.testing.assert_close(fits[torch.float32].lower_bound.double(), fits[torch.float64].lower_bound, rtol=1e-6, atol=0)


def test_em_objective_summed_in_float64():
    x = clustered_sets(2, 10, 8, 2, seed=10, dtype=torch.float32)
    member = torch.ones(2, 10)
    penalty = resolve_penalty(8, VariancePrior(), 0.01, 0.1)
    features = point_features(x)
    parameters = initial_parameters(x, member, 2, 0, penalty, features)

    _, objective = e_step(features, member, *parameters, penalty)
    _, reference = e_step(point_features(x.double()), member.double(), *(tensor.double() for tensor in parameters), penalty)
    fit = fit_diagonal_gmm(x, 2)

    assert objective.dtype == torch.float64
    assert fit.lower_bound.dtype == torch.float32
    torch.testing.assert_close(objective, reference, rtol=1e-6, atol=0)


def test_mixture_log_prob_matches_torch_distributions():
    x = clustered_sets(2, 12, 3, 2, noise=0.7, normalize=False, seed=10)
    queries = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(257), dtype=torch.float64)
    fit = fit_diagonal_gmm(x, 2)

    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=fit.weights.unsqueeze(1)),
        torch.distributions.Independent(
            torch.distributions.Normal(fit.means.unsqueeze(1), fit.variances.sqrt().unsqueeze(1)), 1
        ),
    )
    expected = mixture.log_prob(queries)

    torch.testing.assert_close(mixture_log_prob(fit, queries), expected, rtol=1e-12, atol=1e-12)


def test_mixture_log_prob_zeroes_padded_queries():
    x = clustered_sets(2, 12, 3, 2, seed=11)
    fit = fit_diagonal_gmm(x, 2)
    queries = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(274), dtype=torch.float64, requires_grad=True)
    query_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])

    log_prob = mixture_log_prob(fit, queries, query_mask)
    log_prob.sum().backward()

    assert torch.equal(log_prob[0, 2:], torch.zeros(2, dtype=torch.float64))
    assert bool((log_prob[0, :2] != 0).all())
    assert torch.equal(queries.grad[0, 2:], torch.zeros(2, 3, dtype=torch.float64))


def test_nonconvergence_warns_and_logs(caplog):
    x = clustered_sets(3, 20, 3, 3, noise=0.9, normalize=False, seed=12)

    with caplog.at_level(logging.WARNING, logger="s2m.mixture.fit"):
        with pytest.warns(ConvergenceWarning, match=r"did not converge for 3 of 3 sets"):
            fit = fit_diagonal_gmm(x, 3, max_iter=1)

    assert not bool(fit.converged.any())
    assert torch.equal(fit.n_iter, torch.ones(3, dtype=torch.int64))
    assert any("did not converge for 3 of 3 sets" in record.getMessage() for record in caplog.records)


def test_em_objective_never_decreases():
    x = clustered_sets(4, 25, 3, 3, noise=0.9, normalize=False, seed=13)
    bounds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for max_iter in range(1, 12):
            bounds.append(fit_diagonal_gmm(x, 3, max_iter=max_iter, tol=0.0).lower_bound)

    steps = torch.stack(bounds).diff(dim=0)
    assert bool((steps >= -1e-12).all()), steps.min()
    assert bool((steps.sum(dim=0) > 0).all())
