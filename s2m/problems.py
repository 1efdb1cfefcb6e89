"""Seeded test problems: concept sets and a shared gallery, written once to a file.

Every method of a benchmark run reads the same problem file, so all of them
see exactly the same concept sets and the same gallery.

Construction, for the test concepts of one dataset and one base seed:

1. Each test concept reserves ``set_size`` of its images as concept-set
   candidates. Its other images go to the gallery. The reservation depends
   only on the seed, so every protocol of a run shares one gallery and the
   protocols differ only in how the concept sets are made.
2. A protocol with ``categories_per_concept = 2`` makes polysemous concepts.
   The test concepts are put in a seeded cyclic order and concept ``i`` is the
   union of categories ``i`` and ``i + 1``. Its set takes the first
   ``ceil(set_size / 2)`` reserved images of category ``i`` and the last
   ``floor(set_size / 2)`` reserved images of category ``i + 1``, so no image
   is used twice.
3. A fraction ``noise_fraction`` of each concept set, ``round(noise_fraction
   * set_size)`` images, is replaced by noise images. When the dataset has
   images with split ``clutter_noise`` (irrelevant web-search results), noise
   comes from them. Otherwise it comes from the reserved images of the other
   test concepts. Either way no noise image is in the gallery, so a noise
   image never matches a gallery item exactly.
4. Images with split ``clutter_gallery`` are added to the gallery as extra
   negatives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

PROBLEM_FILE_VERSION = 1


@dataclass(frozen=True)
class Protocol:
    """Recipe for the concept sets of one column of the results table.

    Attributes
    ----------
    name : str
        Column name in the results table, for example ``"noise-0.3"``.
    set_size : int
        Number of images ``n`` in every concept set.
    noise_fraction : float
        Fraction of each concept set, in ``[0, 1)``, replaced by noise images.
    categories_per_concept : int
        1 for ordinary concepts, 2 for polysemous concepts (union of two
        categories).
    """

    name: str
    set_size: int
    noise_fraction: float = 0.0
    categories_per_concept: int = 1

    def __post_init__(self):
        if self.set_size < 2:
            raise ValueError(
                f"Protocol {self.name!r}: set_size must be at least 2, got "
                f"{self.set_size}."
            )
        if not 0.0 <= self.noise_fraction < 1.0:
            raise ValueError(
                f"Protocol {self.name!r}: noise_fraction must be in [0, 1), got "
                f"{self.noise_fraction}."
            )
        if self.categories_per_concept not in (1, 2):
            raise ValueError(
                f"Protocol {self.name!r}: categories_per_concept must be 1 or 2, "
                f"got {self.categories_per_concept}."
            )
        if self.n_noise >= self.set_size:
            raise ValueError(
                f"Protocol {self.name!r}: noise_fraction {self.noise_fraction} "
                f"replaces all {self.set_size} images of a concept set. Lower "
                "noise_fraction or raise set_size."
            )

    @property
    def n_noise(self) -> int:
        """Number of noise images in each concept set."""
        return int(round(self.noise_fraction * self.set_size))


@dataclass
class Problem:
    """One retrieval problem: a concept set and the concepts that count as relevant.

    Attributes
    ----------
    concept : str
        Name of the concept, for example ``"caltech101/accordion"`` or
        ``"caltech101/accordion+caltech101/anchor"`` for a polysemous one.
    positive_concepts : tuple of str
        Concepts whose gallery images are relevant.
    concept_set : ndarray of shape (set_size,)
        Image ids of the concept set, noise included.
    is_noise : ndarray of shape (set_size,)
        True where the concept-set image is a noise image.
    """

    concept: str
    positive_concepts: tuple[str, ...]
    concept_set: np.ndarray
    is_noise: np.ndarray


@dataclass
class ProblemSet:
    """All problems of one protocol, with their shared gallery.

    Attributes
    ----------
    protocol : Protocol
    gallery : ndarray of shape (n_gallery,)
        Image ids of the gallery, sorted.
    problems : list of Problem
    seed : int
    dataset_checksum : str
        SHA-256 of the image table the problems were drawn from.
    """

    protocol: Protocol
    gallery: np.ndarray
    problems: list[Problem]
    seed: int
    dataset_checksum: str = ""
    metadata: dict = field(default_factory=dict)

    def relevance(self, image_concepts: np.ndarray) -> np.ndarray:
        """Return the relevance matrix of the gallery.

        Parameters
        ----------
        image_concepts : ndarray of shape (n_images,)
            Concept of every image id of the dataset.

        Returns
        -------
        relevant : ndarray of shape (n_problems, n_gallery), dtype bool
        """
        # Integer codes make the per-problem comparison fast on large galleries.
        codes, names = pd.factorize(np.asarray(image_concepts)[self.gallery])
        code_of = {name: code for code, name in enumerate(names)}
        relevant = np.zeros((len(self.problems), len(self.gallery)), dtype=bool)

        for row, problem in enumerate(self.problems):
            positive_codes = [code_of[c] for c in problem.positive_concepts if c in code_of]
            relevant[row] = np.isin(codes, positive_codes)

        return relevant


def _table_checksum(image_table: pd.DataFrame) -> str:
    columns = image_table[["image_id", "concept", "split"]]
    payload = columns.to_csv(index=False).encode()
    return hashlib.sha256(payload).hexdigest()


def _check_image_table(image_table: pd.DataFrame) -> None:
    missing = {"image_id", "concept", "split"} - set(image_table.columns)
    if missing:
        raise ValueError(
            f"Image table is missing the columns {sorted(missing)}. Rebuild the "
            "processed dataset with the dataset builder."
        )
    expected_ids = np.arange(len(image_table))
    if not np.array_equal(image_table["image_id"].to_numpy(), expected_ids):
        raise ValueError(
            "Image table column image_id must be 0..N-1 in row order. Rebuild "
            "the processed dataset with the dataset builder."
        )


def reserve_concept_sets(
    image_table: pd.DataFrame, set_size: int, seed: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Reserve concept-set candidates of every test concept.

    Parameters
    ----------
    image_table : DataFrame
        Columns ``image_id``, ``concept`` and ``split``, one row per image.
    set_size : int
        Number of reserved images per test concept.
    seed : int

    Returns
    -------
    reserved : dict of str to ndarray of shape (set_size,)
        Reserved image ids of every test concept, in a seeded random order.
    gallery : ndarray of shape (n_gallery,)
        Sorted image ids of the other images of the test concepts, plus the
        ``clutter_gallery`` images.

    Raises
    ------
    ValueError
        If there is no test concept, or a test concept has fewer than
        ``set_size + 1`` images, which would leave nothing of it to retrieve.
    """
    _check_image_table(image_table)
    rng = np.random.default_rng(seed)

    test_images = image_table[image_table["split"] == "meta_test"]
    if test_images.empty:
        raise ValueError(
            "The image table has no image with split 'meta_test'. Check the "
            "dataset split parameters."
        )

    reserved: dict[str, np.ndarray] = {}
    gallery_parts = []

    for concept, group in test_images.groupby("concept", sort=True):
        image_ids = group["image_id"].to_numpy()
        if len(image_ids) <= set_size:
            raise ValueError(
                f"Test concept {concept!r} has {len(image_ids)} images, but a "
                f"concept set of {set_size} needs at least {set_size + 1} so "
                "that the gallery keeps one. Lower set_size or drop small "
                "concepts in the dataset builder."
            )
        shuffled = rng.permutation(image_ids)
        reserved[concept] = shuffled[:set_size]
        gallery_parts.append(shuffled[set_size:])

    clutter = image_table.loc[image_table["split"] == "clutter_gallery", "image_id"]
    gallery_parts.append(clutter.to_numpy())

    gallery = np.sort(np.concatenate(gallery_parts))
    return reserved, gallery


def _polysemous_sets(
    reserved: dict[str, np.ndarray], set_size: int, rng: np.random.Generator
) -> list[tuple[str, tuple[str, ...], np.ndarray]]:
    concepts = sorted(reserved)
    if len(concepts) < 3:
        raise ValueError(
            f"Polysemous concepts need at least 3 test concepts, got "
            f"{len(concepts)}. Use more test concepts or categories_per_concept: 1."
        )

    order = [concepts[i] for i in rng.permutation(len(concepts))]
    first_part = math.ceil(set_size / 2)
    sets = []

    for index, first in enumerate(order):
        second = order[(index + 1) % len(order)]
        members = np.concatenate(
            [reserved[first][:first_part], reserved[second][first_part:]]
        )
        sets.append((f"{first}+{second}", (first, second), members))

    return sets


def _stream_key(name: str) -> int:
    """Map a name to a 32-bit key for a seed sequence, the same in every process (unlike ``hash``)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def _noise_pool(
    image_table: pd.DataFrame, reserved: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Return candidate noise image ids and the concept of each."""
    clutter = image_table[image_table["split"] == "clutter_noise"]
    if not clutter.empty:
        return clutter["image_id"].to_numpy(), clutter["concept"].to_numpy()

    ids = np.concatenate(list(reserved.values()))
    owners = np.concatenate([[concept] * len(v) for concept, v in reserved.items()])
    return ids, owners


def make_problem_set(
    image_table: pd.DataFrame, protocol: Protocol, seed: int
) -> ProblemSet:
    """Draw the problems of one protocol.

    Parameters
    ----------
    image_table : DataFrame
        Columns ``image_id``, ``concept`` and ``split``, one row per image.
    protocol : Protocol
    seed : int
        Base seed of the run. The reservation of concept-set candidates and
        the pairing of polysemous concepts use it alone, so that protocols
        with the same set size share the gallery and the polysemous ones
        share their pairs. The noise draw also uses the protocol name.

    Returns
    -------
    ProblemSet
    """
    reserved, gallery = reserve_concept_sets(image_table, protocol.set_size, seed)
    rng = np.random.default_rng([seed, _stream_key(protocol.name)])

    if protocol.categories_per_concept == 1:
        sets = [(c, (c,), members) for c, members in sorted(reserved.items())]
    else:
        # The pairing uses the seed alone, so that polysemous protocols which differ only in
        # their noise pair the same categories and their columns compare like with like.
        pairing_rng = np.random.default_rng([seed, _stream_key("polysemous pairing")])
        sets = _polysemous_sets(reserved, protocol.set_size, pairing_rng)

    noise_ids, noise_owners = _noise_pool(image_table, reserved)
    owner_codes, owner_names = pd.factorize(noise_owners)
    code_of = {name: code for code, name in enumerate(owner_names)}
    problems = []

    for concept, positives, members in sets:
        is_noise = np.zeros(protocol.set_size, dtype=bool)
        members = members.copy()

        if protocol.n_noise:
            positive_codes = [code_of[c] for c in positives if c in code_of]
            allowed = np.flatnonzero(~np.isin(owner_codes, positive_codes))
            if len(allowed) < protocol.n_noise:
                raise ValueError(
                    f"Only {len(allowed)} noise images are available for concept "
                    f"{concept!r}, but protocol {protocol.name!r} needs "
                    f"{protocol.n_noise}. Lower noise_fraction."
                )
            chosen = noise_ids[rng.choice(allowed, protocol.n_noise, replace=False)]
            slots = rng.choice(protocol.set_size, protocol.n_noise, replace=False)
            members[slots] = chosen
            is_noise[slots] = True

        problems.append(Problem(concept, positives, members, is_noise))

    logger.info(
        "Protocol %s: %d problems, gallery of %d images, %d noise images per set",
        protocol.name,
        len(problems),
        len(gallery),
        protocol.n_noise,
    )
    return ProblemSet(
        protocol=protocol,
        gallery=gallery,
        problems=problems,
        seed=seed,
        dataset_checksum=_table_checksum(image_table),
    )


def write_problem_set(problem_set: ProblemSet, path: str | Path) -> None:
    """Write a problem set to a JSON file."""
    protocol = problem_set.protocol
    payload = {
        "version": PROBLEM_FILE_VERSION,
        "protocol": {
            "name": protocol.name,
            "set_size": protocol.set_size,
            "noise_fraction": protocol.noise_fraction,
            "categories_per_concept": protocol.categories_per_concept,
        },
        "seed": problem_set.seed,
        "dataset_checksum": problem_set.dataset_checksum,
        "metadata": problem_set.metadata,
        "gallery": problem_set.gallery.tolist(),
        "problems": [
            {
                "concept": p.concept,
                "positive_concepts": list(p.positive_concepts),
                "concept_set": p.concept_set.tolist(),
                "is_noise": p.is_noise.tolist(),
            }
            for p in problem_set.problems
        ],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def read_problem_set(path: str | Path) -> ProblemSet:
    """Read a problem set written by :func:`write_problem_set`.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not valid JSON or not a problem file of this version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Problem file {path} not found. Run the make_problems step first "
            "(snakemake creates it)."
        )

    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"Problem file {path} is not valid JSON ({error}). Delete it and "
            "rerun the make_problems step."
        ) from error

    if payload.get("version") != PROBLEM_FILE_VERSION:
        raise ValueError(
            f"Problem file {path} has version {payload.get('version')!r}, "
            f"expected {PROBLEM_FILE_VERSION}. Delete it and rerun the "
            "make_problems step."
        )

    problems = [
        Problem(
            concept=p["concept"],
            positive_concepts=tuple(p["positive_concepts"]),
            concept_set=np.asarray(p["concept_set"], dtype=np.int64),
            is_noise=np.asarray(p["is_noise"], dtype=bool),
        )
        for p in payload["problems"]
    ]
    return ProblemSet(
        protocol=Protocol(**payload["protocol"]),
        gallery=np.asarray(payload["gallery"], dtype=np.int64),
        problems=problems,
        seed=payload["seed"],
        dataset_checksum=payload["dataset_checksum"],
        metadata=payload.get("metadata", {}),
    )
