"""Synthetic sets of clustered descriptors for tests and benchmarks of the set-to-model layer."""

from __future__ import annotations

import torch
from torch import Tensor


def clustered_sets(
    batch_size: int,
    n_points: int,
    dim: int,
    n_clusters: int,
    *,
    noise: float = 0.5,
    normalize: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Draw B sets, each of N points around ``n_clusters`` random centres of its own.

    Centres are standard normal vectors scaled by ``1 / sqrt(D)``, so they have about unit
    norm, and each point adds Gaussian noise of standard deviation ``noise / sqrt(D)`` per
    dimension to a uniformly chosen centre. ``noise`` near 1 gives overlapping clusters
    (soft responsibilities), near 0.1 well separated ones. With ``normalize`` every point
    is then scaled to unit L2 norm, like the descriptors the layer is meant for.

    Returns
    -------
    Tensor of shape (B, N, D)
    """
    generator = torch.Generator().manual_seed(seed)
    scale = dim**-0.5
    centres = torch.randn(batch_size, n_clusters, dim, generator=generator, dtype=torch.float64) * scale
    labels = torch.randint(n_clusters, (batch_size, n_points), generator=generator)
    points = centres.gather(1, labels.unsqueeze(-1).expand(-1, -1, dim))
    points = points + noise * scale * torch.randn(batch_size, n_points, dim, generator=generator, dtype=torch.float64)
    if normalize:
        points = torch.nn.functional.normalize(points, dim=-1)
    return points.to(dtype)
