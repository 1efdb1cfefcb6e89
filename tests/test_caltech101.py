"""Tests for the Caltech-101 builder on tiny synthetic archives, and for the table helpers."""

import hashlib
import io
import json
import logging
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from s2m.datasets import caltech101
from s2m.datasets.caltech101 import assign_category_splits, build_caltech101, split_counts
from s2m.datasets.table import load_rgb_image, read_concept_table, read_image_table

OBJECT_FOLDERS = ["accordion", "ant", "barrel", "camera", "chair", "Faces", "Faces_easy"]
IMAGES_PER_FOLDER = 3
N_CLUTTER_JPG = 6
GREYSCALE_MEMBER = "101_ObjectCategories/ant/image_0002.jpg"


def jpeg_bytes(mode: str, seed: int) -> bytes:
    """Return a small JPEG in PIL ``mode`` ("RGB" or "L") with seeded noise."""
    rng = np.random.default_rng(seed)
    shape = (12, 16, 3) if mode == "RGB" else (12, 16)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(buffer, format="JPEG")
    return buffer.getvalue()


def add_file(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_caltech_tar(path: Path, tmp_content: bytes, extra: list[tarfile.TarInfo] = ()) -> Path:
    """Write a tiny 101_ObjectCategories.tar.gz with 7 object folders and BACKGROUND_Google."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        seed = 0
        for folder in OBJECT_FOLDERS:
            for number in range(1, IMAGES_PER_FOLDER + 1):
                name = f"101_ObjectCategories/{folder}/image_{number:04d}.jpg"
                add_file(archive, name, jpeg_bytes("L" if name == GREYSCALE_MEMBER else "RGB", seed))
                seed += 1
        for number in range(1, N_CLUTTER_JPG + 1):
            add_file(archive, f"101_ObjectCategories/BACKGROUND_Google/image_{number:04d}.jpg", jpeg_bytes("RGB", seed))
            seed += 1
        add_file(archive, "101_ObjectCategories/BACKGROUND_Google/tmp", tmp_content)
        for info in extra:
            archive.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


@pytest.fixture
def raw_caltech(tmp_path) -> Path:
    """Raw-data folder whose BACKGROUND_Google/tmp is a valid JPEG."""
    raw = tmp_path / "raw"
    write_caltech_tar(raw / "caltech101" / "101_ObjectCategories.tar.gz", jpeg_bytes("RGB", 99))
    return raw


def test_build_tables(raw_caltech, tmp_path):
    out = build_caltech101(raw_caltech, tmp_path / "out")

    images = read_image_table(out)
    concepts = read_concept_table(out)
    n_objects = (len(OBJECT_FOLDERS) - 1) * IMAGES_PER_FOLDER
    assert len(images) == n_objects + N_CLUTTER_JPG + 1
    assert all((out / path).is_file() for path in images["path"])
    assert set(images["split"]) == {"meta_train", "meta_val", "meta_test", "clutter_noise", "clutter_gallery"}
    assert concepts.set_index(["concept", "split"])["n_images"].sum() == len(images)
    assert "caltech101/accordion" in set(concepts["concept"])


def test_splits_deterministic(raw_caltech, tmp_path):
    first = build_caltech101(raw_caltech, tmp_path / "a", seed=7)
    second = build_caltech101(raw_caltech, tmp_path / "b", seed=7)

    splits = pd.read_csv(first / "splits.csv")
    assert (first / "splits.csv").read_bytes() == (second / "splits.csv").read_bytes()
    assert sorted(splits["category"]) == sorted(["accordion", "ant", "barrel", "camera", "chair", "Faces"])
    assert splits["split"].value_counts().to_dict() == {"meta_train": 3, "meta_test": 2, "meta_val": 1}


def test_splits_match_image_table(raw_caltech, tmp_path):
    out = build_caltech101(raw_caltech, tmp_path / "out")

    splits = pd.read_csv(out / "splits.csv").set_index("category")["split"]
    images = read_image_table(out)
    objects = images[~images["is_clutter"]]
    assert (objects["split"].to_numpy() == splits[objects["category"]].to_numpy()).all()


def test_split_counts_rounding():
    assert split_counts(100, (0.6, 0.1, 0.3)) == [60, 10, 30]
    assert split_counts(6, (0.6, 0.1, 0.3)) == [3, 1, 2]
    assert split_counts(3, (0.9, 0.05, 0.05)) == [1, 1, 1]
    assert split_counts(5, (1.0, 0.0, 0.0)) == [5, 0, 0]
    with pytest.raises(ValueError, match="Cannot split 2 categories"):
        split_counts(2, (0.6, 0.1, 0.3))


def test_category_split_seed_changes_assignment():
    categories = [f"category{i:03d}" for i in range(100)]

    first = assign_category_splits(categories, (0.6, 0.1, 0.3), seed=0)
    again = assign_category_splits(list(reversed(categories)), (0.6, 0.1, 0.3), seed=0)
    other = assign_category_splits(categories, (0.6, 0.1, 0.3), seed=1)
    assert first == again
    assert first != other
    assert sorted(pd.Series(first).value_counts().tolist()) == [10, 30, 60]


def test_faces_easy_dropped_by_default(raw_caltech, tmp_path):
    out = build_caltech101(raw_caltech, tmp_path / "out")

    images = read_image_table(out)
    assert "Faces_easy" not in set(images["folder"])
    assert "caltech101/Faces_easy" not in set(images["concept"])
    assert (images["concept"] == "caltech101/Faces").sum() == IMAGES_PER_FOLDER
    assert not (out / "images" / "Faces_easy").exists()


def test_faces_merge(raw_caltech, tmp_path):
    out = build_caltech101(raw_caltech, tmp_path / "out", faces="merge")

    images = read_image_table(out)
    faces = images[images["concept"] == "caltech101/Faces"]
    assert len(faces) == 2 * IMAGES_PER_FOLDER
    assert set(faces["folder"]) == {"Faces", "Faces_easy"}
    assert faces["split"].nunique() == 1
    assert "Faces_easy" not in set(pd.read_csv(out / "splits.csv")["category"])


def test_invalid_faces_option(raw_caltech, tmp_path):
    with pytest.raises(ValueError, match="faces must be one of"):
        build_caltech101(raw_caltech, tmp_path / "out", faces="keep")


def test_greyscale_loaded_as_rgb(raw_caltech, tmp_path):
    out = build_caltech101(raw_caltech, tmp_path / "out")

    images = read_image_table(out)
    row = images[images["path"] == "images/ant/image_0002.jpg"].iloc[0]
    assert row["mode"] == "L"
    image = load_rgb_image(out / row["path"])
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert pixels.shape == (12, 16, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all()
    assert (images["mode"] == "L").sum() == 1


def test_load_rgb_image_palette_and_cmyk(tmp_path):
    palette = tmp_path / "palette.png"
    Image.new("P", (4, 3), color=1).save(palette)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (4, 3), color=(0, 255, 255, 0)).save(cmyk)

    assert load_rgb_image(palette).mode == "RGB"
    assert load_rgb_image(cmyk).mode == "RGB"
    assert load_rgb_image(cmyk).size == (4, 3)


def test_load_rgb_image_errors(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")

    with pytest.raises(ValueError, match="broken.jpg"):
        load_rgb_image(broken)
    with pytest.raises(FileNotFoundError):
        load_rgb_image(tmp_path / "missing.jpg")


def test_valid_tmp_is_clutter(raw_caltech, tmp_path):
    out = build_caltech101(raw_caltech, tmp_path / "out")

    images = read_image_table(out)
    row = images[images["path"] == "images/BACKGROUND_Google/tmp"]
    assert len(row) == 1
    assert row["concept"].item() == "caltech101/BACKGROUND_Google"
    assert row["split"].item() in {"clutter_noise", "clutter_gallery"}
    assert load_rgb_image(out / "images/BACKGROUND_Google/tmp").mode == "RGB"


def test_invalid_tmp_skipped(tmp_path, caplog):
    raw = tmp_path / "raw"
    write_caltech_tar(raw / "caltech101" / "101_ObjectCategories.tar.gz", b"\x00\x01 not an image")

    with caplog.at_level(logging.WARNING, logger="s2m.datasets.caltech101"):
        out = build_caltech101(raw, tmp_path / "out")

    images = read_image_table(out)
    assert "tmp" not in set(images["file_name"])
    assert (images["is_clutter"]).sum() == N_CLUTTER_JPG
    assert "BACKGROUND_Google/tmp" in caplog.text


def test_clutter_split_fraction(raw_caltech, tmp_path):
    out = build_caltech101(raw_caltech, tmp_path / "out", clutter_noise_fraction=0.25)

    images = read_image_table(out)
    clutter = images[images["is_clutter"]]
    concepts = read_concept_table(out)
    assert (clutter["split"] == "clutter_noise").sum() == round(0.25 * (N_CLUTTER_JPG + 1))
    assert (clutter["split"] == "clutter_gallery").sum() == N_CLUTTER_JPG + 1 - 2
    assert set(concepts.loc[concepts["is_clutter"], "split"]) == {"clutter_noise", "clutter_gallery"}


def test_max_images_per_category(raw_caltech, tmp_path):
    first = read_image_table(build_caltech101(raw_caltech, tmp_path / "a", max_images_per_category=2))
    second = read_image_table(build_caltech101(raw_caltech, tmp_path / "b", max_images_per_category=2))

    assert (first.groupby("folder").size() == 2).all()
    pd.testing.assert_frame_equal(first, second)


def unsafe_member(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    else:
        info.size = 1
    return info


@pytest.mark.parametrize(
    "member",
    [
        unsafe_member("101_ObjectCategories/../../evil.jpg"),
        unsafe_member("/tmp/s2m_evil/evil.jpg"),
        unsafe_member("101_ObjectCategories/ant/link.jpg", tarfile.SYMTYPE),
    ],
    ids=["dotdot", "absolute", "symlink"],
)
def test_unsafe_member_rejected(tmp_path, member):
    raw = tmp_path / "raw" / "nested"
    tar_path = write_caltech_tar(raw / "caltech101" / "101_ObjectCategories.tar.gz", jpeg_bytes("RGB", 1), [member])
    out = tmp_path / "raw" / "nested" / "out"

    with pytest.raises(ValueError) as error:
        build_caltech101(raw, out)
    assert str(tar_path) in str(error.value)
    assert not (tmp_path / "raw" / "evil.jpg").exists()
    assert not Path("/tmp/s2m_evil/evil.jpg").exists()
    assert not (out / "images").exists()


def test_failed_rebuild_removes_manifest(raw_caltech, tmp_path, monkeypatch):
    out = build_caltech101(raw_caltech, tmp_path / "out")
    old_images = sorted(path.name for path in (out / "images").iterdir())

    def failing_extract(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(caltech101.rawdata, "extract_tar_members", failing_extract)
    with pytest.raises(OSError, match="disk full"):
        build_caltech101(raw_caltech, out, seed=1)

    assert not (out / "manifest.json").exists()
    assert not (out / ".images.partial").exists()
    assert sorted(path.name for path in (out / "images").iterdir()) == old_images


def test_missing_archive_names_path(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build_caltech101(tmp_path, tmp_path / "out")
    assert str(tmp_path / "caltech101" / "101_ObjectCategories.tar.gz") in str(error.value)


def test_corrupt_archive_names_path(tmp_path):
    tar_path = tmp_path / "caltech101" / "101_ObjectCategories.tar.gz"
    tar_path.parent.mkdir()
    tar_path.write_bytes(b"not a tar.gz")

    with pytest.raises(ValueError) as error:
        build_caltech101(tmp_path, tmp_path / "out")
    assert str(tar_path) in str(error.value)


def test_download_official_zip(tmp_path, monkeypatch):
    tar_path = write_caltech_tar(tmp_path / "build" / "101_ObjectCategories.tar.gz", jpeg_bytes("RGB", 5))
    served = tmp_path / "server" / "caltech-101.zip"
    served.parent.mkdir()
    with zipfile.ZipFile(served, "w") as archive:
        archive.write(tar_path, "caltech-101/101_ObjectCategories.tar.gz")
        archive.writestr("caltech-101/show_annotation.m", "% not used")
    monkeypatch.setattr(caltech101, "OFFICIAL_ZIP_URL", served.as_uri())
    monkeypatch.setattr(caltech101, "OFFICIAL_ZIP_MD5", hashlib.md5(served.read_bytes()).hexdigest())
    monkeypatch.setattr(caltech101, "OFFICIAL_TAR_MD5", hashlib.md5(tar_path.read_bytes()).hexdigest())
    raw = tmp_path / "raw"

    out = build_caltech101(raw, tmp_path / "out", download=True)

    manifest = json.loads((out / "manifest.json").read_text())
    assert [record["file"] for record in manifest["inputs"]] == ["caltech-101.zip", "101_ObjectCategories.tar.gz"]
    assert all(record["verified"] for record in manifest["inputs"])
    assert (raw / "caltech101" / "101_ObjectCategories.tar.gz").read_bytes() == tar_path.read_bytes()
    assert len(read_image_table(out)) == (len(OBJECT_FOLDERS) - 1) * IMAGES_PER_FOLDER + N_CLUTTER_JPG + 1


def test_download_checksum_mismatch(tmp_path, monkeypatch):
    served = tmp_path / "caltech-101.zip"
    with zipfile.ZipFile(served, "w") as archive:
        archive.writestr("caltech-101/other.txt", "x")
    monkeypatch.setattr(caltech101, "OFFICIAL_ZIP_URL", served.as_uri())

    with pytest.raises(ValueError, match="Checksum mismatch"):
        build_caltech101(tmp_path / "raw", tmp_path / "out", download=True)
    assert not (tmp_path / "raw" / "caltech101" / "caltech-101.zip").exists()


def test_read_image_table_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        read_image_table(tmp_path)
    assert str(tmp_path / "images.csv") in str(error.value)


def test_read_image_table_missing_column(tmp_path):
    pd.DataFrame({"image_id": [0], "concept": ["a"], "path": [""]}).to_csv(tmp_path / "images.csv", index=False)

    with pytest.raises(ValueError) as error:
        read_image_table(tmp_path)
    assert str(tmp_path / "images.csv") in str(error.value)
    assert "split" in str(error.value)


def test_read_image_table_bad_rows(tmp_path):
    pd.DataFrame(
        {"image_id": [0, 2], "concept": ["a", "b"], "split": ["meta_train", "meta_test"], "path": ["", ""]}
    ).to_csv(tmp_path / "images.csv", index=False)

    with pytest.raises(ValueError, match="image_id must be 0, 1, ..., N-1"):
        read_image_table(tmp_path)


def test_read_image_table_unknown_split(tmp_path):
    pd.DataFrame({"image_id": [0], "concept": ["a"], "split": ["train"], "path": [""]}).to_csv(
        tmp_path / "images.csv", index=False
    )

    with pytest.raises(ValueError, match=r"unknown split values \['train'\]"):
        read_image_table(tmp_path)


def test_read_concept_table_duplicate(tmp_path):
    pd.DataFrame({"concept": ["a", "a"], "split": ["meta_train", "meta_train"], "n_images": [3, 3]}).to_csv(
        tmp_path / "concepts.csv", index=False
    )

    with pytest.raises(ValueError, match="appears twice"):
        read_concept_table(tmp_path)
