import numpy as np
import pytest
import torch

from s2m.mixture import fit_diagonal_gmm, mixture_log_prob
from s2m.set_models import Set2ModelScorer, SetModelSpec, gallery_log_likelihood, pad_sets, score_queries


def _unit_rows(rng, n, dim):
    rows = rng.normal(size=(n, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_gallery_log_likelihood_matches_mixture_log_prob():
    rng = np.random.default_rng(0)
    sets = torch.as_tensor(_unit_rows(rng, 3 * 12, 5).reshape(3, 12, 5))
    gallery = torch.as_tensor(_unit_rows(rng, 20, 5))
    fit = fit_diagonal_gmm(sets, 2, seed=0)

    expected = mixture_log_prob(fit, gallery.expand(3, 20, 5))
    np.testing.assert_allclose(gallery_log_likelihood(fit, gallery), expected, rtol=1e-9, atol=1e-9)


def test_mean_set_model_is_minus_distance():
    sets = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    queries = torch.tensor([[[1.0, 0.0], [1.0, 3.0]]])
    scores = score_queries(SetModelSpec("mean"), sets, queries)
    assert scores.tolist() == [[0.0, -3.0]]


@pytest.mark.parametrize("kind, components", [("mean", 1), ("gaussian", 1), ("gmm", 2)])
def test_scorer_batch_matches_single_sets(kind, components):
    rng = np.random.default_rng(1)
    sets = [_unit_rows(rng, size, 4).astype(np.float32) for size in (6, 9, 7)]
    gallery = _unit_rows(rng, 30, 4).astype(np.float32)
    scorer = Set2ModelScorer(SetModelSpec(kind, components), chunk_size=2)

    batched = scorer.fit_score_batch(sets, gallery)
    single = np.stack([scorer.fit(s).score(gallery) for s in sets])

    # In float32, EM stops at a tolerance, so a set fitted in another batch can stop
    # a few iterations apart. The scores then agree to about 1e-3.
    assert batched.shape == (3, 30)
    np.testing.assert_allclose(batched, single, rtol=5e-3, atol=5e-3)


def test_pad_sets_mask():
    padded, mask = pad_sets([np.ones((2, 3)), np.ones((4, 3))], "cpu")
    assert padded.shape == (2, 4, 3)
    assert mask.sum(dim=1).tolist() == [2, 4]
    assert padded[0, 2:].abs().sum() == 0


def test_unknown_set_model_rejected():
    with pytest.raises(ValueError, match="'svm'"):
        SetModelSpec("svm")
