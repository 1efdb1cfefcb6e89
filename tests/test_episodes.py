import numpy as np
import pytest

from s2m.training.episodes import EpisodeSampler


def test_episode_structure():
    labels = np.repeat(np.arange(10), 20)
    sampler = EpisodeSampler(labels, set_size=5, n_positives=6, n_negatives=30, seed=0)
    batch = sampler.sample(4)

    assert batch.concept_sets.shape == (4, 5)
    assert batch.positives.shape == (4, 6)
    assert batch.negatives.shape == (4, 30)
    for members, positives, negatives in zip(batch.concept_sets, batch.positives, batch.negatives):
        concept = labels[members[0]]
        assert set(labels[members]) == {concept}
        assert set(labels[positives]) == {concept}
        assert concept not in set(labels[negatives])
        assert not np.isin(positives, members).any()


def test_episode_noise_fraction():
    labels = np.repeat(np.arange(10), 20)
    sampler = EpisodeSampler(labels, set_size=10, n_positives=5, n_negatives=5, noise_fraction=0.3, seed=0)
    batch = sampler.sample(6)

    for members, positives in zip(batch.concept_sets, batch.positives):
        concept = labels[positives[0]]
        assert (labels[members] != concept).sum() == 3


def test_episodes_are_seeded():
    labels = np.repeat(np.arange(10), 20)
    first = EpisodeSampler(labels, 5, 5, 10, seed=3).sample(3)
    second = EpisodeSampler(labels, 5, 5, 10, seed=3).sample(3)
    assert np.array_equal(first.concept_sets, second.concept_sets)
    assert np.array_equal(first.negatives, second.negatives)


def test_sampler_rejects_too_few_concepts():
    labels = np.repeat(np.arange(3), [20, 4, 4])
    with pytest.raises(ValueError, match="Only 1 training concepts"):
        EpisodeSampler(labels, set_size=5, n_positives=5, n_negatives=5)
