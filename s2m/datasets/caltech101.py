"""Build the processed Caltech-101 dataset (Fei-Fei, Fergus and Perona, 2004).

Input: ``<raw_data_dir>/caltech101/101_ObjectCategories.tar.gz``, which unpacks
to ``101_ObjectCategories/<category>/image_NNNN.jpg``. When it is missing, the
official ``caltech-101.zip`` (in the same folder, or downloaded with
``download=True``) provides it. The builder then extracts the tar.gz from the
zip into ``<raw_data_dir>/caltech101/``.

Output (see :mod:`s2m.datasets.table` for the shared tables): the selected
images under ``images/<folder>/<file>``, ``images.csv``, ``concepts.csv``,
``splits.csv`` (object category -> split) and ``manifest.json``.

Each object category is one concept ``caltech101/<category>``. The folder
``BACKGROUND_Google`` contains unrelated web-search results. Its images form the
clutter pseudo-concept ``caltech101/BACKGROUND_Google``, split into
``clutter_noise`` (the pool that replaces part of a noisy concept set) and
``clutter_gallery`` (extra negatives in the retrieval gallery).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from s2m import rawdata
from s2m.datasets import table as tables

logger = logging.getLogger(__name__)

TAR_NAME = "101_ObjectCategories.tar.gz"
ZIP_NAME = "caltech-101.zip"
ZIP_TAR_MEMBER = "caltech-101/101_ObjectCategories.tar.gz"
ROOT_FOLDER = "101_ObjectCategories"
CLUTTER_CATEGORY = "BACKGROUND_Google"
FACES_CATEGORY = "Faces"
FACES_EASY_CATEGORY = "Faces_easy"
FACES_OPTIONS = ("drop_faces_easy", "merge")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
META_SPLITS = ("meta_train", "meta_val", "meta_test")

# SHA-256 of the tar.gz in the project's raw-data mirror. Its bytes differ
# from the official tar.gz (same folder layout and image count).
MIRROR_TAR_SHA256 = "fa50adea60c6371519544c47c8ac76bcffdc7e5c86ebdccd55f262cab024cdd5"
# MD5 of the official 101_ObjectCategories.tar.gz, as listed in torchvision's
# torchvision/datasets/caltech.py (Caltech101.download).
OFFICIAL_TAR_MD5 = "b224c7392d521a49829488ab0f1120d9"
OFFICIAL_ZIP_URL = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"
# MD5 of the official caltech-101.zip, as listed in the R package torchvision
# (mlverse/torchvision, R/dataset-caltech.R, caltech101_dataset resources).
OFFICIAL_ZIP_MD5 = "3138e1922a9193bfa496528edbbc45d0"


@dataclass(frozen=True)
class _ImageFile:
    """One image file in the archive.

    ``folder`` is its folder in the archive and ``category`` the category of
    its concept. They differ only for ``Faces_easy`` when ``faces="merge"``.
    """

    member: tarfile.TarInfo
    folder: str
    file_name: str
    category: str
    order: int


def build_caltech101(
    raw_data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split_fractions: Sequence[float] = (0.6, 0.1, 0.3),
    seed: int = 0,
    faces: str = "drop_faces_easy",
    clutter_noise_fraction: float = 0.5,
    max_images_per_category: int | None = None,
    download: bool = False,
) -> Path:
    """Build the processed Caltech-101 dataset in ``out_dir``.

    Args:
        raw_data_dir: folder that contains ``caltech101/``.
        out_dir: output folder, created if needed. ``out_dir/images`` is
            replaced when the extraction has finished.
        split_fractions: fractions of the object categories for meta_train,
            meta_val and meta_test. They must sum to 1. Counts are rounded by
            largest remainder, and every split with a positive fraction gets
            at least one category.
        seed: seed of the category split, the clutter split and the subsample.
        faces: ``"drop_faces_easy"`` (default) drops ``Faces_easy``, which
            shows the same 435 photos as ``Faces`` cropped differently.
            ``"merge"`` puts both folders into the one concept
            ``caltech101/Faces``, so that concept contains near-duplicate pairs.
        clutter_noise_fraction: fraction of the ``BACKGROUND_Google`` images
            that go to ``clutter_noise``; the rest go to ``clutter_gallery``.
        max_images_per_category: keep at most this many images per folder,
            drawn with ``seed`` (for tiny configs). Applies to
            ``BACKGROUND_Google`` too.
        download: download the official zip when neither the tar.gz nor the
            zip is in ``<raw_data_dir>/caltech101/``.

    Returns:
        ``out_dir`` as a :class:`Path`.

    Raises:
        FileNotFoundError: the archive is missing (the message names the path).
        ValueError: the archive is corrupt or unsafe, or a parameter is invalid.
    """
    parameters = {
        "split_fractions": list(split_fractions),
        "seed": seed,
        "faces": faces,
        "clutter_noise_fraction": clutter_noise_fraction,
        "max_images_per_category": max_images_per_category,
        "download": download,
    }
    _check_parameters(split_fractions, faces, clutter_noise_fraction, max_images_per_category)
    out_dir = Path(out_dir)
    caltech_dir = Path(raw_data_dir) / "caltech101"
    tar_path, inputs = _locate_archive(caltech_dir, download)

    with _open_tar(tar_path) as archive:
        members = archive.getmembers()
        rawdata.check_tar_members(tar_path, members)
        files = _catalogue(tar_path, archive, members)
        files = _apply_faces_option(files, faces)
        files = _subsample(files, max_images_per_category, seed)

        categories = sorted({f.category for f in files if f.category != CLUTTER_CATEGORY})
        category_splits = assign_category_splits(categories, split_fractions, seed)
        clutter_splits = _assign_clutter_splits(files, clutter_noise_fraction, seed)
        tables.begin_output(out_dir)
        _extract_images(archive, files, out_dir)

    images = _image_table(files, category_splits, clutter_splits, out_dir)
    concepts = tables.concept_table_from_images(images, ["category", "is_clutter"])
    splits = _splits_table(category_splits, images)

    tables.write_tables(out_dir, images, concepts)
    splits.to_csv(out_dir / "splits.csv", index=False)
    manifest = {
        "builder": "caltech101",
        "s2m_version": tables.package_version(),
        "parameters": parameters,
        "seed": seed,
        "inputs": inputs,
        "counts": {
            "images": tables.count_by_split(images),
            "concepts": tables.count_by_split(concepts),
            "categories": {split: int((splits["split"] == split).sum()) for split in META_SPLITS},
            "greyscale_images": int((images["mode"] == "L").sum()),
        },
    }
    tables.write_manifest(out_dir, manifest)
    logger.info("Caltech-101: wrote %d images of %d concepts to %s", len(images), len(concepts), out_dir)
    return out_dir


def _check_parameters(
    split_fractions: Sequence[float],
    faces: str,
    clutter_noise_fraction: float,
    max_images_per_category: int | None,
) -> None:
    fractions = list(split_fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split_fractions must be three non-negative numbers (meta_train, meta_val, meta_test) "
            f"that sum to 1, got {fractions!r}."
        )
    if faces not in FACES_OPTIONS:
        raise ValueError(f"faces must be one of {FACES_OPTIONS}, got {faces!r}.")
    if not 0.0 <= clutter_noise_fraction <= 1.0:
        raise ValueError(f"clutter_noise_fraction must be in [0, 1], got {clutter_noise_fraction!r}.")
    if max_images_per_category is not None and (
        not isinstance(max_images_per_category, int) or max_images_per_category < 1
    ):
        raise ValueError(
            "max_images_per_category must be None or an int >= 1, got "
            f"{max_images_per_category!r}."
        )


# --- Finding and verifying the archive ----------------------------------------


def _locate_archive(caltech_dir: Path, download: bool) -> tuple[Path, list[dict[str, Any]]]:
    """Return the tar.gz path and the manifest records of the input files.

    Order: the tar.gz, else the tar.gz extracted from the official zip, which
    is downloaded first when ``download`` is true (or used when it is present).
    """
    tar_path = caltech_dir / TAR_NAME
    zip_path = caltech_dir / ZIP_NAME
    if tar_path.is_file():
        return tar_path, [_tar_record(tar_path)]

    if download:
        rawdata.download(OFFICIAL_ZIP_URL, zip_path, OFFICIAL_ZIP_MD5, "md5")
    elif not zip_path.is_file():
        raise FileNotFoundError(
            f"Caltech-101 archive {tar_path} not found (nor the official {zip_path.name}). Point "
            "S2M_RAW_DATA or `raw_data_dir` in config/config.yaml at the folder that contains "
            "caltech101/, or build with download=True."
        )

    zip_record = rawdata.checksum_record(zip_path, OFFICIAL_ZIP_MD5, "md5")
    if not zip_record["verified"]:
        logger.warning(
            "%s has MD5 %s, not the official %s. Using it anyway.",
            zip_path, zip_record["digest"], OFFICIAL_ZIP_MD5,
        )

    logger.info("Extracting %s from %s", ZIP_TAR_MEMBER, zip_path)
    try:
        rawdata.extract_zip_member(zip_path, ZIP_TAR_MEMBER, tar_path)
    except KeyError as error:
        raise ValueError(
            f"{error.args[0]} It is not the official Caltech-101 zip. Delete it and download it "
            "again."
        ) from error
    return tar_path, [zip_record, _tar_record(tar_path)]


def _tar_record(tar_path: Path) -> dict[str, Any]:
    """Return the checksum record of the tar.gz.

    Both the mirror's SHA-256 and the official MD5 count as verified. A file
    that matches neither is used with a logged warning.
    """
    mirror = rawdata.checksum_record(tar_path, MIRROR_TAR_SHA256, "sha256")
    if mirror["verified"]:
        return mirror
    official = rawdata.checksum_record(tar_path, OFFICIAL_TAR_MD5, "md5")
    if official["verified"]:
        return official
    logger.warning(
        "%s matches neither the mirror's SHA-256 %s nor the official MD5 %s (got SHA-256 %s). "
        "It is used because its members pass the structure checks. The manifest records the digest.",
        tar_path, MIRROR_TAR_SHA256, OFFICIAL_TAR_MD5, mirror["digest"],
    )
    return mirror


def _open_tar(tar_path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(tar_path, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(
            f"Caltech-101 archive {tar_path} cannot be read as tar.gz ({error}). Delete it and "
            "restore it from the raw-data mirror, or build with download=True."
        ) from error


# --- Choosing the images --------------------------------------------------------


def _catalogue(
    tar_path: Path, archive: tarfile.TarFile, members: list[tarfile.TarInfo]
) -> list[_ImageFile]:
    """List the image files ``101_ObjectCategories/<folder>/<file>`` in archive order.

    Files whose name lacks an image suffix (the stray ``BACKGROUND_Google/tmp``)
    are decided by content: kept when PIL can verify them, else skipped with a
    warning.
    """
    files = []
    n_other = 0
    for order, member in enumerate(members):
        parts = PurePosixPath(member.name).parts
        if not member.isfile() or len(parts) != 3 or parts[0] != ROOT_FOLDER:
            n_other += int(member.isfile())
            continue
        folder, file_name = parts[1], parts[2]
        if not file_name.lower().endswith(IMAGE_SUFFIXES) and not _is_decodable_image(archive, member):
            logger.warning("Skipping %s in %s: not a decodable image", member.name, tar_path)
            continue
        files.append(_ImageFile(member, folder, file_name, folder, order))

    if not files:
        raise ValueError(
            f"Caltech-101 archive {tar_path} contains no '{ROOT_FOLDER}/<category>/<image>' files. "
            "Delete it and restore it from the raw-data mirror, or build with download=True."
        )
    if n_other:
        logger.info("Ignored %d files outside '%s/<category>/' in %s", n_other, ROOT_FOLDER, tar_path)
    return files


def _is_decodable_image(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bool:
    stream = archive.extractfile(member)
    if stream is None:
        return False
    try:
        with stream, Image.open(io.BytesIO(stream.read())) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
    logger.info("Keeping %s: it has no image suffix but decodes as %s", member.name, image.format)
    return True


def _apply_faces_option(files: list[_ImageFile], faces: str) -> list[_ImageFile]:
    n_easy = sum(f.folder == FACES_EASY_CATEGORY for f in files)
    if faces == "drop_faces_easy":
        logger.info(
            "Dropping %d %s images (same photos as %s)", n_easy, FACES_EASY_CATEGORY, FACES_CATEGORY
        )
        return [f for f in files if f.folder != FACES_EASY_CATEGORY]
    logger.info("Merging %d %s images into the concept %s", n_easy, FACES_EASY_CATEGORY, FACES_CATEGORY)
    return [replace(f, category=FACES_CATEGORY) if f.folder == FACES_EASY_CATEGORY else f for f in files]


def _rng(seed: int, label: str) -> np.random.Generator:
    """Return a generator for one random decision, so decisions do not shift each other."""
    return np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])


def _subsample(files: list[_ImageFile], max_images: int | None, seed: int) -> list[_ImageFile]:
    """Keep at most ``max_images`` files per folder, drawn with ``seed``. Archive order is kept."""
    if max_images is None:
        return files
    by_folder: dict[str, list[_ImageFile]] = {}
    for f in files:
        by_folder.setdefault(f.folder, []).append(f)
    kept = []
    for folder, folder_files in sorted(by_folder.items()):
        ordered = sorted(folder_files, key=lambda f: f.file_name)
        if len(ordered) > max_images:
            chosen = _rng(seed, f"subsample/{folder}").choice(len(ordered), size=max_images, replace=False)
            ordered = [ordered[i] for i in sorted(chosen)]
        kept.extend(ordered)
    return sorted(kept, key=lambda f: f.order)


def split_counts(n_items: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n_items`` by ``fractions`` (largest remainder), at least 1 per positive fraction.

    Raises:
        ValueError: ``n_items`` is smaller than the number of positive fractions.
    """
    fractions = np.asarray(fractions, dtype=float)
    n_positive = int((fractions > 0).sum())
    if n_items < n_positive:
        raise ValueError(
            f"Cannot split {n_items} categories into {n_positive} non-empty splits "
            f"{fractions.tolist()}."
        )
    exact = fractions * n_items
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: n_items - counts.sum()]:
        counts[index] += 1
    for index in np.flatnonzero((fractions > 0) & (counts == 0)):
        counts[index] += 1
        counts[np.argmax(counts)] -= 1
    return counts.tolist()


def assign_category_splits(
    categories: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Return ``{category: split}`` from a seeded permutation of the sorted categories."""
    ordered = sorted(categories)
    permuted = [ordered[i] for i in _rng(seed, "category_split").permutation(len(ordered))]
    result = {}
    start = 0
    for split, count in zip(META_SPLITS, split_counts(len(ordered), fractions)):
        for category in permuted[start : start + count]:
            result[category] = split
        start += count
    return result


def _assign_clutter_splits(files: list[_ImageFile], noise_fraction: float, seed: int) -> dict[str, str]:
    """Return ``{file_name: split}`` for the clutter images (clutter_noise or clutter_gallery)."""
    names = sorted(f.file_name for f in files if f.category == CLUTTER_CATEGORY)
    n_noise = int(round(noise_fraction * len(names)))
    permuted = [names[i] for i in _rng(seed, "clutter_split").permutation(len(names))]
    return {
        name: "clutter_noise" if rank < n_noise else "clutter_gallery"
        for rank, name in enumerate(permuted)
    }


# --- Writing -----------------------------------------------------------------------


def _extract_images(archive: tarfile.TarFile, files: list[_ImageFile], out_dir: Path) -> None:
    """Extract ``files`` to ``out_dir/images/<folder>/<file>`` through a staging folder."""
    staging = out_dir / ".images.partial"
    final = out_dir / "images"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        members = [f.member for f in files]
        rawdata.extract_tar_members(archive, members, staging, strip_components=1, description="extract")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def _image_table(
    files: list[_ImageFile], category_splits: dict[str, str], clutter_splits: dict[str, str], out_dir: Path
) -> pd.DataFrame:
    """Return the image table.

    Rows list the object categories by name, then the clutter images. Within a
    category, files are sorted by folder and name.
    """
    rows = []
    for f in files:
        is_clutter = f.category == CLUTTER_CATEGORY
        split = clutter_splits[f.file_name] if is_clutter else category_splits[f.category]
        rows.append(
            {
                "concept": f"caltech101/{f.category}",
                "split": split,
                "path": f"images/{f.folder}/{f.file_name}",
                "category": f.category,
                "folder": f.folder,
                "file_name": f.file_name,
                "is_clutter": is_clutter,
            }
        )
    frame = pd.DataFrame(rows)
    frame = frame.sort_values(["is_clutter", "category", "folder", "file_name"], ignore_index=True)
    paths = tqdm(frame["path"], desc="read image headers", unit="image")
    headers = [_image_header(out_dir / path) for path in paths]
    frame[["width", "height", "mode"]] = pd.DataFrame(headers, columns=["width", "height", "mode"])

    unreadable = frame["mode"].isna()
    for path in frame.loc[unreadable, "path"]:
        (out_dir / path).unlink()
    frame = frame[~unreadable].reset_index(drop=True)
    frame = frame.astype({"width": int, "height": int})
    frame.insert(0, "image_id", np.arange(len(frame)))
    return frame


def _image_header(path: Path) -> tuple[int | None, int | None, str | None]:
    """Return (width, height, PIL mode), or Nones with a warning when PIL cannot identify the file."""
    try:
        with Image.open(path) as image:
            return image.width, image.height, image.mode
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        logger.warning("Skipping %s: PIL cannot read it (%s); the file was deleted", path, error)
        return None, None, None


def _splits_table(category_splits: dict[str, str], images: pd.DataFrame) -> pd.DataFrame:
    """Return ``splits.csv``: one row per object category with its split and image count."""
    counts = images.loc[~images["is_clutter"], "category"].value_counts()
    categories = sorted(category_splits)
    return pd.DataFrame(
        {
            "category": categories,
            "split": [category_splits[c] for c in categories],
            "n_images": [int(counts.get(c, 0)) for c in categories],
        }
    )
