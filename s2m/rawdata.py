"""Locate, verify, download and unpack the raw data sets.

The raw-data folder contains one subfolder per data set (``omniglot/``,
``caltech101/``). Builders read from it and write their output elsewhere. Only
a build with ``download=True`` writes into it (the downloaded archives). The
folder is set by the environment variable ``S2M_RAW_DATA`` or by the config
entry ``raw_data_dir``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

logger = logging.getLogger(__name__)

RAW_DATA_ENV_VAR = "S2M_RAW_DATA"

_CHUNK_BYTES = 1 << 20
_DOWNLOAD_TIMEOUT_S = 60.0
RAW_DATA_CONTENTS = "omniglot/, caltech101/ and mobilenet_v2/"


def resolve_raw_data_dir(
    config_value: str | os.PathLike | None, config_source: str = "config_value argument of resolve_raw_data_dir"
) -> Path:
    """Return the absolute path of the raw-data folder.

    The environment variable ``S2M_RAW_DATA`` overrides ``config_value`` (in the
    workflow, the config entry ``raw_data_dir``). A relative path is resolved
    against the current working directory and ``~`` is expanded.
    ``config_source`` names where ``config_value`` came from in error messages.

    Raises:
        ValueError: neither the variable nor ``config_value`` is set.
        FileNotFoundError: the folder does not exist or is not a folder. The
            message names the path, where it came from and how to fix it.
    """
    env_value = os.environ.get(RAW_DATA_ENV_VAR, "").strip()
    if env_value:
        raw_value, source = env_value, f"environment variable {RAW_DATA_ENV_VAR}"
    elif config_value is not None and str(config_value).strip():
        raw_value, source = str(config_value), config_source
    else:
        raise ValueError(
            f"No raw-data folder is set. Set the environment variable {RAW_DATA_ENV_VAR} "
            f"or `raw_data_dir` in config/config.yaml to the folder that contains {RAW_DATA_CONTENTS}."
        )

    path = Path(raw_value).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()

    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "not found"
        if env_value:
            remedy = (
                f"Set {RAW_DATA_ENV_VAR} to the folder that contains {RAW_DATA_CONTENTS}, "
                f"or unset it to use the {config_source}."
            )
        else:
            remedy = f"Set {RAW_DATA_ENV_VAR}, or the {config_source}, to the folder that contains {RAW_DATA_CONTENTS}."
        raise FileNotFoundError(f"Raw-data folder {path} (from the {source}) {problem}. {remedy}")
    return path


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Return the hex digest of a file, read in 1 MiB chunks.

    ``algorithm`` is any name that :func:`hashlib.new` accepts ("sha256", "md5").
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256sum(path: str | os.PathLike) -> str:
    """Return the SHA-256 hex digest of a file."""
    return file_digest(path, "sha256")


def verify_checksum(path: str | os.PathLike, expected: str, algorithm: str = "sha256") -> None:
    """Check that the digest of ``path`` equals ``expected`` (hex, any case).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the digests differ. The message names the file, both digests
            and the remedy.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Cannot verify the checksum of {path}: file not found.")

    actual = file_digest(path, algorithm)
    if actual.lower() != expected.strip().lower():
        raise ValueError(
            f"Checksum mismatch for {path}: expected {algorithm} {expected.lower()}, "
            f"got {actual}. The file is corrupt or a different version. Delete it and "
            "download it again."
        )


def download(
    url: str,
    destination: str | os.PathLike,
    checksum: str,
    algorithm: str = "sha256",
) -> Path:
    """Download ``url`` to ``destination`` and verify its checksum.

    The data is streamed into a temporary file in the destination folder and
    hashed on the way. Only a file whose digest matches ``checksum`` is moved
    to ``destination`` (an atomic rename), so an interrupted or corrupt
    download never leaves a file at ``destination``. A ``destination`` that
    already exists with the right checksum is kept and not downloaded again.

    Returns:
        The destination path.

    Raises:
        RuntimeError: the download failed (network error, HTTP error, missing
            ``file://`` source). The message names the URL and the remedy.
        ValueError: the downloaded bytes have another checksum.
    """
    destination = Path(destination)
    if destination.is_file():
        try:
            verify_checksum(destination, checksum, algorithm)
        except ValueError:
            logger.warning("Existing file %s has the wrong checksum, so it is downloaded again", destination)
        else:
            logger.info("Using the existing verified file %s", destination)
            return destination

    destination.parent.mkdir(parents=True, exist_ok=True)
    temp_path = partial_path(destination)
    try:
        with open(temp_path, "wb") as output:
            actual = _stream_url(url, output, algorithm)
        if actual.lower() != checksum.strip().lower():
            raise ValueError(
                f"Checksum mismatch for the download of {url}: expected {algorithm} "
                f"{checksum.lower()}, got {actual}. The partial file was deleted. Try "
                "again later; if the mismatch persists, the file on the server has changed."
            )
        os.replace(temp_path, destination)
    finally:
        temp_path.unlink(missing_ok=True)

    logger.info("Downloaded %s to %s (%s verified)", url, destination, algorithm)
    return destination


def partial_path(destination: Path) -> Path:
    """Return a temporary name beside ``destination`` for writing before an atomic rename."""
    return destination.with_name(f".{destination.name}.{os.getpid()}.part")


def _stream_url(url: str, output, algorithm: str) -> str:
    """Copy the body of ``url`` into the open binary file ``output`` and return its hex digest."""
    digest = hashlib.new(algorithm)
    logger.info("Downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, desc=PurePosixPath(url).name) as progress:
                for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                    output.write(chunk)
                    digest.update(chunk)
                    progress.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise RuntimeError(
            f"Download of {url} failed: {error}. Check the network connection, or "
            "download the file by hand and put it in the raw-data folder."
        ) from error
    return digest.hexdigest()


def checksum_record(path: Path, expected: str | None, algorithm: str = "sha256") -> dict[str, Any]:
    """Hash ``path`` and describe it for a dataset manifest.

    Returns:
        ``{"file": name, "algorithm", "digest", "expected", "verified"}``, where
        ``verified`` is true when the digest equals ``expected``.
    """
    digest = file_digest(path, algorithm)
    return {
        "file": Path(path).name,
        "algorithm": algorithm,
        "digest": digest,
        "expected": expected,
        "verified": expected is not None and digest == expected.lower(),
    }


def check_archive_member(archive: str | os.PathLike, name: str) -> PurePosixPath:
    """Return the archive member ``name`` as a relative path, rejecting unsafe names.

    Raises:
        ValueError: the name is absolute, contains ``..`` or is empty, so that
            extracting it could write outside the target folder.
    """
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts or ":" in path.parts[0]:
        raise ValueError(
            f"Archive {archive} contains the unsafe member name {name!r} (absolute or "
            "containing '..'). Nothing was extracted from it. Replace the archive with "
            "an official copy."
        )
    return path


def check_tar_members(archive: str | os.PathLike, members: list[tarfile.TarInfo]) -> None:
    """Reject a tar archive with unsafe names or with links, devices or FIFOs.

    Raises:
        ValueError: naming the archive and the first bad member.
    """
    for member in members:
        check_archive_member(archive, member.name)
        if not (member.isfile() or member.isdir()):
            raise ValueError(
                f"Archive {archive} contains the member {member.name!r}, which is a link "
                "or special file. Nothing was extracted from it. Replace the archive "
                "with an official copy."
            )


def extract_tar_members(
    archive: tarfile.TarFile,
    members: list[tarfile.TarInfo],
    destination: Path,
    strip_components: int = 0,
    description: str = "extract",
) -> list[Path]:
    """Write the regular-file ``members`` of an open tar archive under ``destination``.

    Names are checked with :func:`check_archive_member`. The first
    ``strip_components`` folder levels of each name are dropped, like
    ``tar --strip-components``. File modes, owners and times are not restored.

    Returns:
        The written paths, in the order of ``members``.
    """
    written = []
    for member in tqdm(members, desc=description, unit="file"):
        relative = check_archive_member(archive.name, member.name)
        relative = PurePosixPath(*relative.parts[strip_components:])
        target = destination.joinpath(*relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        source = archive.extractfile(member)
        if source is None:
            raise ValueError(f"Archive {archive.name} member {member.name!r} is not a regular file.")
        with source, open(target, "wb") as output:
            shutil.copyfileobj(source, output, _CHUNK_BYTES)
        written.append(target)
    return written


def extract_zip_member(archive: str | os.PathLike, member: str, destination: str | os.PathLike) -> Path:
    """Copy one member of a zip archive to the file ``destination`` (atomic rename).

    Raises:
        ValueError: the archive is not a zip file, or ``member`` is unsafe.
        KeyError: the archive has no member ``member``. The message lists the
            archive path.
    """
    check_archive_member(archive, member)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as source_zip:
            try:
                info = source_zip.getinfo(member)
            except KeyError:
                raise KeyError(f"Zip archive {archive} has no member {member!r}.") from None
            temp_path = partial_path(destination)
            try:
                with open(temp_path, "wb") as output, source_zip.open(info) as source:
                    shutil.copyfileobj(source, output, _CHUNK_BYTES)
                os.replace(temp_path, destination)
            finally:
                temp_path.unlink(missing_ok=True)
    except zipfile.BadZipFile as error:
        raise ValueError(
            f"File {archive} is not a valid zip archive ({error}). Delete it and download it "
            "again."
        ) from error
    return destination
