"""Cached descriptors of the frozen layers of the ImageNet backbone (Caltech-101).

The frozen part of MobileNetV2 runs once per image; meta-training then reads
the cache and trains only the head and any unfrozen blocks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from s2m import rawdata
from s2m.device import configure_threads, select_device
from s2m.pipeline.common import raw_data_dir, seed_everything

logger = logging.getLogger(__name__)

TFLITE_FILE = Path("mobilenet_v2") / "mobilenet_v2_1.0_224_quant.tflite"

#: The quantised MobileNetV2 of the Coral test data, at a fixed commit of its repository.
TFLITE_URL = (
    "https://raw.githubusercontent.com/google-coral/test_data/"
    "104342d2d3480b3e66203073dac24f4e2dbb4c41/mobilenet_v2_1.0_224_quant.tflite"
)
#: SHA-256 of the raw-data mirror's copy, which a download must match.
TFLITE_SHA256 = "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776"


def tflite_model_path(config: dict) -> Path:
    """Return the MobileNetV2 TFLite file of the raw-data folder, checking its SHA-256.

    A missing file is fetched from :data:`TFLITE_URL` when the config has ``download: true``.
    A local file with another digest is used with a logged warning, as the dataset builders
    do with their inputs, and is never replaced.

    Raises
    ------
    FileNotFoundError
        If the file is missing and ``download`` is false.
    """
    path = raw_data_dir(config) / TFLITE_FILE
    if not path.is_file():
        if config.get("download", False):
            return rawdata.download(TFLITE_URL, path, TFLITE_SHA256, "sha256")
        raise FileNotFoundError(
            f"MobileNetV2 model {path} not found. Copy mobilenet_v2_1.0_224_quant.tflite into "
            f"mobilenet_v2/ of the raw-data folder, or set `download: true` in the config to fetch it "
            f"from {TFLITE_URL}."
        )

    record = rawdata.checksum_record(path, TFLITE_SHA256, "sha256")
    if not record["verified"]:
        logger.warning(
            "%s has SHA-256 %s, not the expected %s, so the descriptors may differ from the committed "
            "results. Replace it with the file from %s.",
            path,
            record["digest"],
            TFLITE_SHA256,
            TFLITE_URL,
        )
    return path


def load_backbone(config: dict, kind: str) -> torch.nn.Module:
    """Load the ImageNet MobileNetV2 named by ``kind`` ("tflite" or "torchvision")."""
    from s2m.models import mobilenet_v2

    if kind == "tflite":
        return mobilenet_v2.load_mobilenet_v2_tflite(tflite_model_path(config))
    return mobilenet_v2.load_torchvision_mobilenet_v2()


@torch.no_grad()
def cache_backbone_features_step(
    config: dict, dataset: str, dataset_dir: str | Path, out_path: str | Path, threads: int = 1
) -> None:
    """Run the frozen layers of the backbone on every image and save the result.

    With ``unfreeze_last_blocks = u > 0``, the cache contains the feature maps
    that enter block ``n_blocks - u``, shape (n_images, C, H, W). With
    ``u = 0`` it contains the pooled 1280-d descriptors, shape (n_images, 1280).
    """
    from s2m.datasets.table import load_rgb_image, read_image_table
    from s2m.models.mobilenet_v2 import preprocess

    seed_everything(config["seed"])
    configure_threads(threads)
    device = select_device(config["device"])

    options = config[dataset]["backbone"]
    # Channels-last convolutions ran about 1.7 times faster on a 2-core x86 CPU (torch 2.13).
    backbone = load_backbone(config, options["kind"]).to(device).eval()
    backbone = backbone.to(memory_format=torch.channels_last)
    unfreeze = options.get("unfreeze_last_blocks", 0)
    stop_block = backbone.n_blocks - unfreeze if unfreeze else None

    table = read_image_table(dataset_dir)
    paths = [Path(dataset_dir) / p for p in table["path"]]
    batch_size = options.get("image_batch_size", 64)
    outputs = []

    for start in tqdm(range(0, len(paths), batch_size), desc=f"{dataset} backbone features"):
        images = [load_rgb_image(p) for p in paths[start : start + batch_size]]
        batch = preprocess(images).to(device).contiguous(memory_format=torch.channels_last)
        if stop_block is None:
            features = backbone.pooled_features(batch)
        else:
            features = backbone.forward_features(batch, start=0, end=stop_block)
        outputs.append(features.float().cpu().contiguous().numpy())

    features = np.concatenate(outputs)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    np.save(out_path, features)
    logger.info("Wrote backbone features of shape %s to %s", features.shape, out_path)
