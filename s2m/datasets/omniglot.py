"""Build the processed Omniglot dataset (Lake, Salakhutdinov and Tenenbaum, 2015).

Input, in ``<raw_data_dir>/omniglot/``, for each Omniglot set ("background",
"evaluation"), the first that exists of:

1. ``images_<set>.npz`` with ``images`` (bool, (n_characters, 20, 105, 105),
   True = white background, False = ink) and ``labels`` (int, (n_characters,
   20), the row index). Row ``i`` is character id ``first_id + i`` and column
   ``j`` is drawer ``j + 1``.
2. The official ``images_<set>.zip`` (PNG files
   ``images_<set>/<alphabet>/character<NN>/<character id>_<drawer>.png``),
   downloaded when missing and ``download=True``.

``alphabets.csv`` (columns ``first_character_id``, ``last_character_id``,
``alphabet``, ``omniglot_set``) maps character ids to alphabets. Without it,
the alphabets are read from the folder names in the official zips.

Output (see :mod:`s2m.datasets.table` for the shared tables): ``images.npy``
(uint8, (N, image_size, image_size), ink = 255 on a 0 background),
``images.csv``, ``concepts.csv`` and ``manifest.json``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from s2m import rawdata
from s2m.datasets import table as tables

logger = logging.getLogger(__name__)

OMNIGLOT_SETS = ("background", "evaluation")
N_DRAWERS = 20
RAW_IMAGE_SIZE = 105
ALLOWED_ROTATIONS = (0, 90, 180, 270)
ALPHABET_COLUMNS = ("first_character_id", "last_character_id", "alphabet", "omniglot_set")

# SHA-256 digests of the npz repack and alphabet table distributed with the
# project's raw-data mirror. A mismatch is logged as a warning, not raised,
# because the arrays are validated by structure and a user may repack them.
MIRROR_SHA256 = {
    "images_background.npz": "8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199",
    "images_evaluation.npz": "0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276",
    "alphabets.csv": "2f040f177a2ce27aad25b4dcf3e88146b83aefb5582bb1fa8714ed568625d1ed",
}

OFFICIAL_URL_PREFIX = "https://github.com/brendenlake/omniglot/raw/master/python"
# MD5 digests of the official zips, as listed in torchvision's
# torchvision/datasets/omniglot.py (Omniglot.zips_md5).
OFFICIAL_ZIP_MD5 = {
    "background": "68d2efa1b9178cc56df9314c21c6e718",
    "evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}

_PNG_NAME = re.compile(r"^[^/]+/(?P<alphabet>[^/]+)/[^/]+/(?P<character>\d+)_(?P<drawer>\d+)\.png$")
_RESIZE_CHUNK = 4096


@dataclass
class _SetSource:
    """Source file of one Omniglot set, with ``kind`` "npz" or "zip"."""

    omniglot_set: str
    kind: str
    path: Path


def build_omniglot(
    raw_data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_size: int = 28,
    rotations: Sequence[int] = (0, 90, 180, 270),
    n_validation_alphabets: int = 5,
    seed: int = 0,
    download: bool = False,
    max_characters: int | None = None,
) -> Path:
    """Build the processed Omniglot dataset in ``out_dir``.

    Each (character, rotation) pair is one concept with 20 images, one per
    drawer. Rotations are counter-clockwise, in degrees. Splits are made per
    alphabet, so all rotations and drawers of a character share a split. The
    background set is meta-training, except ``n_validation_alphabets`` whole
    background alphabets drawn with ``seed``, which are meta-validation. The
    evaluation set is meta-test.

    Args:
        raw_data_dir: folder that contains ``omniglot/``.
        out_dir: output folder, created if needed. Existing output files in it
            are replaced.
        image_size: side of the output images in pixels. The 105 x 105
            originals are reduced with area averaging (``torch`` ``interpolate``
            with ``mode="area"``), so strokes become grey levels.
        rotations: subset of (0, 90, 180, 270).
        n_validation_alphabets: background alphabets held out as meta_val.
        seed: seed of the alphabet choice and of the ``max_characters`` sample.
        download: download the official zips when a set's npz and zip are missing.
        max_characters: keep at most this many characters per Omniglot set,
            drawn with ``seed`` (for tiny test configs). In the background set
            the quota is shared between meta_train and meta_val in proportion
            to their sizes, with at least one character for each.

    Returns:
        ``out_dir`` as a :class:`Path`.

    Raises:
        FileNotFoundError: a raw-data file is missing (the message names it).
        ValueError: a raw-data file is corrupt or a parameter is invalid.
    """
    parameters = {
        "image_size": image_size,
        "rotations": list(rotations),
        "n_validation_alphabets": n_validation_alphabets,
        "seed": seed,
        "download": download,
        "max_characters": max_characters,
    }
    _check_parameters(image_size, rotations, n_validation_alphabets, max_characters)
    out_dir = Path(out_dir)
    omniglot_dir = Path(raw_data_dir) / "omniglot"
    if not omniglot_dir.is_dir() and not download:
        raise FileNotFoundError(
            f"Omniglot raw-data folder {omniglot_dir} not found. Set S2M_RAW_DATA or "
            "`raw_data_dir` in config/config.yaml to the folder that contains omniglot/, "
            "or build with download=True."
        )

    sources = {name: _locate_set(omniglot_dir, name, download) for name in OMNIGLOT_SETS}
    inputs = [_input_record(source) for source in sources.values()]
    arrays, zip_alphabets = {}, {}
    for name, source in sources.items():
        arrays[name], zip_alphabets[name] = _load_set(source)
    alphabets, alphabet_input = _load_alphabets(omniglot_dir, zip_alphabets)
    if alphabet_input is not None:
        inputs.append(alphabet_input)

    characters = _character_table(alphabets, arrays)
    rng = np.random.default_rng(seed)
    validation_alphabets = _assign_splits(characters, n_validation_alphabets, rng)
    characters = _subsample_characters(characters, max_characters, rng)

    pixels = _render_images(characters, arrays, image_size, rotations)
    images = _image_table(characters, rotations)
    concepts = tables.concept_table_from_images(
        images, ["alphabet", "omniglot_set", "character_id", "rotation"]
    )

    tables.begin_output(out_dir)
    _save_array(out_dir / "images.npy", pixels)
    tables.write_tables(out_dir, images, concepts)
    manifest = {
        "builder": "omniglot",
        "s2m_version": tables.package_version(),
        "parameters": parameters,
        "seed": seed,
        "inputs": inputs,
        "validation_alphabets": validation_alphabets,
        "image_array": {
            "file": "images.npy",
            "shape": list(pixels.shape),
            "dtype": "uint8",
            "ink_value": 255,
            "background_value": 0,
            "resize": "area averaging (torch.nn.functional.interpolate, mode='area')",
            "rotation_direction": "counter-clockwise",
        },
        "counts": {
            "images": tables.count_by_split(images),
            "concepts": tables.count_by_split(concepts),
            "characters": tables.count_by_split(characters),
        },
    }
    tables.write_manifest(out_dir, manifest)
    logger.info("Omniglot: wrote %d images of %d concepts to %s", len(images), len(concepts), out_dir)
    return out_dir


def _check_parameters(
    image_size: int, rotations: Sequence[int], n_validation_alphabets: int, max_characters: int | None
) -> None:
    if not isinstance(image_size, int) or not 1 <= image_size <= RAW_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int in 1..{RAW_IMAGE_SIZE}, got {image_size!r}.")
    rotations = list(rotations)
    valid = all(r in ALLOWED_ROTATIONS for r in rotations) and len(set(rotations)) == len(rotations)
    if not rotations or not valid:
        raise ValueError(f"rotations must be distinct values from {ALLOWED_ROTATIONS}, got {rotations!r}.")
    if not isinstance(n_validation_alphabets, int) or n_validation_alphabets < 0:
        raise ValueError(f"n_validation_alphabets must be an int >= 0, got {n_validation_alphabets!r}.")
    if max_characters is not None and (not isinstance(max_characters, int) or max_characters < 1):
        raise ValueError(f"max_characters must be None or an int >= 1, got {max_characters!r}.")


def _locate_set(omniglot_dir: Path, omniglot_set: str, download: bool) -> _SetSource:
    """Choose the npz, the local official zip, or a fresh download for one set."""
    npz_path = omniglot_dir / f"images_{omniglot_set}.npz"
    zip_path = omniglot_dir / f"images_{omniglot_set}.zip"
    if npz_path.is_file():
        return _SetSource(omniglot_set, "npz", npz_path)
    if download:
        url = f"{OFFICIAL_URL_PREFIX}/images_{omniglot_set}.zip"
        rawdata.download(url, zip_path, OFFICIAL_ZIP_MD5[omniglot_set], "md5")
        return _SetSource(omniglot_set, "zip", zip_path)
    if zip_path.is_file():
        return _SetSource(omniglot_set, "zip", zip_path)
    raise FileNotFoundError(
        f"Omniglot file {npz_path} not found (nor the official {zip_path.name}). Point "
        "S2M_RAW_DATA or `raw_data_dir` at the raw-data folder, or build with "
        "download=True to fetch the official zips."
    )


def _input_record(source: _SetSource) -> dict[str, Any]:
    if source.kind == "npz":
        return _checksum_record(source.path, MIRROR_SHA256.get(source.path.name), "sha256")
    return _checksum_record(source.path, OFFICIAL_ZIP_MD5[source.omniglot_set], "md5")


def _checksum_record(path: Path, expected: str | None, algorithm: str) -> dict[str, Any]:
    """Hash an input file, warn when it differs from the known digest, and describe it for the manifest."""
    record = rawdata.checksum_record(path, expected, algorithm)
    if expected is not None and not record["verified"]:
        logger.warning(
            "%s has %s %s, not the known %s. It is used because its content passed the "
            "structure checks. The manifest records the actual digest.",
            path, algorithm, record["digest"], expected,
        )
    return record


# --- Reading the raw arrays -------------------------------------------------


def read_npz_headers(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Return ``{key: (shape, dtype)}`` of the arrays in an ``.npz`` file without loading them.

    Raises:
        ValueError: the file is not a zip archive or a member is not a valid
            ``.npy`` array. The message names the file and the remedy.
    """
    path = Path(path)
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not name.endswith(".npy"):
                    continue
                with archive.open(name) as stream:
                    version = np.lib.format.read_magic(stream)
                    if version == (1, 0):
                        shape, _fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
                    else:
                        shape, _fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
                headers[name[: -len(".npy")]] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as error:
        raise ValueError(
            f"Omniglot file {path} is not a valid .npz archive ({error}). Delete it and "
            "restore it from the raw-data mirror, or build with download=True."
        ) from error
    return headers


def _load_set(source: _SetSource) -> tuple[np.ndarray, pd.DataFrame | None]:
    """Return the images of one set and, for a zip, its alphabet table.

    The images are bool (n_characters, 20, 105, 105), True = background.
    """
    if source.kind == "npz":
        return _load_npz(source.path), None
    return _read_official_zip(source.path, source.omniglot_set)


def _load_npz(path: Path) -> np.ndarray:
    headers = read_npz_headers(path)
    _check_npz_headers(path, headers)
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data["images"]
            labels = data["labels"]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise ValueError(
            f"Omniglot file {path} cannot be read ({error}). Delete it and restore it."
        ) from error

    if not (labels == np.arange(labels.shape[0])[:, None]).all():
        raise ValueError(
            f"Omniglot file {path} is malformed: `labels[i, j]` must equal the row index i. "
            "Restore the file from the raw-data mirror."
        )
    return images


def _check_npz_headers(path: Path, headers: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    remedy = "Restore the file from the raw-data mirror, or build with download=True."
    missing = [key for key in ("images", "labels") if key not in headers]
    if missing:
        raise ValueError(
            f"Omniglot file {path} is malformed: missing arrays {missing}; found "
            f"{sorted(headers)}. {remedy}"
        )

    image_shape, image_dtype = headers["images"]
    label_shape, label_dtype = headers["labels"]
    expected_tail = (N_DRAWERS, RAW_IMAGE_SIZE, RAW_IMAGE_SIZE)
    if image_dtype != np.bool_ or len(image_shape) != 4 or image_shape[1:] != expected_tail:
        raise ValueError(
            f"Omniglot file {path} is malformed: `images` must be bool with shape "
            f"(n_characters, {N_DRAWERS}, {RAW_IMAGE_SIZE}, {RAW_IMAGE_SIZE}), got "
            f"{image_dtype} {image_shape}. {remedy}"
        )
    if label_dtype.kind not in "iu" or label_shape != image_shape[:2]:
        raise ValueError(
            f"Omniglot file {path} is malformed: `labels` must be an integer array of shape "
            f"{image_shape[:2]}, got {label_dtype} {label_shape}. {remedy}"
        )


def _read_official_zip(path: Path, omniglot_set: str) -> tuple[np.ndarray, pd.DataFrame]:
    """Decode the PNGs of an official zip into the npz layout.

    Returns:
        ``images``: bool (n_characters, 20, 105, 105), True = white background,
        with row ``i`` = the ``i``-th smallest character id; and an alphabet
        table with the columns of ``alphabets.csv``.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = _png_entries(path, archive)
            first_id, n_characters = _character_id_range(path, entries)
            images = np.zeros((n_characters, N_DRAWERS, RAW_IMAGE_SIZE, RAW_IMAGE_SIZE), dtype=bool)
            filled = np.zeros((n_characters, N_DRAWERS), dtype=bool)
            progress = tqdm(entries, desc=f"decode {path.name}", unit="png")
            for name, _alphabet, character_id, drawer in progress:
                row, column = character_id - first_id, drawer - 1
                images[row, column] = _decode_png(path, name, archive.read(name))
                filled[row, column] = True
    except zipfile.BadZipFile as error:
        raise ValueError(
            f"Omniglot file {path} is not a valid zip archive ({error}). Delete it and download "
            "it again."
        ) from error

    if not filled.all():
        row, column = np.argwhere(~filled)[0]
        raise ValueError(
            f"Omniglot zip {path} has no image for character {first_id + row}, drawer {column + 1}. "
            "Delete it and download it again."
        )
    return images, _alphabets_from_entries(entries, omniglot_set)


def _png_entries(path: Path, archive: zipfile.ZipFile) -> list[tuple[str, str, int, int]]:
    """List ``(member name, alphabet folder, character id, drawer)`` for each PNG."""
    entries = []
    for name in archive.namelist():
        match = _PNG_NAME.match(name)
        if match is None:
            continue
        drawer = int(match["drawer"])
        if not 1 <= drawer <= N_DRAWERS:
            raise ValueError(
                f"Omniglot zip {path} member {name!r} has drawer {drawer}, outside 1..{N_DRAWERS}."
            )
        entries.append((name, match["alphabet"], int(match["character"]), drawer))
    if not entries:
        raise ValueError(
            f"Omniglot zip {path} contains no '<alphabet>/<character>/<id>_<drawer>.png' files. "
            "Delete it and download it again."
        )
    return entries


def _character_id_range(path: Path, entries: list[tuple[str, str, int, int]]) -> tuple[int, int]:
    ids = sorted({character_id for _name, _alphabet, character_id, _drawer in entries})
    if ids[-1] - ids[0] + 1 != len(ids):
        raise ValueError(
            f"Omniglot zip {path} has gaps in its character ids ({ids[0]}..{ids[-1]}, {len(ids)} "
            "ids)."
        )
    return ids[0], len(ids)


def _decode_png(path: Path, name: str, data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            grey = np.asarray(image.convert("L"))
    except (OSError, SyntaxError) as error:
        raise ValueError(f"Omniglot zip {path} member {name!r} is not a valid PNG ({error}).") from error
    if grey.shape != (RAW_IMAGE_SIZE, RAW_IMAGE_SIZE):
        raise ValueError(
            f"Omniglot zip {path} member {name!r} is {grey.shape}, expected "
            f"{RAW_IMAGE_SIZE}x{RAW_IMAGE_SIZE}."
        )
    return grey >= 128


def _alphabets_from_entries(entries: list[tuple[str, str, int, int]], omniglot_set: str) -> pd.DataFrame:
    frame = pd.DataFrame(entries, columns=["name", "folder", "character_id", "drawer"])
    ranges = frame.groupby("folder")["character_id"].agg(["min", "max"]).reset_index()
    # NOTE: folder names use "_" for spaces, so "Ge_ez" becomes "Ge ez". Other
    # spellings (capitals, brackets) may differ from the mirror's alphabets.csv.
    return pd.DataFrame(
        {
            "first_character_id": ranges["min"],
            "last_character_id": ranges["max"],
            "alphabet": ranges["folder"].str.replace("_", " "),
            "omniglot_set": omniglot_set,
        }
    )


# --- Alphabets, characters and splits ---------------------------------------


def _load_alphabets(
    omniglot_dir: Path, zip_alphabets: dict[str, pd.DataFrame | None]
) -> tuple[pd.DataFrame, dict | None]:
    """Return the alphabet table and its manifest input record (None when read from the zips).

    ``zip_alphabets`` maps each Omniglot set to the alphabets found in its
    official zip, or to None when the set was read from an npz file.
    """
    path = omniglot_dir / "alphabets.csv"
    if path.is_file():
        return _read_alphabets_csv(path), _checksum_record(path, MIRROR_SHA256["alphabets.csv"], "sha256")
    if all(frame is not None for frame in zip_alphabets.values()):
        logger.info("%s not found; reading the alphabets from the folder names in the official zips", path)
        return _validate_alphabets(path, pd.concat(list(zip_alphabets.values()), ignore_index=True)), None
    raise FileNotFoundError(
        f"Omniglot alphabet table {path} not found. This table maps character ids to "
        "alphabets. Restore it from the raw-data mirror."
    )


def _read_alphabets_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"alphabet": str, "omniglot_set": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(
            f"Omniglot alphabet table {path} cannot be parsed ({error}). Restore it."
        ) from error
    missing = [column for column in ALPHABET_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"Omniglot alphabet table {path} is missing columns {missing}. Restore it.")
    return _validate_alphabets(path, frame[list(ALPHABET_COLUMNS)])


def _validate_alphabets(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Check that each set's alphabets cover one contiguous range of character ids."""
    unknown = sorted(set(frame["omniglot_set"]) - set(OMNIGLOT_SETS))
    if unknown:
        raise ValueError(f"Omniglot alphabet table {path} has unknown omniglot_set values {unknown}.")
    frame = frame.sort_values("first_character_id", ignore_index=True)
    for omniglot_set in OMNIGLOT_SETS:
        part = frame[frame["omniglot_set"] == omniglot_set]
        if part.empty:
            raise ValueError(f"Omniglot alphabet table {path} has no alphabet of the {omniglot_set} set.")
        firsts = part["first_character_id"].to_numpy()
        lasts = part["last_character_id"].to_numpy()
        contiguous = (firsts[1:] == lasts[:-1] + 1).all()
        if not contiguous or (lasts < firsts).any():
            raise ValueError(
                f"Omniglot alphabet table {path}: the {omniglot_set} alphabets overlap or leave "
                "gaps."
            )
    return frame


def _character_table(alphabets: pd.DataFrame, arrays: dict[str, np.ndarray]) -> pd.DataFrame:
    """Return one row per character, background set first.

    Columns: character_id, alphabet, omniglot_set, row (index into the array of
    its Omniglot set).
    """
    parts = []
    for omniglot_set in OMNIGLOT_SETS:
        part = alphabets[alphabets["omniglot_set"] == omniglot_set]
        firsts = part["first_character_id"].to_numpy()
        lasts = part["last_character_id"].to_numpy()
        ids = np.concatenate([np.arange(first, last + 1) for first, last in zip(firsts, lasts)])
        names = np.repeat(part["alphabet"].to_numpy(), lasts - firsts + 1)
        n_rows = arrays[omniglot_set].shape[0]
        if len(ids) != n_rows:
            raise ValueError(
                f"The {omniglot_set} images have {n_rows} characters, but alphabets.csv assigns "
                f"{len(ids)} character ids to that set. Use the alphabets.csv that belongs to the images."
            )
        frame = pd.DataFrame({"character_id": ids, "alphabet": names, "omniglot_set": omniglot_set})
        frame["row"] = ids - ids[0]
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def _assign_splits(
    characters: pd.DataFrame, n_validation_alphabets: int, rng: np.random.Generator
) -> list[str]:
    """Set the column ``split`` in place and return the sorted meta-validation alphabets."""
    background = characters["omniglot_set"] == "background"
    background_alphabets = sorted(characters.loc[background, "alphabet"].unique())
    if n_validation_alphabets >= len(background_alphabets):
        raise ValueError(
            f"n_validation_alphabets={n_validation_alphabets} leaves no meta-training alphabet: the "
            f"background set has {len(background_alphabets)} alphabets."
        )
    chosen = rng.permutation(len(background_alphabets))[:n_validation_alphabets]
    validation = sorted(background_alphabets[i] for i in chosen)

    characters["split"] = np.where(background, "meta_train", "meta_test")
    characters.loc[background & characters["alphabet"].isin(validation), "split"] = "meta_val"
    return validation


def _subsample_characters(
    characters: pd.DataFrame, max_characters: int | None, rng: np.random.Generator
) -> pd.DataFrame:
    """Keep at most ``max_characters`` characters per Omniglot set. Rows stay sorted by character id."""
    if max_characters is None:
        return characters
    keep = []
    for omniglot_set in OMNIGLOT_SETS:
        in_set = characters[characters["omniglot_set"] == omniglot_set]
        quotas = _split_quotas(in_set["split"].value_counts().sort_index(), max_characters)
        for split, quota in quotas.items():
            candidates = in_set.index[in_set["split"] == split].to_numpy()
            keep.append(np.sort(rng.choice(candidates, size=quota, replace=False)))
    return characters.loc[np.sort(np.concatenate(keep))].reset_index(drop=True)


def _split_quotas(sizes: pd.Series, total: int) -> dict[str, int]:
    """Share ``total`` among splits in proportion to ``sizes``, at least 1 each, at most the size."""
    if total >= sizes.sum():
        return sizes.to_dict()
    if total < len(sizes):
        raise ValueError(
            f"max_characters={total} is too small: it must be at least {len(sizes)} so that "
            f"each of the splits {list(sizes.index)} keeps a character."
        )
    quotas = np.maximum(1, np.floor(sizes.to_numpy() * total / sizes.sum())).astype(int)
    order = np.argsort(-sizes.to_numpy(), kind="stable")
    position = 0
    while quotas.sum() < total:
        index = order[position % len(order)]
        if quotas[index] < sizes.iloc[index]:
            quotas[index] += 1
        position += 1
    while quotas.sum() > total:
        index = order[position % len(order)]
        if quotas[index] > 1:
            quotas[index] -= 1
        position += 1
    return dict(zip(sizes.index, quotas.tolist()))


# --- Pixels and tables --------------------------------------------------------


def resize_ink(images: np.ndarray, image_size: int) -> np.ndarray:
    """Turn bool images (True = background) into uint8 ink images of another size.

    Args:
        images: bool (n, H, W).
        image_size: output side in pixels.

    Returns:
        uint8 (n, image_size, image_size), ink = 255, background = 0. The
        reduction is area averaging, so partly covered pixels get grey levels.
    """
    # torch is imported here so that reading tables does not pay its import time.
    import torch
    import torch.nn.functional as F

    output = np.empty((images.shape[0], image_size, image_size), dtype=np.uint8)
    with torch.no_grad():
        for start in tqdm(range(0, images.shape[0], _RESIZE_CHUNK), desc="resize", unit="chunk"):
            chunk = torch.from_numpy(~images[start : start + _RESIZE_CHUNK]).to(torch.float32).unsqueeze(1)
            if chunk.shape[-2:] != (image_size, image_size):
                chunk = F.interpolate(chunk, size=(image_size, image_size), mode="area")
            ink = (chunk.squeeze(1) * 255.0).round().to(torch.uint8)
            output[start : start + chunk.shape[0]] = ink.numpy()
    return output


def _render_images(
    characters: pd.DataFrame, arrays: dict[str, np.ndarray], image_size: int, rotations: Sequence[int]
) -> np.ndarray:
    """Return uint8 (n_characters * n_rotations * 20, size, size) in the order character, rotation, drawer.

    ``characters`` lists the background set before the evaluation set, as
    :func:`_character_table` builds it.
    """
    parts = []
    for name in OMNIGLOT_SETS:
        rows = characters.loc[characters["omniglot_set"] == name, "row"].to_numpy()
        selected = arrays[name] if len(rows) == arrays[name].shape[0] else arrays[name][rows]
        resized = resize_ink(selected.reshape(-1, RAW_IMAGE_SIZE, RAW_IMAGE_SIZE), image_size)
        parts.append(resized.reshape(len(rows), N_DRAWERS, image_size, image_size))
    resized = np.concatenate(parts)
    rotated = np.stack([np.rot90(resized, k=r // 90, axes=(-2, -1)) for r in rotations], axis=1)
    return np.ascontiguousarray(rotated.reshape(-1, image_size, image_size))


def _image_table(characters: pd.DataFrame, rotations: Sequence[int]) -> pd.DataFrame:
    """Return the image table in the row order of :func:`_render_images`."""
    n_rotations = len(rotations)
    per_character = n_rotations * N_DRAWERS
    index = np.repeat(np.arange(len(characters)), per_character)
    rotation = np.tile(np.repeat(np.asarray(rotations, dtype=int), N_DRAWERS), len(characters))
    drawer = np.tile(np.arange(1, N_DRAWERS + 1), len(characters) * n_rotations)
    character_id = characters["character_id"].to_numpy()[index]

    concept = [f"omniglot/c{c:04d}/r{r:03d}" for c, r in zip(character_id.tolist(), rotation.tolist())]
    return pd.DataFrame(
        {
            "image_id": np.arange(len(index)),
            "concept": concept,
            "split": characters["split"].to_numpy()[index],
            "path": "",
            "alphabet": characters["alphabet"].to_numpy()[index],
            "omniglot_set": characters["omniglot_set"].to_numpy()[index],
            "character_id": character_id,
            "drawer": drawer,
            "rotation": rotation,
        }
    )


def _save_array(path: Path, array: np.ndarray) -> None:
    temp_path = rawdata.partial_path(path)
    try:
        with open(temp_path, "wb") as stream:
            np.save(stream, array)
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)
