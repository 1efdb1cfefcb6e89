"""Pipeline steps 1 and 2: raw data to a processed dataset, then problem files."""

from __future__ import annotations

import logging
from pathlib import Path

from s2m.pipeline.common import raw_data_dir
from s2m.problems import Protocol, make_problem_set, write_problem_set

logger = logging.getLogger(__name__)


def build_dataset_step(config: dict, dataset: str, out_dir: str | Path) -> None:
    """Build the processed dataset ``dataset`` into ``out_dir``."""
    from s2m.datasets import build_dataset

    params = dict(config[dataset]["build"])
    if dataset == "caltech101":
        params["split_fractions"] = tuple(params["split_fractions"])
    if dataset == "omniglot":
        params["rotations"] = tuple(params["rotations"])

    build_dataset(
        dataset,
        raw_data_dir(config),
        Path(out_dir),
        seed=config["seed"],
        download=config["download"],
        **params,
    )


def protocol_from_config(config: dict, dataset: str, name: str) -> Protocol:
    """Return the protocol ``name`` of ``dataset``.

    Raises
    ------
    KeyError
        If the dataset has no such protocol, listing the ones it has.
    """
    protocols = config[dataset]["protocols"]
    if name not in protocols:
        raise KeyError(
            f"Protocol {name!r} is not defined for {dataset}; defined: {sorted(protocols)}."
        )
    return Protocol(name=name, **protocols[name])


def make_problems_step(
    config: dict, dataset: str, dataset_dir: str | Path, protocol_name: str, out_path: str | Path
) -> None:
    """Draw the test problems of one protocol and write them to ``out_path``."""
    from s2m.datasets.table import read_image_table

    image_table = read_image_table(dataset_dir)
    protocol = protocol_from_config(config, dataset, protocol_name)
    problem_set = make_problem_set(image_table, protocol, seed=config["seed"])
    problem_set.metadata = {"dataset": dataset}
    write_problem_set(problem_set, out_path)
    logger.info("Wrote %d problems to %s", len(problem_set.problems), out_path)
