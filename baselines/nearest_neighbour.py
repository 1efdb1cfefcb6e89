"""Nearest-neighbour baseline: rank the gallery by maximum cosine similarity to the set.

A single noise image in the set makes every gallery image close to it rank
high, so this baseline degrades quickly with noise, unlike the mean.
"""

from __future__ import annotations

import numpy as np

from baselines import SetMethod
from baselines._checks import check_descriptors, check_fitted, l2_normalise


class NearestNeighbour(SetMethod):
    """Score = maximum cosine similarity to any member of the concept set.

    Cosine similarity is the dot product of L2-normalised vectors. Both the set
    and the gallery are normalised again here, so descriptors that are not
    exactly unit length still give cosine similarities. A zero vector gets
    similarity 0.

    Attributes
    ----------
    members_ : ndarray of shape (n, D)
        L2-normalised members of the fitted concept set.
    """

    name = "nearest_neighbour"

    def fit(self, concept_set: np.ndarray) -> NearestNeighbour:
        """Store the L2-normalised members of ``concept_set`` (n, D)."""
        concept_set = check_descriptors(concept_set, what="concept_set")
        self.members_ = l2_normalise(concept_set.astype(np.float64))
        return self

    def score(self, gallery: np.ndarray) -> np.ndarray:
        """Return the max cosine similarity of each gallery row (M, D) to the set, shape (M,)."""
        check_fitted(self, "members_")
        gallery = check_descriptors(
            gallery, what="gallery", n_features=self.members_.shape[1]
        )
        similarities = l2_normalise(gallery.astype(np.float64)) @ self.members_.T
        return similarities.max(axis=1)

    def fit_score_batch(self, concept_sets: list[np.ndarray], gallery: np.ndarray) -> np.ndarray:
        """Score the gallery (M, D) against every set; return shape (len(concept_sets), M).

        Gives the same scores as :meth:`fit` then :meth:`score` per set, with
        the gallery normalised once and one matrix product for all sets.
        """
        gallery = check_descriptors(gallery, what="gallery")
        gallery = l2_normalise(gallery.astype(np.float64))
        checked = [check_descriptors(s, what="concept_set", n_features=gallery.shape[1]) for s in concept_sets]
        members = l2_normalise(np.concatenate(checked).astype(np.float64))

        similarities = members @ gallery.T
        boundaries = np.cumsum([0] + [len(s) for s in checked])[:-1]
        return np.maximum.reduceat(similarities, boundaries, axis=0)
