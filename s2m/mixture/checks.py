"""Validation of batched point sets and their member masks."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float64)
MAX_LISTED_SETS = 10


def is_integer(value) -> bool:
    """Return whether ``value`` is an integer other than a bool, numpy integers included."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """Return whether ``value`` is a real number other than a bool, numpy floats included."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def list_sets(indices: Tensor) -> str:
    """Format set indices for an error message, listing at most ``MAX_LISTED_SETS``."""
    values = indices.tolist()
    listed = ", ".join(str(value) for value in values[:MAX_LISTED_SETS])
    if len(values) > MAX_LISTED_SETS:
        listed += f", ... ({len(values)} in all)"
    return f"[{listed}]"


def validate_points(
    x: Tensor, mask: Tensor | None, name: str = "x", mask_name: str = "mask", shape: str = "(B, N, D)"
) -> tuple[Tensor, Tensor]:
    """Check a padded batch of point sets and return it with padding zeroed, plus a float member mask.

    Padded rows are replaced by zeros so that NaN or infinite padding cannot reach the
    arithmetic, and so their gradient is exactly zero.

    Parameters
    ----------
    x : Tensor of shape (B, N, D), float32 or float64
    mask : Tensor of shape (B, N), bool, or None
        True for members. None means that every row is a member.
    name, mask_name, shape : str
        How error messages call ``x``, ``mask`` and the expected shape of ``x``.

    Returns
    -------
    x : Tensor of shape (B, N, D)
    member : Tensor of shape (B, N), 1.0 for members and 0.0 for padding, in the dtype of ``x``

    Raises
    ------
    ValueError
        If a shape, dtype or device does not match, or a member row is not finite, or the sum
        of squares over the members of a set overflows (in float32, once all N D values
        exceed about 1.8e19 / sqrt(N D)).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}.")
    if x.dim() != 3:
        raise ValueError(
            f"{name} must have shape {shape}, got shape {tuple(x.shape)}. "
            f"For a single set, add a batch dimension with {name}.unsqueeze(0)."
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}; cast it with x.float() or x.double().")
    if min(x.shape) == 0:
        raise ValueError(f"{name} must have B, N and D of at least 1, got shape {tuple(x.shape)}.")

    if mask is None:
        member_bool = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    else:
        if not isinstance(mask, Tensor):
            raise ValueError(
                f"{mask_name} must be a bool torch.Tensor (True for members), got {type(mask).__name__}; "
                f"convert it with torch.as_tensor({mask_name}, dtype=torch.bool, device={name}.device)."
            )
        if mask.dtype != torch.bool:
            raise ValueError(
                f"{mask_name} must be a bool tensor (True for members), got {mask.dtype}; "
                f"convert it with {mask_name} != 0 or {mask_name}.bool()."
            )
        if mask.shape != x.shape[:2]:
            raise ValueError(f"{mask_name} must have shape {tuple(x.shape[:2])} to match {name}, got {tuple(mask.shape)}.")
        if mask.device != x.device:
            raise ValueError(f"{mask_name} is on {mask.device} but {name} is on {x.device}; move both to one device.")
        member_bool = mask

    # A NaN, an infinity or squares that overflow when the fits sum them over a set make the
    # set's sum non-finite, since torch's 2-norm does not rescale (checked with torch 2.13).
    row_squares = torch.linalg.vector_norm(x, dim=-1).square()
    set_squares = torch.where(member_bool, row_squares, x.new_zeros(())).sum(dim=-1)
    if not bool(torch.isfinite(set_squares).all()):
        finite_rows = torch.isfinite(x).all(dim=-1) | ~member_bool
        if bool(finite_rows.all()):
            largest = torch.where(member_bool.unsqueeze(-1), x.abs(), x.new_zeros(()))
            raise ValueError(
                f"{name} has finite values so large that their squares, summed over a set, overflow {x.dtype} "
                f"(largest magnitude {largest.max().item():.3g}). Scale the descriptors down, for example by "
                "L2-normalising them, or use float64."
            )
        bad_sets = torch.nonzero(~finite_rows.all(dim=-1)).flatten()
        first_set = int(bad_sets[0])
        first_row = int(torch.nonzero(~finite_rows[first_set]).flatten()[0])
        raise ValueError(
            f"{name} contains NaN or infinite values in sets {list_sets(bad_sets)} (first in set {first_set}, "
            f"row {first_row}). Clean the descriptors, or mark those rows as padding in {mask_name}."
        )

    if mask is not None and not bool(mask.all()):
        x = torch.where(member_bool.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x, member_bool.to(x.dtype)
