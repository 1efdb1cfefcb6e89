"""The fitted mixture and the log-likelihood of queries under it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from s2m.mixture.checks import validate_points
from s2m.mixture.em import log_component_densities, point_features


@dataclass
class GaussianMixtureFit:
    """Mixtures of K diagonal Gaussians fitted to B sets: batch shape (B,), event shape (D,).

    Attributes
    ----------
    weights : Tensor of shape (B, K)
        Mixing weights. Each row sums to 1.
    means : Tensor of shape (B, K, D)
    variances : Tensor of shape (B, K, D)
        Diagonal covariances, strictly positive.
    converged : Tensor of shape (B,), bool
        Whether EM met the tolerance before ``max_iter``. Always True for a closed-form fit.
    n_iter : Tensor of shape (B,), int64
        EM iterations used per set, 0 for a closed-form fit.
    lower_bound : Tensor of shape (B,)
        The penalised log-likelihood at the fit divided by the number of members: the mean
        log-likelihood of the members plus the prior terms per member (see
        :mod:`s2m.mixture.prior`). Differentiable like the parameters.
    """

    weights: Tensor
    means: Tensor
    variances: Tensor
    converged: Tensor
    n_iter: Tensor
    lower_bound: Tensor

    @property
    def n_components(self) -> int:
        """Number of components K."""
        return self.weights.shape[-1]

    def __repr__(self) -> str:
        batch_size, n_components, dim = self.means.shape
        return (
            f"GaussianMixtureFit(batch_shape=({batch_size},), event_shape=({dim},), n_components={n_components}, "
            f"dtype={self.means.dtype}, device={self.means.device}, converged={int(self.converged.sum())}/{batch_size})"
        )


def mixture_log_prob(fit: GaussianMixtureFit, y: Tensor, y_mask: Tensor | None = None) -> Tensor:
    """Compute the log-likelihood of each query under the mixture of its set.

    .. math::

        \\log p(y_{bm}) = \\log \\sum_k \\pi_{bk}\\, \\mathcal{N}(y_{bm} \\mid \\mu_{bk}, \\operatorname{diag} \\sigma^2_{bk})

    Parameters
    ----------
    fit : GaussianMixtureFit
        Batch shape (B,), event shape (D,).
    y : Tensor of shape (B, M, D)
        M queries per set, same dtype and device as the fit.
    y_mask : Tensor of shape (B, M), bool, optional
        True for real queries. Padded queries get a log-likelihood of exactly 0 and a zero
        gradient, so they can enter a sum without effect.

    Returns
    -------
    Tensor of shape (B, M)

    Raises
    ------
    ValueError
        If ``fit`` is not a GaussianMixtureFit, or ``y`` does not match it in batch size, dimension,
        dtype or device.

    NOTE: the fit's parameters are not checked, to spare a pass and a device synchronisation
    per call. A hand-built fit with variances that are not positive gives NaN scores.
    """
    if not isinstance(fit, GaussianMixtureFit):
        raise ValueError(
            f"fit must be a GaussianMixtureFit, as returned by fit_diagonal_gmm or fit_diagonal_gaussian, "
            f"got {type(fit).__name__}."
        )
    y, query = validate_points(y, y_mask, name="y", mask_name="y_mask", shape="(B, M, D)")
    batch_size, _, dim = fit.means.shape
    if y.shape[0] != batch_size or y.shape[2] != dim:
        raise ValueError(
            f"y must have shape (B={batch_size}, M, D={dim}) to match the fit, got {tuple(y.shape)}."
        )
    if y.dtype != fit.means.dtype or y.device != fit.means.device:
        raise ValueError(
            f"y is {y.dtype} on {y.device} but the fit is {fit.means.dtype} on {fit.means.device}; "
            "convert y with y.to(fit.means)."
        )

    joint = log_component_densities(point_features(y), fit.means, fit.variances) + torch.log(fit.weights).unsqueeze(1)
    return torch.logsumexp(joint, dim=-1) * query
