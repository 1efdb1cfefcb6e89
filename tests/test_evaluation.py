"""Tests of average precision, per-problem evaluation and the bootstrap mAP interval."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from baselines import get_baseline
from s2m.evaluation import (
    MAPEstimate,
    average_precision,
    evaluate_problems,
    mean_average_precision,
)


def _brute_force_ap(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Mean over relevant items of the precision among the items ranked at or above them."""
    order = np.argsort(-scores, kind="stable")
    ranked_relevant = relevant[order]
    precisions = []
    hits = 0
    for rank, is_relevant in enumerate(ranked_relevant, start=1):
        if is_relevant:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions)


def _slow_bootstrap(aps: np.ndarray, n_bootstrap: int, confidence: float, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_bootstrap):
        sample = rng.integers(0, len(aps), size=len(aps))
        means.append(sum(aps[i] for i in sample) / len(aps))
    alpha = 1.0 - confidence
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


@pytest.mark.parametrize("seed", range(5))
def test_ap_matches_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal(200)
    relevant = rng.random(200) < 0.2
    relevant[rng.integers(200)] = True

    ap = average_precision(scores, relevant)

    assert ap == pytest.approx(average_precision_score(relevant, scores))
    assert ap == pytest.approx(_brute_force_ap(scores, relevant))


def test_ap_perfect_and_worst_rankings():
    relevant = np.array([True, True, False, False, False])
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])

    assert average_precision(scores, relevant) == pytest.approx(1.0)
    assert average_precision(-scores, relevant) == pytest.approx((1 / 4 + 2 / 5) / 2)


def test_ap_accepts_binary_integers():
    scores = np.array([0.9, 0.1, 0.5])

    assert average_precision(scores, np.array([1, 0, 1])) == average_precision(scores, np.array([True, False, True]))


def test_ap_no_relevant_names_problem():
    with pytest.raises(ValueError, match="No gallery item is relevant for problem 'zebra'"):
        average_precision(np.arange(4.0), np.zeros(4, dtype=bool), problem="zebra")


@pytest.mark.parametrize(
    ("scores", "relevant", "message"),
    [
        (np.arange(3.0), np.array([True, False]), r"same length; got shapes \(3,\) and \(2,\)"),
        (np.array([1.0, np.nan]), np.array([True, False]), "1 of 2 scores are NaN or infinite"),
        (np.arange(3.0), np.array([0.5, 1.0, 0.0]), "boolean array; got dtype float64"),
        (np.arange(3.0), np.array([0, 2, 1]), "boolean array; got dtype int"),
    ],
)
def test_ap_rejects_bad_input(scores, relevant, message):
    with pytest.raises(ValueError, match=message):
        average_precision(scores, relevant)


def _problems(seed: int = 0, n_concepts: int = 5, per_concept: int = 30, n_features: int = 8):
    """Build concept blobs on the unit sphere. The first 5 images of each blob form its set, the rest the gallery."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_concepts, n_features))
    labels = np.repeat(np.arange(n_concepts), per_concept)
    descriptors = centres[labels] + 0.3 * rng.standard_normal((labels.size, n_features))
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)

    positions = np.tile(np.arange(per_concept), n_concepts)
    concept_sets = [np.flatnonzero((labels == c) & (positions < 5)) for c in range(n_concepts)]
    gallery = np.flatnonzero(positions >= 5)
    relevance = labels[gallery][None, :] == np.arange(n_concepts)[:, None]
    concepts = [f"concept_{c}" for c in range(n_concepts)]
    return descriptors, concept_sets, gallery, relevance, concepts


def test_evaluate_problems_columns_and_values():
    descriptors, concept_sets, gallery, relevance, concepts = _problems()
    method = get_baseline("mean_embedding")

    results = evaluate_problems(method, descriptors, concept_sets, gallery, relevance, concepts)

    assert list(results.columns) == ["concept", "average_precision", "n_relevant", "set_size"]
    assert results["concept"].tolist() == concepts
    assert results["n_relevant"].tolist() == [25] * 5
    assert results["set_size"].tolist() == [5] * 5
    for row, concept_set, relevant in zip(results.itertuples(), concept_sets, relevance):
        scores = method.fit(descriptors[concept_set]).score(descriptors[gallery])
        assert row.average_precision == pytest.approx(average_precision_score(relevant, scores))
    assert results["average_precision"].mean() > 0.8


class _BatchedMeanEmbedding:
    """Batched scorer that records its batch sizes. It has no fit/score, so only the batched path can run it."""

    def __init__(self):
        self.batch_sizes = []

    def fit_score_batch(self, concept_sets, gallery):
        self.batch_sizes.append(len(concept_sets))
        return np.stack([get_baseline("mean_embedding").fit(s).score(gallery) for s in concept_sets])


def test_evaluate_problems_batched_path():
    problems = _problems()
    batched = _BatchedMeanEmbedding()

    expected = evaluate_problems(get_baseline("mean_embedding"), *problems)
    results = evaluate_problems(batched, *problems, batch_size=2)

    assert batched.batch_sizes == [2, 2, 1]
    pd.testing.assert_frame_equal(results, expected)


def test_evaluate_problems_batched_bad_shape():
    class Truncating(_BatchedMeanEmbedding):
        def fit_score_batch(self, concept_sets, gallery):
            return super().fit_score_batch(concept_sets, gallery)[:, :-1]

    with pytest.raises(ValueError, match=r"Truncating.fit_score_batch returned shape \(2, 124\)"):
        evaluate_problems(Truncating(), *_problems(), batch_size=2)


class _NanForConcept:
    def __init__(self, bad_index: int):
        self.bad_index = bad_index
        self.calls = 0

    def fit(self, concept_set):
        self.calls += 1
        return self

    def score(self, gallery):
        scores = gallery[:, 0].astype(float)
        if self.calls == self.bad_index + 1:
            scores[3] = np.nan
        return scores


def test_evaluate_problems_non_finite_names_concept():
    with pytest.raises(ValueError, match=r"_NanForConcept returned 1 of 125 scores as NaN or infinite for concept 'concept_2'"):
        evaluate_problems(_NanForConcept(bad_index=2), *_problems())


def test_fit_returning_none_raises():
    class NoReturn(_NanForConcept):
        def fit(self, concept_set):
            self.calls += 1

    with pytest.raises(ValueError, match=r"NoReturn.fit returned None for concept 'concept_0'; end fit with 'return self'"):
        evaluate_problems(NoReturn(bad_index=-1), *_problems())


def test_evaluate_problems_rejects_no_relevant_concept():
    descriptors, concept_sets, gallery, relevance, concepts = _problems()
    relevance[1] = False

    with pytest.raises(ValueError, match=r"concept\(s\) \['concept_1'\]"):
        evaluate_problems(get_baseline("mean_embedding"), descriptors, concept_sets, gallery, relevance, concepts)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.update(concepts=p["concepts"][:-1]), "5 concept sets but 4 concept names"),
        (lambda p: p.update(relevance=p["relevance"][:, :-1]), r"relevance must have shape .* \(5, 125\)"),
        (lambda p: p.update(gallery=p["gallery"] + 100), "outside the 150 rows"),
        (lambda p: p.update(gallery=p["gallery"].astype(float)), "1-D integer array"),
        (lambda p: p["concept_sets"].__setitem__(0, np.array([], dtype=int)), "'concept_0' is empty"),
    ],
)
def test_evaluate_problems_rejects_inconsistent_input(change, message):
    names = ["descriptors", "concept_sets", "gallery", "relevance", "concepts"]
    problems = dict(zip(names, _problems()))
    change(problems)

    with pytest.raises(ValueError, match=message):
        evaluate_problems(get_baseline("mean_embedding"), **problems)


def test_evaluate_problems_wrong_score_shape():
    class Constant:
        def fit(self, concept_set):
            return self

        def score(self, gallery):
            return np.zeros(3)

    with pytest.raises(ValueError, match=r"Constant.score returned shape \(3,\) for concept 'concept_0'"):
        evaluate_problems(Constant(), *_problems())


def test_bootstrap_interval_contains_mean():
    aps = np.random.default_rng(0).beta(5, 2, size=50)

    estimate = mean_average_precision(aps, n_bootstrap=2000)

    assert isinstance(estimate, MAPEstimate)
    assert estimate.mean == pytest.approx(aps.mean())
    assert estimate.low < estimate.mean < estimate.high
    assert estimate.n_concepts == 50


def test_bootstrap_deterministic_with_seed():
    aps = np.random.default_rng(1).random(40)

    first = mean_average_precision(aps, n_bootstrap=1000, seed=7)
    second = mean_average_precision(aps, n_bootstrap=1000, seed=7)
    other_seed = mean_average_precision(aps, n_bootstrap=1000, seed=8)

    assert first == second
    assert (first.low, first.high) != (other_seed.low, other_seed.high)


def test_bootstrap_shrinks_with_more_concepts():
    rng = np.random.default_rng(2)

    few = mean_average_precision(rng.random(20), n_bootstrap=2000)
    many = mean_average_precision(rng.random(2000), n_bootstrap=2000)

    assert many.high - many.low < (few.high - few.low) / 4


@pytest.mark.parametrize("confidence", [0.5, 0.95])
def test_bootstrap_matches_slow_loop(confidence):
    aps = np.random.default_rng(3).random(7)

    estimate = mean_average_precision(aps, n_bootstrap=500, confidence=confidence, seed=11)
    low, high = _slow_bootstrap(aps, n_bootstrap=500, confidence=confidence, seed=11)

    assert estimate.low == pytest.approx(low)
    assert estimate.high == pytest.approx(high)


def test_bootstrap_chunking_keeps_result(monkeypatch):
    import s2m.evaluation as evaluation

    aps = np.random.default_rng(4).random(9)
    reference = mean_average_precision(aps, n_bootstrap=300, seed=5)

    monkeypatch.setattr(evaluation, "_BOOTSTRAP_CHUNK_ELEMENTS", 50)
    chunked = mean_average_precision(aps, n_bootstrap=300, seed=5)

    assert chunked == reference


def test_bootstrap_single_concept_is_degenerate():
    with pytest.warns(RuntimeWarning, match="1 concept.*zero width"):
        estimate = mean_average_precision(np.array([0.4]), n_bootstrap=100)

    assert (estimate.mean, estimate.low, estimate.high) == pytest.approx((0.4, 0.4, 0.4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aps": np.array([])}, "non-empty 1-D"),
        ({"aps": np.array([0.5, np.nan])}, "1 NaN or infinite"),
        ({"aps": np.ones(3), "n_bootstrap": 0}, "n_bootstrap must be a positive integer; got 0"),
        ({"aps": np.ones(3), "confidence": 1.0}, r"confidence must be in \(0, 1\)"),
    ],
)
def test_bootstrap_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mean_average_precision(**kwargs)
