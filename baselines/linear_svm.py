"""Linear SVM baseline: the concept set against generic negatives.

In the web-search setting a concept comes with a set of (possibly noisy)
positive images and no negatives. This baseline therefore borrows generic
negatives: it samples ``n_negatives`` descriptors of meta-training images,
passed in through :meth:`LinearSVM.set_background`. The meta-training concepts
never overlap the test concepts, so no negative shows the concept being learnt.

The sample depends only on ``seed`` and the bytes of the concept set, not on
how many sets were fitted before, so a problem gets the same negatives whatever
order the problems are evaluated in.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

import numpy as np
from sklearn.svm import LinearSVC

from baselines import SetMethod
from baselines._checks import (
    check_descriptors,
    check_fitted,
    check_float,
    check_int,
)

logger = logging.getLogger(__name__)


def _concept_set_digest(concept_set: np.ndarray) -> int:
    """Return a 64-bit integer hash of the dtype, shape and values of ``concept_set``."""
    data = np.ascontiguousarray(concept_set)
    digest = hashlib.sha256()
    digest.update(str(data.dtype).encode())
    digest.update(repr(data.shape).encode())
    digest.update(data.tobytes())
    return int.from_bytes(digest.digest()[:8], "little")


class LinearSVM(SetMethod):
    """scikit-learn ``LinearSVC``: the concept set (label 1) against background negatives (label 0).

    Parameters
    ----------
    C : float, default=1.0
        Regularisation parameter of ``LinearSVC``, > 0.
    n_negatives : int, default=1000
        Number of background descriptors sampled as negatives, without
        replacement. All of them are used if the background is smaller.
    class_weight : "balanced", dict or None, default="balanced"
        Passed to ``LinearSVC``. "balanced" keeps a set of 10 positives from
        being outweighed by 1000 negatives.
    seed : int, default=0
        Combined with a hash of the concept set to seed the negative sample,
        and passed as ``random_state`` to ``LinearSVC``.

    Attributes
    ----------
    svm_ : LinearSVC
        Classifier fitted by the last call to :meth:`fit`.
    negative_indices_ : ndarray of shape (n_negatives,)
        Rows of the background used as negatives in the last fit.
    """

    name = "linear_svm"
    needs_background = True
    default_params = {"C": 1.0, "n_negatives": 1000, "class_weight": "balanced", "seed": 0}

    def _check_params(self) -> None:
        check_float(self.params["C"], name="C", minimum=0.0, inclusive=False)
        check_int(self.params["n_negatives"], name="n_negatives", minimum=1)
        check_int(self.params["seed"], name="seed", minimum=0)

        class_weight = self.params["class_weight"]
        valid = class_weight is None or class_weight == "balanced" or isinstance(class_weight, Mapping)
        if not valid:
            raise ValueError(
                f"Parameter class_weight must be 'balanced', a dict or None; got "
                f"{class_weight!r}. Fix it in the method's params."
            )

    def set_background(self, descriptors: np.ndarray, concepts: np.ndarray) -> None:
        """Store the descriptors (N_bg, D) of meta-training images that negatives are sampled from.

        ``concepts`` (N_bg,) gives the concept label of each row. It is only
        checked for length, because negatives are sampled uniformly over images.
        """
        descriptors = check_descriptors(descriptors, what="background descriptors")
        concepts = np.asarray(concepts)
        if concepts.shape != (descriptors.shape[0],):
            raise ValueError(
                f"Background concepts must have shape ({descriptors.shape[0]},), one "
                f"label per descriptor; got shape {concepts.shape}."
            )

        self.background_ = descriptors
        self.background_concepts_ = concepts

    def fit(self, concept_set: np.ndarray) -> LinearSVM:
        """Train the SVM on ``concept_set`` (n, D) against sampled background negatives."""
        background = getattr(self, "background_", None)
        if background is None:
            raise RuntimeError(
                "LinearSVM needs negatives from the meta-training images. Call "
                "set_background(descriptors, concepts) before fit()."
            )
        concept_set = check_descriptors(
            concept_set, what="concept_set", n_features=background.shape[1]
        )

        self.negative_indices_ = self._sample_negatives(concept_set)
        negatives = background[self.negative_indices_]
        features = np.concatenate([concept_set, negatives.astype(concept_set.dtype)])
        labels = np.concatenate(
            [np.ones(len(concept_set), dtype=int), np.zeros(len(negatives), dtype=int)]
        )

        self.svm_ = LinearSVC(
            C=self.params["C"],
            class_weight=self.params["class_weight"],
            random_state=self.params["seed"],
        )
        self.svm_.fit(features, labels)
        return self

    def _sample_negatives(self, concept_set: np.ndarray) -> np.ndarray:
        n_background = self.background_.shape[0]
        n_negatives = self.params["n_negatives"]
        if n_negatives >= n_background:
            logger.debug(
                "n_negatives=%d >= %d background descriptors, so using all of them.",
                n_negatives,
                n_background,
            )
            return np.arange(n_background)

        rng = np.random.default_rng([self.params["seed"], _concept_set_digest(concept_set)])
        return np.sort(rng.choice(n_background, size=n_negatives, replace=False))

    def score(self, gallery: np.ndarray) -> np.ndarray:
        """Return the SVM decision function for every gallery row (M, D), shape (M,)."""
        check_fitted(self, "svm_")
        gallery = check_descriptors(gallery, what="gallery", n_features=self.svm_.n_features_in_)
        return self.svm_.decision_function(gallery).astype(np.float64)
