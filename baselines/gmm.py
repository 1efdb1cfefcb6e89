"""Gaussian mixture baseline: fit a mixture to the concept set, score by log-likelihood.

This is a Set2Model-style model fitted without meta-learning: the descriptors
come from a fixed embedding and the mixture is fitted by EM on the set alone.
Several components let the model cover a multi-modal concept and leave noise
images to a component of their own.

``reg_covar`` defaults to 1e-3, far above the scikit-learn default of 1e-6,
because the sets are tiny (often fewer points than dimensions) and the
descriptors are L2-normalised, so the per-dimension variance of the data is
about 1/D (2e-3 for D = 512). A component that owns one or two points would
otherwise collapse to near-zero variances, and its log-likelihoods would
dominate the ranking.
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.mixture import GaussianMixture

from baselines import SetMethod
from baselines._checks import check_descriptors, check_fitted, check_float, check_int

logger = logging.getLogger(__name__)


class GMM(SetMethod):
    """Diagonal-covariance ``GaussianMixture`` fitted to the concept set, scoring by log-likelihood.

    Parameters
    ----------
    n_components : int, default=2
        Number of mixture components. A set with fewer points than this gets
        one component per point. A set of one point gets a Gaussian centred on
        it with variance ``reg_covar``, so ``reg_covar`` must then be > 0.
    reg_covar : float, default=1e-3
        Value added to every diagonal variance, >= 0.
    max_iter : int, default=100
        Maximum number of EM iterations.
    n_init : int, default=1
        Number of EM restarts; the best fit is kept.
    seed : int, default=0
        ``random_state`` of the k-means initialisation.

    Attributes
    ----------
    mixture_ : GaussianMixture
        Mixture fitted by the last call to :meth:`fit`.
    """

    name = "gmm"
    default_params = {"n_components": 2, "reg_covar": 1e-3, "max_iter": 100, "n_init": 1, "seed": 0}

    def _check_params(self) -> None:
        check_int(self.params["n_components"], name="n_components", minimum=1)
        check_float(self.params["reg_covar"], name="reg_covar", minimum=0.0, inclusive=True)
        check_int(self.params["max_iter"], name="max_iter", minimum=1)
        check_int(self.params["n_init"], name="n_init", minimum=1)
        check_int(self.params["seed"], name="seed", minimum=0)

    def fit(self, concept_set: np.ndarray) -> GMM:
        """Fit the mixture to ``concept_set`` (n, D) by EM."""
        concept_set = check_descriptors(concept_set, what="concept_set")

        n_components = self.params["n_components"]
        if len(concept_set) < n_components:
            logger.debug(
                "Concept set has %d points, fewer than n_components=%d, so fitting %d components.",
                len(concept_set),
                n_components,
                len(concept_set),
            )
            n_components = len(concept_set)

        if len(concept_set) == 1:
            # GaussianMixture rejects a single sample. Two copies of the point give the
            # fit one point would: mean at the point, every variance equal to reg_covar.
            concept_set = np.repeat(concept_set, 2, axis=0)

        self.mixture_ = GaussianMixture(
            n_components=n_components,
            covariance_type="diag",
            reg_covar=self.params["reg_covar"],
            max_iter=self.params["max_iter"],
            n_init=self.params["n_init"],
            random_state=self.params["seed"],
        )
        self.mixture_.fit(concept_set)
        return self

    def score(self, gallery: np.ndarray) -> np.ndarray:
        """Return the log-likelihood of every gallery row (M, D) under the mixture, shape (M,)."""
        check_fitted(self, "mixture_")
        gallery = check_descriptors(
            gallery, what="gallery", n_features=self.mixture_.n_features_in_
        )
        return self.mixture_.score_samples(gallery).astype(np.float64)
