"""Meta-training of an embedding through a set model with the histogram loss.

Each step draws a batch of episodes (concept set, positives, negatives),
embeds their images, fits the set model to each concept set, scores the
positives and negatives under it and minimises the histogram loss of those
scores. The embedding that scores best on the validation problems is kept.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from s2m.embeddings import compute_descriptors
from s2m.losses import histogram_loss, standardise_episode_scores
from s2m.set_models import Set2ModelScorer, SetModelSpec, score_queries
from s2m.training.episodes import EpisodeSampler

logger = logging.getLogger(__name__)


@dataclass
class MetaTrainingOptions:
    """Settings of :func:`meta_train`.

    Attributes
    ----------
    steps : int
        Number of optimiser steps.
    episodes_per_step : int
    set_size, n_positives, n_negatives : int
        Images per concept set, positives and negatives of an episode.
    noise_fraction : float
        Fraction of each training concept set replaced by other concepts.
    learning_rate, weight_decay : float
        Adam settings; the learning rate follows a cosine schedule to zero.
    n_bins : int
        Histogram nodes of the loss.
    validate_every : int
        Steps between validations; the last step is always validated.
    seed : int
    """

    steps: int = 300
    episodes_per_step: int = 8
    set_size: int = 10
    n_positives: int = 10
    n_negatives: int = 40
    noise_fraction: float = 0.0
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    n_bins: int = 50
    validate_every: int = 100
    seed: int = 0


@dataclass
class ValidationProblems:
    """Retrieval problems on the meta-validation concepts.

    Attributes
    ----------
    inputs : Tensor of shape (n_images, ...)
        Network inputs of the validation images.
    concept_sets : list of ndarray of int
        Row indices into ``inputs`` for each problem.
    gallery : ndarray of int
        Row indices into ``inputs``.
    relevance : ndarray of shape (n_problems, n_gallery), dtype bool
    """

    inputs: Tensor
    concept_sets: list
    gallery: np.ndarray
    relevance: np.ndarray


def validation_map(
    network: nn.Module, problems: ValidationProblems, spec: SetModelSpec, device
) -> float:
    """Return the mAP of the set model on the validation problems."""
    from sklearn.metrics import average_precision_score

    descriptors = compute_descriptors(network, problems.inputs, device=device, show_progress=False)
    scorer = Set2ModelScorer(spec, device=device)
    sets = [descriptors[index] for index in problems.concept_sets]
    scores = scorer.fit_score_batch(sets, descriptors[problems.gallery])

    aps = [average_precision_score(relevant, row) for relevant, row in zip(problems.relevance, scores)]
    return float(np.mean(aps))


def _episode_loss(
    network: nn.Module, inputs: Tensor, batch, spec: SetModelSpec, n_bins: int, device, seed: int
) -> Tensor:
    index = np.concatenate(
        [batch.concept_sets.ravel(), batch.positives.ravel(), batch.negatives.ravel()]
    )
    unique, inverse = np.unique(index, return_inverse=True)
    descriptors = network(inputs[torch.as_tensor(unique)].to(device))
    descriptors = descriptors[torch.as_tensor(inverse, device=device)]

    n_episodes, set_size = batch.concept_sets.shape
    n_positives = batch.positives.shape[1]
    n_set_images = n_episodes * set_size
    n_positive_images = n_episodes * n_positives

    concept_sets = descriptors[:n_set_images].reshape(n_episodes, set_size, -1)
    positives = descriptors[n_set_images : n_set_images + n_positive_images]
    negatives = descriptors[n_set_images + n_positive_images :]
    queries = torch.cat(
        [positives.reshape(n_episodes, n_positives, -1), negatives.reshape(n_episodes, -1, positives.shape[-1])],
        dim=1,
    )

    scores = score_queries(spec, concept_sets, queries, seed=seed)
    positive_scores, negative_scores = standardise_episode_scores(
        scores[:, :n_positives], scores[:, n_positives:]
    )
    return histogram_loss(positive_scores.reshape(-1), negative_scores.reshape(-1), n_bins)


def meta_train(
    network: nn.Module,
    inputs: Tensor,
    labels: np.ndarray,
    spec: SetModelSpec,
    options: MetaTrainingOptions,
    validation: ValidationProblems | None = None,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> list[dict]:
    """Meta-train ``network`` in place through the set model ``spec``.

    Parameters
    ----------
    network : nn.Module
        Maps inputs of shape (batch, ...) to L2-normalised descriptors.
    inputs : Tensor of shape (n_images, ...)
        Inputs of the meta-training images.
    labels : ndarray of shape (n_images,)
        Concept of each meta-training image.
    spec : SetModelSpec
    options : MetaTrainingOptions
    validation : ValidationProblems, optional
        When given, the weights with the best validation mAP are restored at
        the end; otherwise the last weights are kept.
    device : torch.device or str

    Returns
    -------
    list of dict
        The training history: ``step``, ``loss`` (mean over the steps since
        the previous record) and, on validation steps, ``validation_map``.
    """
    torch.manual_seed(options.seed)
    sampler = EpisodeSampler(
        labels,
        options.set_size,
        options.n_positives,
        options.n_negatives,
        options.noise_fraction,
        options.seed,
    )

    network.to(device).train()
    optimizer = torch.optim.Adam(
        network.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.steps)

    history: list[dict] = []
    best_map, best_state = -np.inf, None
    running_losses: list[float] = []

    if validation is not None:
        best_map = validation_map(network, validation, spec, device)
        best_state = copy.deepcopy(network.state_dict())
        history.append({"step": 0, "loss": float("nan"), "validation_map": best_map})
        logger.info("Validation mAP before meta-training: %.4f", best_map)

    progress = tqdm(range(1, options.steps + 1), desc=f"meta-train {spec.kind}", disable=not show_progress)
    for step in progress:
        batch = sampler.sample(options.episodes_per_step)
        loss = _episode_loss(network, inputs, batch, spec, options.n_bins, device, options.seed + step)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        running_losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.4f}")

        if step % options.validate_every and step != options.steps:
            continue

        record = {"step": step, "loss": float(np.mean(running_losses))}
        running_losses = []

        if validation is not None:
            record["validation_map"] = validation_map(network, validation, spec, device)
            if record["validation_map"] > best_map:
                best_map = record["validation_map"]
                best_state = copy.deepcopy(network.state_dict())
            network.train()

        history.append(record)
        logger.info("Meta-training step %d: %s", step, record)

    if best_state is not None:
        network.load_state_dict(best_state)
        logger.info("Kept the weights with validation mAP %.4f", best_map)

    return history
