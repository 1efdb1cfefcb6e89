r"""Set models of Set2Model networks: fit a model to a concept set, score queries.

Three set models are available, each a differentiable map from a batch of
concept sets to scores of queries:

``mean``
    The AVG baseline of Set2Model: :math:`s(y) = -\lVert y - \bar x \rVert`
    with :math:`\bar x` the mean of the concept set.
``gaussian``
    A diagonal Gaussian fitted in closed form; :math:`s(y) = \log p(y)`.
``gmm``
    A mixture of K diagonal Gaussians fitted by EM; :math:`s(y) = \log p(y)`.
    Gradients reach the concept set through the implicit function theorem
    (see :mod:`s2m.mixture`).

:class:`Set2ModelScorer` applies a set model to many test problems at once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from s2m.mixture import (
    GaussianMixtureFit,
    fit_diagonal_gaussian,
    fit_diagonal_gmm,
    mixture_log_prob,
)

logger = logging.getLogger(__name__)

SET_MODELS = ("mean", "gaussian", "gmm")


@dataclass(frozen=True)
class SetModelSpec:
    """A set model and its fitting options.

    Attributes
    ----------
    kind : {"mean", "gaussian", "gmm"}
    n_components : int
        Number of mixture components K, used by ``"gmm"`` only.
    fit_options : dict
        Extra keyword arguments of :func:`s2m.mixture.fit_diagonal_gmm` (for
        ``"gmm"``) or :func:`s2m.mixture.fit_diagonal_gaussian` (for
        ``"gaussian"``), for example ``max_iter`` or ``variance_prior``.
    """

    kind: str
    n_components: int = 1
    fit_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in SET_MODELS:
            raise ValueError(
                f"Unknown set model {self.kind!r}: expected one of {SET_MODELS}."
            )
        if self.n_components < 1:
            raise ValueError(
                f"n_components must be at least 1, got {self.n_components}."
            )


def _masked_mean(concept_sets: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return concept_sets.mean(dim=1)
    weights = mask.to(concept_sets.dtype).unsqueeze(-1)
    return (concept_sets * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def fit_set_model(
    spec: SetModelSpec, concept_sets: Tensor, mask: Tensor | None = None, seed: int = 0
) -> Tensor | GaussianMixtureFit:
    """Fit the set model to every concept set of a batch.

    Parameters
    ----------
    spec : SetModelSpec
    concept_sets : Tensor of shape (batch, n_max, D)
    mask : Tensor of shape (batch, n_max), dtype bool, optional
        True for members. ``None`` means every row is a member.
    seed : int
        Seed of the k-means++ initialisation of the mixture.

    Returns
    -------
    Tensor of shape (batch, D) for ``"mean"``, else GaussianMixtureFit
    """
    if spec.kind == "mean":
        return _masked_mean(concept_sets, mask)

    if spec.kind == "gaussian":
        return fit_diagonal_gaussian(concept_sets, mask, **spec.fit_options)

    return fit_diagonal_gmm(
        concept_sets, spec.n_components, mask, seed=seed, **spec.fit_options
    )


def score_queries(
    spec: SetModelSpec,
    concept_sets: Tensor,
    queries: Tensor,
    mask: Tensor | None = None,
    seed: int = 0,
) -> Tensor:
    """Fit the set model to each concept set and score that set's queries.

    Parameters
    ----------
    spec : SetModelSpec
    concept_sets : Tensor of shape (batch, n_max, D)
    queries : Tensor of shape (batch, n_queries, D)
    mask : Tensor of shape (batch, n_max), dtype bool, optional
    seed : int

    Returns
    -------
    Tensor of shape (batch, n_queries)
        Higher means more likely to belong to the concept.
    """
    model = fit_set_model(spec, concept_sets, mask, seed)

    if spec.kind == "mean":
        return -torch.linalg.vector_norm(queries - model.unsqueeze(1), dim=-1)

    return mixture_log_prob(model, queries)


def gallery_log_likelihood(fit: GaussianMixtureFit, gallery: Tensor) -> Tensor:
    r"""Score a shared gallery under many fitted mixtures with matrix products.

    Expands :math:`\sum_d (y_d - \mu_{kd})^2 / \sigma^2_{kd}` into three
    terms, so the cost is one (M, D) x (D, P K) product instead of a
    (P, M, K, D) tensor.

    Parameters
    ----------
    fit : GaussianMixtureFit
        Batch of P mixtures with K components in D dimensions.
    gallery : Tensor of shape (M, D)

    Returns
    -------
    Tensor of shape (P, M)
    """
    n_sets, n_components, dim = fit.means.shape
    precisions = 1.0 / fit.variances
    flat_precisions = precisions.reshape(n_sets * n_components, dim)
    flat_scaled_means = (fit.means * precisions).reshape(n_sets * n_components, dim)

    quadratic = (gallery**2) @ flat_precisions.T
    quadratic = quadratic - 2.0 * gallery @ flat_scaled_means.T
    constant = (fit.means**2 * precisions).sum(-1) + torch.log(fit.variances).sum(-1)
    constant = constant + dim * math.log(2 * math.pi)

    component_log_prob = -0.5 * (quadratic + constant.reshape(1, -1))
    component_log_prob = component_log_prob.reshape(-1, n_sets, n_components)
    component_log_prob = component_log_prob + torch.log(fit.weights).unsqueeze(0)
    return torch.logsumexp(component_log_prob, dim=-1).T


class Set2ModelScorer:
    """Fit a set model to many concept sets and score one gallery, in chunks.

    It follows the interface of :class:`baselines.SetMethod` and adds
    ``fit_score_batch``, which the evaluation uses to fit many concept sets at
    once.

    Parameters
    ----------
    spec : SetModelSpec
    device : torch.device or str
    chunk_size : int
        Number of concept sets fitted and scored together.
    seed : int
        Seed of the mixture initialisation.
    """

    needs_background = False

    def __init__(self, spec: SetModelSpec, device="cpu", chunk_size: int = 256, seed: int = 0):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
        self.spec = spec
        self.device = torch.device(device)
        self.chunk_size = chunk_size
        self.seed = seed
        self._concept_set: np.ndarray | None = None

    def set_background(self, descriptors, concepts) -> None:
        """Ignore background descriptors, which set models do not use."""

    def fit(self, concept_set: np.ndarray) -> "Set2ModelScorer":
        self._concept_set = np.asarray(concept_set, dtype=np.float32)
        return self

    def score(self, gallery: np.ndarray) -> np.ndarray:
        if self._concept_set is None:
            raise RuntimeError("Call fit before score.")
        return self.fit_score_batch([self._concept_set], gallery)[0]

    def fit_score_batch(self, concept_sets: list[np.ndarray], gallery: np.ndarray) -> np.ndarray:
        """Fit every concept set and score the gallery under each model.

        Parameters
        ----------
        concept_sets : list of ndarray of shape (n_i, D)
        gallery : ndarray of shape (M, D)

        Returns
        -------
        ndarray of shape (len(concept_sets), M)
        """
        gallery_tensor = torch.as_tensor(gallery, dtype=torch.float32, device=self.device)
        scores = []

        with torch.no_grad():
            for start in range(0, len(concept_sets), self.chunk_size):
                chunk = concept_sets[start : start + self.chunk_size]
                padded, mask = pad_sets(chunk, self.device)
                scores.append(self._score_chunk(padded, mask, gallery_tensor).cpu().numpy())

        return np.concatenate(scores, axis=0)

    def _score_chunk(self, padded: Tensor, mask: Tensor, gallery: Tensor) -> Tensor:
        model = fit_set_model(self.spec, padded, mask, self.seed)

        if self.spec.kind == "mean":
            return -torch.cdist(model, gallery)

        return gallery_log_likelihood(model, gallery)


def pad_sets(concept_sets: list[np.ndarray], device) -> tuple[Tensor, Tensor]:
    """Stack sets of different sizes into one padded batch with a mask.

    Returns
    -------
    padded : Tensor of shape (batch, n_max, D)
    mask : Tensor of shape (batch, n_max), dtype bool
    """
    n_max = max(len(s) for s in concept_sets)
    dim = concept_sets[0].shape[1]
    padded = torch.zeros(len(concept_sets), n_max, dim, dtype=torch.float32)
    mask = torch.zeros(len(concept_sets), n_max, dtype=torch.bool)

    for row, members in enumerate(concept_sets):
        padded[row, : len(members)] = torch.as_tensor(members, dtype=torch.float32)
        mask[row, : len(members)] = True

    return padded.to(device), mask.to(device)
