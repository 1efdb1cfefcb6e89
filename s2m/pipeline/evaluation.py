"""Pipeline steps 4 and 5: per-concept APs of each method, then tables and figures."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from s2m.device import configure_threads
from s2m.pipeline.common import seed_everything
from s2m.pipeline.training import set_model_spec
from s2m.problems import read_problem_set

logger = logging.getLogger(__name__)


def method_names(config: dict) -> list[str]:
    """Return every method of the tables: the baselines, then the meta-trained variants."""
    return list(config["baselines"]) + list(config["meta_trained"])


def method_embedding(config: dict, method: str) -> str:
    """Return the embedding a method scores with: 'pretrained' for baselines, else its own."""
    if method in config["baselines"]:
        return "pretrained"
    if method in config["meta_trained"]:
        return method
    raise KeyError(f"Unknown method {method!r}; configured: {method_names(config)}.")


def method_label(config: dict, method: str) -> str:
    """Return the display name of a method."""
    if method in config["baselines"]:
        return config["baselines"][method]["label"]
    return config["meta_trained"][method]["label"]


def build_method(config: dict, method: str, device: str = "cpu"):
    """Instantiate a method that fits on concept-set descriptors and scores a gallery."""
    from baselines import get_baseline
    from s2m.set_models import Set2ModelScorer

    if method in config["baselines"]:
        return get_baseline(method, **config["baselines"][method].get("params", {}))
    return Set2ModelScorer(set_model_spec(config, method), device=device, seed=config["seed"])


def evaluate_step(
    config: dict,
    dataset: str,
    method: str,
    dataset_dir: str | Path,
    descriptors_path: str | Path,
    problems_paths: list[str | Path],
    out_path: str | Path,
) -> None:
    """Compute the average precision of one method on every problem of the given protocols.

    Writes one CSV with a row per (protocol, concept): columns ``method``,
    ``protocol``, ``concept``, ``average_precision``, ``n_relevant``,
    ``set_size`` and ``n_noise``.
    """
    from s2m.datasets.table import read_image_table
    from s2m.evaluation import evaluate_problems

    seed_everything(config["seed"])
    configure_threads(1)
    table = read_image_table(dataset_dir)
    descriptors = np.load(descriptors_path)

    if len(descriptors) != len(table):
        raise ValueError(
            f"{descriptors_path} contains {len(descriptors)} descriptors but the dataset "
            f"has {len(table)} images. Delete it and rerun the descriptors step."
        )

    instance = build_method(config, method)
    if getattr(instance, "needs_background", False):
        train = table["split"].to_numpy() == "meta_train"
        instance.set_background(descriptors[train], table.loc[train, "concept"].to_numpy())

    concepts = table["concept"].to_numpy()
    results = []

    for problems_path in problems_paths:
        problem_set = read_problem_set(problems_path)
        aps = evaluate_problems(
            instance,
            descriptors,
            [p.concept_set for p in problem_set.problems],
            problem_set.gallery,
            problem_set.relevance(concepts),
            [p.concept for p in problem_set.problems],
            progress_desc=f"{method} {problem_set.protocol.name}",
        )
        aps.insert(0, "protocol", problem_set.protocol.name)
        aps.insert(0, "method", method)
        aps["n_noise"] = [int(p.is_noise.sum()) for p in problem_set.problems]
        results.append(aps)

        logger.info(
            "%s on %s/%s: mAP %.4f over %d concepts",
            method,
            dataset,
            problem_set.protocol.name,
            aps["average_precision"].mean(),
            len(aps),
        )

    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    pd.concat(results, ignore_index=True).to_csv(out_path, index=False)
