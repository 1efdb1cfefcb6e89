"""Read and write the tables of a processed dataset folder.

A builder writes these files into its output folder:

``images.csv``
    One row per image. Row ``i`` belongs to pixel or descriptor row ``i``.
    Required columns: ``image_id`` (0..N-1, equal to the row number),
    ``concept`` (string id, one per concept), ``split`` (one of :data:`SPLITS`)
    and ``path`` (image file relative to the dataset folder, empty when the
    pixels are stored in ``images.npy``). Builders may add more columns.
``concepts.csv``
    One row per (concept, split) pair with ``concept``, ``split`` and
    ``n_images``, plus builder-specific columns. Every real concept has one
    split. The clutter pseudo-concept of Caltech-101 has two rows, one for
    ``clutter_noise`` and one for ``clutter_gallery``.
``manifest.json``
    Builder name, parameters, seed, input checksums and counts per split. A
    rebuild deletes the old one first and writes the new one last, so its
    presence marks a complete build.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

logger = logging.getLogger(__name__)

SPLITS = ("meta_train", "meta_val", "meta_test", "clutter_noise", "clutter_gallery")
IMAGE_TABLE = "images.csv"
CONCEPT_TABLE = "concepts.csv"
MANIFEST = "manifest.json"
IMAGE_COLUMNS = ("image_id", "concept", "split", "path")
CONCEPT_COLUMNS = ("concept", "split", "n_images")

_STRING_COLUMNS = {"concept": str, "split": str, "path": str}


def read_image_table(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """Read and validate ``images.csv`` of a processed dataset folder.

    Returns:
        DataFrame with one row per image: ``image_id`` (int, equal to the row
        number), ``concept`` (str), ``split`` (str, one of :data:`SPLITS`),
        ``path`` (str, "" when pixels are in ``images.npy``) and any extra
        columns the builder wrote.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file cannot be parsed or breaks the format. The message
            names the file and the problem.
    """
    path = Path(dataset_dir) / IMAGE_TABLE
    table = _read_csv(path)
    _require_columns(path, table, IMAGE_COLUMNS)

    image_ids = table["image_id"]
    is_integer = pd.api.types.is_integer_dtype(image_ids)
    if not is_integer or not np.array_equal(image_ids, np.arange(len(image_ids))):
        raise ValueError(
            f"Image table {path} is malformed: column image_id must be 0, 1, ..., N-1 "
            "in row order. Rebuild the dataset."
        )
    _require_nonempty(path, table, "concept")
    _require_known_splits(path, table)
    return table


def read_concept_table(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """Read and validate ``concepts.csv`` of a processed dataset folder.

    Returns:
        DataFrame with one row per (concept, split) pair: ``concept`` (str),
        ``split`` (str), ``n_images`` (int, > 0) and any extra columns.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file cannot be parsed or breaks the format.
    """
    path = Path(dataset_dir) / CONCEPT_TABLE
    table = _read_csv(path)
    _require_columns(path, table, CONCEPT_COLUMNS)
    _require_nonempty(path, table, "concept")
    _require_known_splits(path, table)

    if not pd.api.types.is_integer_dtype(table["n_images"]) or (table["n_images"] <= 0).any():
        raise ValueError(
            f"Concept table {path} is malformed: n_images must be a positive integer in every row."
        )
    duplicated = table.duplicated(["concept", "split"])
    if duplicated.any():
        example = table.loc[duplicated, ["concept", "split"]].iloc[0].tolist()
        raise ValueError(
            f"Concept table {path} is malformed: the (concept, split) pair {example} appears "
            "twice."
        )
    return table


def read_manifest(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Return the parsed ``manifest.json`` of a processed dataset folder."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"Manifest {path} not found. The build did not finish; run the dataset builder again."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"Manifest {path} is not valid JSON ({error}). Run the dataset builder again."
        ) from error


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Load an image file as an 8-bit RGB :class:`PIL.Image.Image`.

    Greyscale, CMYK, palette and alpha images are converted to RGB. A palette
    image with a transparent colour goes through RGBA first, as PIL requires.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: PIL cannot decode the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("P", "PA") and "transparency" in image.info:
                image = image.convert("RGBA")
            return image.convert("RGB") if image.mode != "RGB" else image.copy()
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError) as error:
        raise ValueError(
            f"Image file {path} cannot be decoded ({error}). Rebuild the dataset or delete the "
            "file."
        ) from error


def concept_table_from_images(
    images: pd.DataFrame, extra_columns: list[str] | tuple[str, ...] = ()
) -> pd.DataFrame:
    """Summarise an image table into a concept table.

    Returns:
        One row per (concept, split) pair in the order of first appearance, with
        ``concept``, ``split``, ``n_images`` and ``extra_columns`` taken from the
        first image of the pair.
    """
    keys = ["concept", "split"]
    grouped = images.groupby(keys, sort=False)
    table = grouped.size().rename("n_images").reset_index()
    if extra_columns:
        first = grouped[list(extra_columns)].first().reset_index()
        table = table.merge(first, on=keys, how="left", validate="one_to_one")
    return table


def begin_output(out_dir: Path) -> None:
    """Create ``out_dir`` and delete an old ``manifest.json``, so a failed rebuild does not look complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)


def write_tables(out_dir: Path, images: pd.DataFrame, concepts: pd.DataFrame) -> None:
    """Write ``images.csv`` and ``concepts.csv`` into ``out_dir`` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images.to_csv(out_dir / IMAGE_TABLE, index=False)
    concepts.to_csv(out_dir / CONCEPT_TABLE, index=False)


def count_by_split(table: pd.DataFrame) -> dict[str, int]:
    """Return the number of rows of ``table`` per split, for every split in :data:`SPLITS`."""
    counts = table["split"].value_counts()
    return {split: int(counts.get(split, 0)) for split in SPLITS}


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` into ``out_dir`` via a temporary file and rename."""
    path = out_dir / MANIFEST
    temp_path = path.with_suffix(".json.part")
    temp_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temp_path, path)
    return path


def package_version() -> str:
    """Return the installed version of the s2m package, or "unknown"."""
    try:
        return importlib.metadata.version("s2m")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(
            f"Table {path} not found. Build the dataset first (s2m.datasets.build_dataset)."
        )
    try:
        # keep_default_na=False keeps empty paths as "" instead of NaN.
        return pd.read_csv(path, dtype=_STRING_COLUMNS, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"Table {path} cannot be parsed as CSV ({error}). Rebuild the dataset.") from error


def _require_columns(path: Path, table: pd.DataFrame, columns: tuple[str, ...]) -> None:
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(
            f"Table {path} is malformed: missing columns {missing}; found {list(table.columns)}. "
            "Rebuild the dataset."
        )


def _require_nonempty(path: Path, table: pd.DataFrame, column: str) -> None:
    empty = table[column].str.len() == 0
    if empty.any():
        raise ValueError(
            f"Table {path} is malformed: column {column} is empty in row {int(empty.idxmax())}."
        )


def _require_known_splits(path: Path, table: pd.DataFrame) -> None:
    unknown = sorted(set(table["split"]) - set(SPLITS))
    if unknown:
        raise ValueError(
            f"Table {path} is malformed: unknown split values {unknown}; allowed values are "
            f"{list(SPLITS)}."
        )
