"""Retrieval evaluation: average precision per concept and bootstrapped mAP.

A problem is one concept set. The method fits on the set's descriptors and
scores every gallery descriptor, and the average precision (AP) of that
ranking is computed against the gallery items relevant to the concept.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "MAPEstimate",
    "average_precision",
    "evaluate_problems",
    "mean_average_precision",
]

DEFAULT_BATCH_SIZE = 64

# Upper bound on the number of resampled indices held at once by the bootstrap
# (8 bytes each), so 10,000 resamples of thousands of concepts fit in memory.
_BOOTSTRAP_CHUNK_ELEMENTS = 2_000_000


def average_precision(
    scores: np.ndarray, relevant: np.ndarray, *, problem: str | None = None
) -> float:
    """Compute the average precision of ranking the gallery by ``scores``.

    Uses ``sklearn.metrics.average_precision_score``: the mean, over relevant
    items, of the precision at their rank. Gallery items with tied scores share
    one threshold, so a tie counts as one step of the precision-recall curve
    instead of being broken in some order.

    Parameters
    ----------
    scores : ndarray of shape (M,)
        Higher means more likely relevant. Must be finite.
    relevant : ndarray of shape (M,)
        Boolean relevance of every gallery item (0/1 integers are accepted).
    problem : str, optional
        Name of the problem (e.g. the concept), used in error messages.

    Returns
    -------
    ap : float
        In [0, 1].

    Raises
    ------
    ValueError
        If shapes differ, scores are not finite, relevance is not boolean, or
        no item is relevant.
    """
    label = f" for problem {problem!r}" if problem is not None else ""
    scores = np.asarray(scores)
    relevant = _check_relevance(relevant, label=label)

    if scores.ndim != 1 or scores.shape != relevant.shape:
        raise ValueError(
            f"scores and relevant must be 1-D arrays of the same length{label}; got "
            f"shapes {scores.shape} and {relevant.shape}."
        )

    if not np.all(np.isfinite(scores)):
        n_bad = int(np.sum(~np.isfinite(scores)))
        raise ValueError(
            f"{n_bad} of {scores.size} scores{label} are NaN or infinite. Check the "
            f"method's score() output."
        )

    if not relevant.any():
        raise ValueError(
            f"No gallery item is relevant{label}, so average precision is undefined. "
            f"Remove this problem or add relevant items to the gallery."
        )

    return float(average_precision_score(relevant, scores))


def _check_relevance(relevant: Any, *, label: str) -> np.ndarray:
    relevant = np.asarray(relevant)
    if relevant.dtype == bool:
        return relevant

    is_integer = np.issubdtype(relevant.dtype, np.integer)
    if not (is_integer and np.isin(relevant, (0, 1)).all()):
        raise ValueError(
            f"relevant must be a boolean array{label}; got dtype {relevant.dtype}. "
            f"Pass a boolean mask of relevant gallery items."
        )
    return relevant.astype(bool)


def evaluate_problems(
    method: Any,
    descriptors: np.ndarray,
    concept_sets: Sequence[np.ndarray],
    gallery: np.ndarray,
    relevance: np.ndarray,
    concepts: Sequence[str],
    progress_desc: str | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> pd.DataFrame:
    """Fit ``method`` on every concept set, score the gallery and compute AP per problem.

    If ``method`` has a ``fit_score_batch(sets, gallery) -> (len(sets), M)``
    method, problems are passed to it ``batch_size`` at a time. Otherwise each
    problem runs ``method.fit(descriptors[set]).score(descriptors[gallery])``.

    Parameters
    ----------
    method : SetMethod or object with ``fit``/``score`` or ``fit_score_batch``
        Method to evaluate. It must already hold any background it needs.
    descriptors : ndarray of shape (N, D)
        Descriptors of all images; sets and gallery index into it.
    concept_sets : sequence of P int arrays of shape (n_i,)
        Row indices into ``descriptors`` of each concept set.
    gallery : ndarray of shape (M,)
        Row indices into ``descriptors`` of the gallery, shared by all problems.
    relevance : ndarray of shape (P, M)
        ``relevance[p, j]`` is True if gallery item ``j`` shows concept ``p``.
    concepts : sequence of P str
        Concept name of each problem.
    progress_desc : str, optional
        Label of the progress bar.
    batch_size : int, default=64
        Number of problems per ``fit_score_batch`` call.

    Returns
    -------
    results : DataFrame with P rows
        Columns ``concept``, ``average_precision``, ``n_relevant`` (relevant
        gallery items) and ``set_size`` (images in the set, noise included).

    Raises
    ------
    ValueError
        On inconsistent shapes, out-of-range indices, a problem with no
        relevant gallery item, or a non-finite score (the message names the
        method and the concept).
    """
    descriptors = np.asarray(descriptors)
    gallery = np.asarray(gallery)
    relevance = np.asarray(relevance)
    concept_sets = [np.asarray(concept_set) for concept_set in concept_sets]
    _check_problems(descriptors, concept_sets, gallery, relevance, concepts)
    relevance = relevance.astype(bool)

    gallery_descriptors = descriptors[gallery]
    fit_score_batch = getattr(method, "fit_score_batch", None)
    if callable(fit_score_batch):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
        score_rows = _score_batched(
            method,
            fit_score_batch,
            descriptors,
            concept_sets,
            gallery_descriptors,
            batch_size,
            progress_desc,
        )
    else:
        score_rows = _score_one_by_one(
            method, descriptors, concept_sets, gallery_descriptors, concepts, progress_desc
        )

    rows = []
    problems = zip(concepts, concept_sets, score_rows, relevance)
    for concept, concept_set, scores, relevant in problems:
        if not np.all(np.isfinite(scores)):
            n_bad = int(np.sum(~np.isfinite(scores)))
            raise ValueError(
                f"{type(method).__name__} returned {n_bad} of {scores.size} scores as NaN or infinite for "
                f"concept {concept!r}. Check its score() output, or fit_score_batch() where it has one."
            )

        rows.append(
            {
                "concept": concept,
                "average_precision": average_precision(scores, relevant, problem=concept),
                "n_relevant": int(relevant.sum()),
                "set_size": int(concept_set.size),
            }
        )

    results = pd.DataFrame(rows, columns=["concept", "average_precision", "n_relevant", "set_size"])
    logger.info(
        "Evaluated %d problems with %s: mean AP %.4f.",
        len(results),
        type(method).__name__,
        results["average_precision"].mean(),
    )
    return results


def _check_problems(
    descriptors: np.ndarray,
    concept_sets: list[np.ndarray],
    gallery: np.ndarray,
    relevance: np.ndarray,
    concepts: Sequence[str],
) -> None:
    if descriptors.ndim != 2:
        raise ValueError(f"descriptors must have shape (N, D); got shape {descriptors.shape}.")
    n_images = descriptors.shape[0]

    _check_indices(gallery, n_images, what="gallery")
    if gallery.size == 0:
        raise ValueError("gallery is empty. It must index at least one descriptor.")

    n_problems = len(concept_sets)
    if len(concepts) != n_problems:
        raise ValueError(
            f"Got {n_problems} concept sets but {len(concepts)} concept names. Pass one "
            f"name per set."
        )
    if relevance.shape != (n_problems, gallery.size):
        raise ValueError(
            f"relevance must have shape (n_problems, n_gallery) = ({n_problems}, "
            f"{gallery.size}); got shape {relevance.shape}."
        )

    for concept, concept_set in zip(concepts, concept_sets):
        _check_indices(concept_set, n_images, what=f"concept set of {concept!r}")
        if concept_set.size == 0:
            raise ValueError(f"Concept set of {concept!r} is empty. It needs at least one image.")

    no_relevant = [concept for concept, row in zip(concepts, relevance) if not row.any()]
    if no_relevant:
        raise ValueError(
            f"No gallery item is relevant for concept(s) {no_relevant}, so average "
            f"precision is undefined. Remove these problems or add relevant items."
        )


def _check_indices(indices: np.ndarray, n_images: int, *, what: str) -> None:
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"{what} must be a 1-D integer array of row indices; got shape "
            f"{indices.shape} and dtype {indices.dtype}."
        )
    if indices.size and (indices.min() < 0 or indices.max() >= n_images):
        raise ValueError(
            f"{what} has indices in [{indices.min()}, {indices.max()}], outside the "
            f"{n_images} rows of descriptors."
        )


def _score_one_by_one(
    method: Any,
    descriptors: np.ndarray,
    concept_sets: list[np.ndarray],
    gallery_descriptors: np.ndarray,
    concepts: Sequence[str],
    progress_desc: str | None,
) -> list[np.ndarray]:
    n_gallery = gallery_descriptors.shape[0]
    score_rows = []
    for concept, concept_set in zip(
        concepts, tqdm(concept_sets, desc=progress_desc, unit="problem")
    ):
        fitted = method.fit(descriptors[concept_set])
        if fitted is None:
            raise ValueError(
                f"{type(method).__name__}.fit returned None for concept {concept!r}; "
                "end fit with 'return self', so that fit(...).score(...) works."
            )

        scores = np.asarray(fitted.score(gallery_descriptors))
        if scores.shape != (n_gallery,):
            raise ValueError(
                f"{type(method).__name__}.score returned shape {scores.shape} for concept "
                f"{concept!r}; expected ({n_gallery},), one score per gallery item."
            )
        score_rows.append(scores)
    return score_rows


def _score_batched(
    method: Any,
    fit_score_batch: Any,
    descriptors: np.ndarray,
    concept_sets: list[np.ndarray],
    gallery_descriptors: np.ndarray,
    batch_size: int,
    progress_desc: str | None,
) -> list[np.ndarray]:
    n_gallery = gallery_descriptors.shape[0]
    score_rows: list[np.ndarray] = []
    with tqdm(total=len(concept_sets), desc=progress_desc, unit="problem") as progress:
        for start in range(0, len(concept_sets), batch_size):
            batch_sets = concept_sets[start : start + batch_size]
            batch = [descriptors[concept_set] for concept_set in batch_sets]

            scores = np.asarray(fit_score_batch(batch, gallery_descriptors))
            if scores.shape != (len(batch), n_gallery):
                raise ValueError(
                    f"{type(method).__name__}.fit_score_batch returned shape {scores.shape} for problems "
                    f"{start}..{start + len(batch) - 1}; expected ({len(batch)}, {n_gallery})."
                )

            score_rows.extend(scores)
            progress.update(len(batch))
    return score_rows


class MAPEstimate(NamedTuple):
    """Mean average precision over concepts with a bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n_concepts: int


def mean_average_precision(
    aps: np.ndarray,
    n_bootstrap: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> MAPEstimate:
    """Compute mAP and a percentile bootstrap interval over concepts.

    Each of ``n_bootstrap`` replicates resamples the concepts with replacement
    and takes the mean of their APs. The interval is given by the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the
    replicate means. The same inputs and seed give the same interval.

    Parameters
    ----------
    aps : array-like of shape (n_concepts,)
        Average precision of every concept, finite.
    n_bootstrap : int, default=10000
        Number of bootstrap replicates.
    confidence : float, default=0.95
        Coverage of the interval, in (0, 1).
    seed : int, default=0
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    estimate : MAPEstimate
        ``mean`` of the APs, interval ``low`` and ``high``, ``n_concepts``.

    Warns
    -----
    RuntimeWarning
        If ``aps`` contains a single concept, whose interval has zero width.
    """
    aps = np.asarray(aps, dtype=np.float64)
    if aps.ndim != 1 or aps.size == 0:
        raise ValueError(
            f"aps must be a non-empty 1-D array of per-concept APs; got shape {aps.shape}."
        )
    if not np.all(np.isfinite(aps)):
        raise ValueError(f"aps contains {int(np.sum(~np.isfinite(aps)))} NaN or infinite values.")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be a positive integer; got {n_bootstrap!r}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}.")

    if aps.size == 1:
        message = (
            "mean_average_precision got the AP of 1 concept, so every bootstrap replicate is that AP "
            "and the interval has zero width. Evaluate more concepts for a meaningful interval."
        )
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    replicate_means = _bootstrap_means(aps, n_bootstrap, np.random.default_rng(seed))
    alpha = 1.0 - confidence
    low, high = np.quantile(replicate_means, [alpha / 2, 1.0 - alpha / 2])
    return MAPEstimate(float(aps.mean()), float(low), float(high), int(aps.size))


def _bootstrap_means(aps: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """Return the means of ``n_bootstrap`` resamples of ``aps``, drawn in chunks to bound memory."""
    n_concepts = aps.size
    rows_per_chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n_concepts)
    means = np.empty(n_bootstrap)
    for start in range(0, n_bootstrap, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_bootstrap)
        indices = rng.integers(0, n_concepts, size=(stop - start, n_concepts))
        means[start:stop] = aps[indices].mean(axis=1)
    return means
