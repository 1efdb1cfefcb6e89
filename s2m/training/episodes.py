"""Sampling of meta-training episodes.

An episode, as in Set2Model meta-training, contains a concept set of one
training concept, positives (other images of that concept) and negatives
(images of other training concepts). A fraction of the concept set can be
replaced by images of other concepts, so that training meets noisy sets like
those of a web image search.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class EpisodeBatch:
    """Image indices of a batch of episodes.

    Attributes
    ----------
    concept_sets : ndarray of shape (n_episodes, set_size)
    positives : ndarray of shape (n_episodes, n_positives)
    negatives : ndarray of shape (n_episodes, n_negatives)
    """

    concept_sets: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray


class EpisodeSampler:
    """Draw batches of episodes from labelled training images.

    Parameters
    ----------
    labels : ndarray of shape (n_images,)
        Concept of each training image, any hashable values.
    set_size : int
        Images per concept set.
    n_positives : int
        Positives per episode, drawn from the same concept, disjoint from
        the concept set.
    n_negatives : int
        Negatives per episode, drawn from the other concepts.
    noise_fraction : float
        Fraction of each concept set replaced by images of other concepts.
    seed : int

    Raises
    ------
    ValueError
        If fewer than two concepts have ``set_size + n_positives`` images.
    """

    def __init__(
        self,
        labels: np.ndarray,
        set_size: int,
        n_positives: int,
        n_negatives: int,
        noise_fraction: float = 0.0,
        seed: int = 0,
    ):
        if not 0.0 <= noise_fraction < 1.0:
            raise ValueError(f"noise_fraction must be in [0, 1), got {noise_fraction}.")
        for name, value in [("set_size", set_size), ("n_positives", n_positives), ("n_negatives", n_negatives)]:
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")

        codes, uniques = _encode(labels)
        needed = set_size + n_positives
        self.members = [np.flatnonzero(codes == c) for c in range(len(uniques))]
        self.usable = np.array([c for c, m in enumerate(self.members) if len(m) >= needed])

        dropped = len(uniques) - len(self.usable)
        if dropped:
            logger.info(
                "Episode sampler skips %d of %d concepts with fewer than %d images",
                dropped,
                len(uniques),
                needed,
            )
        if len(self.usable) < 2:
            raise ValueError(
                f"Only {len(self.usable)} training concepts have at least {needed} "
                "images (set_size + n_positives). Lower set_size or n_positives."
            )

        self.codes = codes
        self.set_size = set_size
        self.n_positives = n_positives
        self.n_negatives = n_negatives
        self.n_noise = int(round(noise_fraction * set_size))
        self.rng = np.random.default_rng(seed)

    def _other_images(self, concept: int, count: int) -> np.ndarray:
        # Rejection sampling: the concept's own images are a small share of all.
        chosen = self.rng.integers(0, len(self.codes), size=2 * count + 8)
        chosen = chosen[self.codes[chosen] != concept]
        while len(chosen) < count:
            extra = self.rng.integers(0, len(self.codes), size=count)
            chosen = np.concatenate([chosen, extra[self.codes[extra] != concept]])
        return chosen[:count]

    def sample(self, n_episodes: int) -> EpisodeBatch:
        """Draw ``n_episodes`` episodes, each from a different concept when possible."""
        replace = n_episodes > len(self.usable)
        concepts = self.rng.choice(self.usable, n_episodes, replace=replace)
        sets, positives, negatives = [], [], []

        for concept in concepts:
            members = self.rng.permutation(self.members[concept])
            concept_set = members[: self.set_size].copy()
            positives.append(members[self.set_size : self.set_size + self.n_positives])

            if self.n_noise:
                noise = self._other_images(concept, self.n_noise)
                slots = self.rng.choice(self.set_size, self.n_noise, replace=False)
                concept_set[slots] = noise

            sets.append(concept_set)
            negatives.append(self._other_images(concept, self.n_negatives))

        return EpisodeBatch(np.stack(sets), np.stack(positives), np.stack(negatives))


def _encode(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniques, codes = np.unique(np.asarray(labels), return_inverse=True)
    return codes, uniques
