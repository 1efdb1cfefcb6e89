"""Pretraining of the embedding as a classifier on the meta-training concepts.

For Omniglot this replaces ImageNet pretraining: the Set2Model variants
and the baselines start from descriptors that already separate the training
concepts.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from s2m.models.convnet import LinearClassifier

logger = logging.getLogger(__name__)


def pretrain_classifier(
    network: nn.Module,
    inputs: torch.Tensor,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> list[dict]:
    """Train ``network`` with a cosine softmax classifier over the concepts.

    Parameters
    ----------
    network : nn.Module
        Maps inputs of shape (batch, ...) to L2-normalised descriptors of
        shape (batch, D). It is trained in place.
    inputs : Tensor of shape (n_images, ...)
    labels : ndarray of shape (n_images,)
        Concept of each image.
    epochs, batch_size : int
    learning_rate, weight_decay : float
        Adam settings.
    seed : int
        Seeds the classifier initialisation and the batch order.
    device : torch.device or str
    show_progress : bool

    Returns
    -------
    list of dict
        One record per epoch: ``epoch``, ``loss``, ``accuracy``.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}.")

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    _, codes = np.unique(labels, return_inverse=True)
    targets = torch.as_tensor(codes, dtype=torch.long)
    n_classes = int(codes.max()) + 1

    network.to(device).train()
    classifier = LinearClassifier(network.descriptor_dim, n_classes).to(device)
    parameters = list(network.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay)

    n_batches = (len(inputs) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * n_batches)
    history = []
    logger.info(
        "Pretraining on %d images of %d concepts for %d epochs", len(inputs), n_classes, epochs
    )

    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total_loss, total_correct = 0.0, 0
        batches = tqdm(
            range(n_batches), desc=f"pretrain epoch {epoch + 1}/{epochs}", disable=not show_progress
        )

        for batch in batches:
            index = order[batch * batch_size : (batch + 1) * batch_size]
            x = inputs[index].to(device)
            y = targets[index].to(device)

            logits = classifier(network(x))
            loss = F.cross_entropy(logits, y)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

            total_loss += loss.item() * len(index)
            total_correct += (logits.argmax(dim=1) == y).sum().item()
            batches.set_postfix(loss=f"{loss.item():.3f}")

        record = {
            "epoch": epoch + 1,
            "loss": total_loss / len(inputs),
            "accuracy": total_correct / len(inputs),
        }
        history.append(record)
        logger.info(
            "Pretraining epoch %d: loss %.4f, training accuracy %.4f",
            record["epoch"],
            record["loss"],
            record["accuracy"],
        )

    return history
