"""Toy images and validation problems for the training tests, small enough for a CPU."""

import numpy as np
import torch

from s2m.training.metatrain import ValidationProblems


def toy_images(n_concepts=6, per_concept=12, seed=0):
    """Draw 28x28 images whose concept is a bright square at a concept-specific place, with their labels."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.2, size=(n_concepts * per_concept, 1, 28, 28)).astype(np.float32)
    labels = np.repeat(np.arange(n_concepts), per_concept)
    for index, concept in enumerate(labels):
        row, column = divmod(int(concept), 3)
        images[index, 0, 4 + 8 * row : 10 + 8 * row, 2 + 8 * column : 8 + 8 * column] += 0.8
    return torch.from_numpy(images), labels


def toy_validation(inputs, labels, set_size=4):
    """Build one validation problem per concept: its first ``set_size`` images, against all other images."""
    concept_sets, gallery = [], []
    for concept in np.unique(labels):
        members = np.flatnonzero(labels == concept)
        concept_sets.append(members[:set_size])
        gallery.extend(members[set_size:])
    gallery = np.asarray(gallery)
    relevance = np.stack([labels[gallery] == concept for concept in np.unique(labels)])
    return ValidationProblems(inputs, concept_sets, gallery, relevance)
