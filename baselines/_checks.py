"""Input and parameter checks shared by the baselines.

Modules whose name starts with ``_`` are not scanned for methods by
:func:`baselines.discover_baselines`.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from sklearn.exceptions import NotFittedError


def check_descriptors(
    array: Any, *, what: str, n_features: int | None = None
) -> np.ndarray:
    """Validate a descriptor matrix and return it as a NumPy array without copying.

    Parameters
    ----------
    array : array-like of shape (n_samples, n_features)
        Floating-point descriptors, one row per image.
    what : str
        Name of the argument, used in error messages (e.g. ``"concept_set"``).
    n_features : int, optional
        Expected number of columns, e.g. the dimension seen by ``fit``.

    Returns
    -------
    array : ndarray of shape (n_samples, n_features)

    Raises
    ------
    ValueError
        If the array is not 2-D, not floating-point, empty, contains NaN or
        infinity, or has a number of columns other than ``n_features``.
    """
    array = np.asarray(array)

    if array.ndim != 2:
        raise ValueError(
            f"{what} must be a 2-D array of shape (n_samples, n_features); got shape "
            f"{array.shape}. Reshape a single descriptor with x.reshape(1, -1)."
        )

    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"{what} must have a floating-point dtype; got dtype {array.dtype}. "
            f"Convert it with .astype(np.float32)."
        )

    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"{what} must contain at least one descriptor of at least one feature; "
            f"got shape {array.shape}."
        )

    finite = np.isfinite(array)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(
            f"{what} contains NaN or infinite values in {bad_rows.size} of "
            f"{array.shape[0]} rows (first bad row: {bad_rows[0]}). Check the "
            f"descriptor extraction for these images."
        )

    if n_features is not None and array.shape[1] != n_features:
        raise ValueError(
            f"{what} has {array.shape[1]} features but the method was fitted on "
            f"{n_features}-dimensional descriptors. Use descriptors from the same "
            f"embedding for fit and score."
        )

    return array


def check_fitted(method: object, attribute: str) -> None:
    """Raise ``NotFittedError`` unless ``fit`` has set ``attribute`` on ``method``."""
    if getattr(method, attribute, None) is None:
        raise NotFittedError(
            f"This {type(method).__name__} instance is not fitted yet. Call fit() "
            f"with a concept set before score()."
        )


def l2_normalise(array: np.ndarray) -> np.ndarray:
    """Scale every row to unit Euclidean norm. Rows of norm 0 stay 0.

    Parameters
    ----------
    array : ndarray of shape (n_samples, n_features)

    Returns
    -------
    normalised : ndarray of shape (n_samples, n_features)
    """
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, np.finfo(array.dtype).tiny)


def check_int(value: Any, *, name: str, minimum: int) -> int:
    """Return ``value`` as an int, raising ``ValueError`` if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(
            f"Parameter {name} must be an integer >= {minimum}; got {value!r}. "
            f"Fix it in the method's params."
        )
    return int(value)


def check_float(value: Any, *, name: str, minimum: float, inclusive: bool) -> float:
    """Return ``value`` as a float, raising ``ValueError`` unless it is finite and above ``minimum``.

    With ``inclusive=True`` the value may equal ``minimum``.
    """
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    in_range = is_number and np.isfinite(value) and (
        value >= minimum if inclusive else value > minimum
    )
    if not in_range:
        bound = ">=" if inclusive else ">"
        raise ValueError(
            f"Parameter {name} must be a finite number {bound} {minimum}; got {value!r}. "
            f"Fix it in the method's params."
        )
    return float(value)
