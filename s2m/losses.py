"""Histogram loss (Ustinova and Lempitsky, "Learning Deep Embeddings with Histogram Loss", NIPS 2016)."""

import torch
from torch import Tensor


def soft_histogram(values: Tensor, nodes: Tensor) -> Tensor:
    """Estimate a histogram with linear (triangular) kernels.

    Each value adds weight to the two nodes around it, in proportion to its
    closeness to each, so the histogram is differentiable in the values.

    Parameters
    ----------
    values : Tensor of shape (n,)
        Values inside ``[nodes[0], nodes[-1]]``.
    nodes : Tensor of shape (n_bins,)
        Equally spaced bin centres.

    Returns
    -------
    Tensor of shape (n_bins,)
        Weights that sum to 1.
    """
    step = nodes[1] - nodes[0]
    weights = torch.clamp(1.0 - (values[:, None] - nodes[None, :]).abs() / step, min=0.0)
    return weights.sum(dim=0) / values.shape[0]


def histogram_loss(
    positive_scores: Tensor,
    negative_scores: Tensor,
    n_bins: int = 100,
    score_range: tuple[float, float] | None = None,
) -> Tensor:
    r"""Estimate the probability that a negative outscores a positive.

    With histograms :math:`h^+` and :math:`h^-` of the positive and negative
    scores on the same nodes,

    .. math::

        L = \sum_r h^-_r \sum_{q \le r} h^+_q ,

    which tends to :math:`P(s^- > s^+)` over all positive-negative pairs as the
    bin width shrinks.

    Parameters
    ----------
    positive_scores : Tensor of shape (n_positive,)
    negative_scores : Tensor of shape (n_negative,)
    n_bins : int
        Number of histogram nodes, at least 2.
    score_range : (float, float), optional
        Range the nodes span. The default is the range of all scores, found
        without gradient. Scores outside a given range are clamped into it.

    Returns
    -------
    Tensor of shape ()
    """
    if n_bins < 2:
        raise ValueError(f"n_bins must be at least 2, got {n_bins}.")
    if positive_scores.ndim != 1 or negative_scores.ndim != 1:
        raise ValueError(
            "positive_scores and negative_scores must be 1-D, got shapes "
            f"{tuple(positive_scores.shape)} and {tuple(negative_scores.shape)}."
        )
    if positive_scores.numel() == 0 or negative_scores.numel() == 0:
        raise ValueError("histogram_loss needs at least one positive and one negative score.")

    if score_range is None:
        with torch.no_grad():
            all_scores = torch.cat([positive_scores, negative_scores])
            low, high = all_scores.min().item(), all_scores.max().item()
        # A degenerate range would give a zero bin width.
        margin = max(1e-6, 1e-3 * (high - low))
        low, high = low - margin, high + margin
    else:
        low, high = score_range
        if not high > low:
            raise ValueError(f"score_range must have high > low, got {score_range}.")

    nodes = torch.linspace(
        low, high, n_bins, dtype=positive_scores.dtype, device=positive_scores.device
    )
    positive = soft_histogram(positive_scores.clamp(low, high), nodes)
    negative = soft_histogram(negative_scores.clamp(low, high), nodes)

    positive_cdf = torch.cumsum(positive, dim=0)
    return torch.sum(negative * positive_cdf)


def standardise_episode_scores(positive_scores: Tensor, negative_scores: Tensor):
    """Standardise the scores of each episode to zero mean and unit variance.

    Log-likelihoods of different concept sets live on different scales, so
    the scores of a batch of episodes are pooled into one histogram only after
    this shift and rescale, which keeps the order within each episode.

    Parameters
    ----------
    positive_scores : Tensor of shape (n_episodes, n_positive)
    negative_scores : Tensor of shape (n_episodes, n_negative)

    Returns
    -------
    (Tensor, Tensor) of the same shapes
    """
    scores = torch.cat([positive_scores, negative_scores], dim=1)
    mean = scores.mean(dim=1, keepdim=True)
    scale = scores.std(dim=1, keepdim=True).clamp_min(1e-6)
    n_positive = positive_scores.shape[1]
    standard = (scores - mean) / scale
    return standard[:, :n_positive], standard[:, n_positive:]
