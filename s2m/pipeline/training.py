"""Pipeline step 3: pretrained and meta-trained embeddings, then descriptors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from s2m.device import configure_threads, select_device
from s2m.embeddings import (
    build_embedding,
    compute_descriptors,
    load_embedding,
    load_network_inputs,
    save_embedding,
)
from s2m.pipeline.common import seed_everything
from s2m.problems import Protocol, make_problem_set
from s2m.set_models import SetModelSpec
from s2m.training.metatrain import MetaTrainingOptions, ValidationProblems, meta_train
from s2m.training.pretrain import pretrain_classifier

logger = logging.getLogger(__name__)

def embedding_spec(config: dict, dataset: str) -> dict:
    """Return the embedding spec of ``dataset`` (see :mod:`s2m.embeddings`)."""
    if dataset == "omniglot":
        return dict(config["omniglot"]["embedding"])

    backbone = config[dataset]["backbone"]
    from s2m.models.mobilenet_v2 import FEATURE_DIM

    spec = {"architecture": "backbone_head", "feature_dim": FEATURE_DIM}
    unfreeze = backbone.get("unfreeze_last_blocks", 0)
    if unfreeze:
        from s2m.models.mobilenet_v2 import N_BLOCKS
        from s2m.pipeline.backbone import tflite_model_path

        spec["start_block"] = N_BLOCKS - unfreeze
        spec["tflite_path"] = str(tflite_model_path(config))
    return spec


def set_model_spec(config: dict, variant: str) -> SetModelSpec:
    """Return the set model of the meta-trained variant ``variant``."""
    entry = config["meta_trained"][variant]
    fit_options = {}
    if entry["set_model"] == "gmm":
        fit_options = dict(config.get("mixture", {}))
    return SetModelSpec(entry["set_model"], entry.get("n_components", 1), fit_options)


def run_environment(device: torch.device) -> dict:
    """Return the device and torch version of a training run, for its checkpoint.

    CPU and CUDA runs of the same config give different weights.
    """
    return {"device": str(device), "torch": torch.__version__}


def _prepare(config: dict, threads: int) -> torch.device:
    seed_everything(config["seed"])
    configure_threads(threads)
    return select_device(config["device"])


def pretrain_step(
    config: dict,
    dataset: str,
    dataset_dir: str | Path,
    out_path: str | Path,
    features_path: str | Path | None = None,
    threads: int = 1,
) -> None:
    """Write the pretrained embedding of ``dataset``.

    Omniglot trains the ConvNet as a classifier on the meta-training concepts.
    Caltech-101 uses the ImageNet MobileNetV2 as it is, with an identity head.
    """
    from s2m.datasets.table import read_image_table

    device = _prepare(config, threads)
    spec = embedding_spec(config, dataset)
    network = build_embedding(spec)
    metadata = {"dataset": dataset, "kind": "pretrained", "seed": config["seed"], **run_environment(device)}

    if dataset == "omniglot":
        table = read_image_table(dataset_dir)
        train = table["split"].to_numpy() == "meta_train"
        inputs = load_network_inputs(dataset_dir, spec)[torch.as_tensor(np.array(train))]
        options = config["omniglot"]["pretraining"]
        metadata["history"] = pretrain_classifier(
            network,
            inputs,
            table.loc[train, "concept"].to_numpy(),
            epochs=options["epochs"],
            batch_size=options["batch_size"],
            learning_rate=options["learning_rate"],
            weight_decay=options.get("weight_decay", 0.0),
            seed=config["seed"],
            device=device,
        )

    save_embedding(out_path, network.cpu(), spec, metadata)


def _validation_problems(
    config: dict, dataset: str, table: pd.DataFrame, inputs: torch.Tensor
) -> ValidationProblems | None:
    options = config[dataset]["meta_training"]
    validation = table[table["split"] == "meta_val"]
    concepts = np.sort(validation["concept"].unique())
    if len(concepts) < 3:
        logger.warning("Only %d validation concepts: meta-training keeps the last weights", len(concepts))
        return None

    rng = np.random.default_rng(config["seed"])
    limit = options.get("max_validation_concepts", 200)
    if len(concepts) > limit:
        concepts = np.sort(rng.choice(concepts, limit, replace=False))

    validation = validation[validation["concept"].isin(concepts)]
    sub_table = pd.DataFrame(
        {
            "image_id": np.arange(len(validation)),
            "concept": validation["concept"].to_numpy(),
            "split": "meta_test",
        }
    )
    protocol = Protocol(
        name="validation",
        set_size=options["set_size"],
        noise_fraction=options.get("noise_fraction", 0.0),
    )
    problem_set = make_problem_set(sub_table, protocol, seed=config["seed"])
    rows = torch.tensor(validation["image_id"].to_numpy(), dtype=torch.int64)
    return ValidationProblems(
        inputs=inputs[rows],
        concept_sets=[p.concept_set for p in problem_set.problems],
        gallery=problem_set.gallery,
        relevance=problem_set.relevance(sub_table["concept"].to_numpy()),
    )


def meta_train_step(
    config: dict,
    dataset: str,
    variant: str,
    dataset_dir: str | Path,
    pretrained_path: str | Path,
    out_path: str | Path,
    history_path: str | Path,
    features_path: str | Path | None = None,
    threads: int = 1,
) -> None:
    """Meta-train the variant ``variant`` from the pretrained embedding."""
    from s2m.datasets.table import read_image_table

    device = _prepare(config, threads)
    network, spec, _ = load_embedding(pretrained_path)
    table = read_image_table(dataset_dir)
    inputs = load_network_inputs(dataset_dir, spec, features_path)

    train = table["split"].to_numpy() == "meta_train"
    train_inputs = inputs[torch.as_tensor(np.array(train))]
    labels = table.loc[train, "concept"].to_numpy()

    set_model = set_model_spec(config, variant)
    options = config[dataset]["meta_training"]
    training_options = MetaTrainingOptions(
        **{k: v for k, v in options.items() if k != "max_validation_concepts"},
        seed=config["seed"],
    )
    validation = _validation_problems(config, dataset, table, inputs)

    logger.info(
        "Meta-training %s on %s: set model %s, %d training images",
        variant,
        dataset,
        set_model,
        len(train_inputs),
    )
    history = meta_train(network, train_inputs, labels, set_model, training_options, validation, device)

    metadata = {
        "dataset": dataset,
        "kind": "meta_trained",
        "variant": variant,
        "set_model": set_model.kind,
        "n_components": set_model.n_components,
        "seed": config["seed"],
        **run_environment(device),
        "history": history,
    }
    save_embedding(out_path, network.cpu(), spec, metadata)
    pd.DataFrame(history).to_csv(history_path, index=False)


def descriptors_step(
    config: dict,
    dataset_dir: str | Path,
    checkpoint_path: str | Path,
    out_path: str | Path,
    features_path: str | Path | None = None,
    threads: int = 1,
) -> None:
    """Embed every image of the dataset with a trained embedding."""
    device = _prepare(config, threads)
    network, spec, metadata = load_embedding(checkpoint_path)
    inputs = load_network_inputs(dataset_dir, spec, features_path)
    descriptors = compute_descriptors(network, inputs, device=device, desc=f"descriptors {Path(checkpoint_path).stem}")

    if not np.all(np.isfinite(descriptors)):
        raise FloatingPointError(
            f"The embedding {checkpoint_path} produced non-finite descriptors. "
            "Retrain it, for example with a lower learning rate."
        )

    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    np.save(out_path, descriptors.astype(np.float32))
    logger.info("Wrote descriptors of shape %s to %s", descriptors.shape, out_path)

