"""Embedding networks: construction from a spec, checkpoints and descriptors.

An embedding spec is a plain dict, stored in every checkpoint so that a
checkpoint can be rebuilt without the config:

``{"architecture": "convnet", "channels": 64, "descriptor_dim": 64}``
    The four-block ConvNet on raw images (Omniglot).
``{"architecture": "backbone_head", "feature_dim": 1280}``
    A linear head on cached backbone descriptors (Caltech-101 with a frozen
    MobileNetV2). The head starts as the identity, so before meta-training the
    embedding is the L2-normalised backbone descriptor.
``{"architecture": "backbone_head", "feature_dim": 1280, "tflite_path": ..., "start_block": b}``
    The same head after MobileNetV2 blocks ``b`` and later, which are
    trained too; the cache then holds the feature maps that enter block ``b``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from s2m.models.convnet import ConvNetEmbedding

logger = logging.getLogger(__name__)

ARCHITECTURES = ("convnet", "backbone_head")


class MobileNetTail(nn.Module):
    """MobileNetV2 blocks from ``start_block`` on, followed by global average pooling.

    Shapes
    ------
    input : (batch, C, H, W), the feature maps that enter ``start_block``
    output : (batch, 1280)
    """

    def __init__(self, backbone: nn.Module, start_block: int):
        super().__init__()
        self.backbone = backbone
        self.start_block = start_block

    def forward(self, maps: Tensor) -> Tensor:
        return self.backbone.pooled_features(maps, start=self.start_block)


class BackboneHeadEmbedding(nn.Module):
    """Linear head on backbone descriptors, initialised to the identity.

    Shapes
    ------
    input : (batch, feature_dim) cached descriptors, or the maps ``tail`` takes
    output : (batch, feature_dim), unit L2 norm
    """

    def __init__(self, feature_dim: int, tail: nn.Module | None = None):
        super().__init__()
        self.tail = tail
        self.head = nn.Linear(feature_dim, feature_dim, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(feature_dim))
        self.descriptor_dim = feature_dim

    def forward(self, inputs: Tensor) -> Tensor:
        features = inputs if self.tail is None else self.tail(inputs)
        return F.normalize(self.head(features), dim=1)


def build_embedding(spec: dict) -> nn.Module:
    """Build an untrained embedding network from its spec (see the module docstring).

    Raises
    ------
    ValueError
        If the architecture is unknown.
    """
    architecture = spec.get("architecture")

    if architecture == "convnet":
        return ConvNetEmbedding(
            in_channels=1,
            channels=int(spec.get("channels", 64)),
            descriptor_dim=int(spec.get("descriptor_dim", 64)),
        )

    if architecture == "backbone_head":
        tail = None
        if spec.get("start_block") is not None:
            from s2m.models.mobilenet_v2 import load_mobilenet_v2_tflite

            backbone = load_mobilenet_v2_tflite(spec["tflite_path"])
            tail = MobileNetTail(backbone, int(spec["start_block"]))
        return BackboneHeadEmbedding(int(spec["feature_dim"]), tail)

    raise ValueError(
        f"Unknown embedding architecture {architecture!r}: expected one of {ARCHITECTURES}."
    )


def save_embedding(path: str | Path, network: nn.Module, spec: dict, metadata: dict) -> None:
    """Save a network's weights together with its spec and training metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"spec": spec, "metadata": metadata, "state_dict": network.state_dict()}
    torch.save(state, path)


def load_embedding(path: str | Path, map_location="cpu") -> tuple[nn.Module, dict, dict]:
    """Load a checkpoint written by :func:`save_embedding`.

    Returns
    -------
    network : nn.Module, in eval mode
    spec : dict
    metadata : dict
    """
    state = _read_checkpoint(path, map_location)
    network = build_embedding(state["spec"])
    network.load_state_dict(state["state_dict"])
    network.eval()
    return network, state["spec"], state["metadata"]


def read_embedding_metadata(path: str | Path) -> dict:
    """Return the metadata of a checkpoint written by :func:`save_embedding`, without building its network."""
    return _read_checkpoint(path, "cpu")["metadata"]


def _read_checkpoint(path: str | Path, map_location) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Embedding checkpoint {path} not found. Run the training step first.")
    return torch.load(path, map_location=map_location, weights_only=False)


def load_network_inputs(dataset_dir: str | Path, spec: dict, features_path: str | Path | None = None) -> Tensor:
    """Load the inputs of every image of a dataset in the form the network takes.

    Parameters
    ----------
    dataset_dir : path
        Processed dataset folder.
    spec : dict
        Embedding spec.
    features_path : path, optional
        Cached backbone features (``.npy``), required by ``backbone_head``.

    Returns
    -------
    Tensor of shape (n_images, ...)
        Images of shape (n, 1, H, W) in [0, 1] for ``convnet``; cached
        features for ``backbone_head``.
    """
    if spec["architecture"] == "convnet":
        images_path = Path(dataset_dir) / "images.npy"
        if not images_path.is_file():
            raise FileNotFoundError(
                f"Image array {images_path} not found. Rebuild the dataset (snakemake rule build_dataset)."
            )
        images = np.load(images_path)
        return torch.from_numpy(images).unsqueeze(1).float().div_(255.0)

    if features_path is None:
        raise ValueError("The backbone_head architecture needs features_path (cached backbone features).")
    return torch.from_numpy(np.load(features_path).astype(np.float32))


@torch.no_grad()
def compute_descriptors(
    network: nn.Module,
    inputs: Tensor,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
    desc: str = "descriptors",
) -> np.ndarray:
    """Embed every input with ``network`` in eval mode.

    Parameters
    ----------
    network : nn.Module
    inputs : Tensor of shape (n, ...)
    batch_size : int
    device : torch.device or str

    Returns
    -------
    ndarray of shape (n, D), float32
    """
    was_training = network.training
    network.to(device).eval()
    outputs = []

    for start in tqdm(range(0, len(inputs), batch_size), desc=desc, disable=not show_progress):
        batch = inputs[start : start + batch_size].to(device)
        outputs.append(network(batch).float().cpu())

    network.train(was_training)
    return torch.cat(outputs).numpy()
