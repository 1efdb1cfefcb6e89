"""Mean-embedding baseline: rank the gallery by distance to the mean of the concept set.

Descriptors in this benchmark are L2-normalised. For unit vectors,
``||x - m||^2 = 1 + ||m||^2 - 2 x.m``, so ranking by minus the Euclidean
distance to the mean ``m`` gives the same order as ranking by the dot product
with ``m`` (the prototype classifier of prototypical networks). Noise images
in the set pull the mean towards them, which this baseline does not correct.
"""

from __future__ import annotations

import numpy as np

from baselines import SetMethod
from baselines._checks import check_descriptors, check_fitted


class MeanEmbedding(SetMethod):
    """Score = minus the Euclidean distance to the mean descriptor of the concept set.

    Attributes
    ----------
    mean_ : ndarray of shape (D,)
        Mean of the fitted concept set.
    """

    name = "mean_embedding"

    def fit(self, concept_set: np.ndarray) -> MeanEmbedding:
        """Store the mean of ``concept_set`` (n, D)."""
        concept_set = check_descriptors(concept_set, what="concept_set")
        self.mean_ = concept_set.mean(axis=0, dtype=np.float64)
        return self

    def score(self, gallery: np.ndarray) -> np.ndarray:
        """Return minus the distance of every gallery row (M, D) to the mean, shape (M,)."""
        check_fitted(self, "mean_")
        gallery = check_descriptors(gallery, what="gallery", n_features=self.mean_.shape[0])
        return -np.linalg.norm(gallery - self.mean_, axis=1)

    def fit_score_batch(self, concept_sets: list[np.ndarray], gallery: np.ndarray) -> np.ndarray:
        """Score the gallery (M, D) against the mean of every set; return shape (len(concept_sets), M).

        Gives the same scores as :meth:`fit` then :meth:`score` per set, with
        one distance computation for all sets.
        """
        gallery = check_descriptors(gallery, what="gallery").astype(np.float64)
        means = np.stack(
            [check_descriptors(s, what="concept_set", n_features=gallery.shape[1]).mean(axis=0, dtype=np.float64)
             for s in concept_sets]
        )
        squared = (means**2).sum(1)[:, None] + (gallery**2).sum(1)[None, :] - 2.0 * means @ gallery.T
        return -np.sqrt(np.maximum(squared, 0.0))
