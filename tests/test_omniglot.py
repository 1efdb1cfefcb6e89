"""Tests for the Omniglot builder on a tiny synthetic raw-data folder."""

import hashlib
import io
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from s2m.datasets import DATASET_BUILDERS, build_dataset, omniglot
from s2m.datasets.omniglot import build_omniglot, read_npz_headers
from s2m.datasets.table import read_concept_table, read_image_table

# (alphabet, first character id, last character id, Omniglot set)
ALPHABETS = [
    ("Alpha", 1, 2, "background"),
    ("Beta", 3, 4, "background"),
    ("Gamma", 5, 6, "background"),
    ("Delta", 7, 8, "evaluation"),
    ("Epsilon", 9, 9, "evaluation"),
]
N_BACKGROUND = 6
N_EVALUATION = 3


def synthetic_images(first_id: int, n_characters: int) -> np.ndarray:
    """Return bool (n, 20, 105, 105), True = background, with an asymmetric L-shaped stroke per image."""
    images = np.ones((n_characters, 20, 105, 105), dtype=bool)
    for row in range(n_characters):
        for drawer in range(20):
            top = 10 + 3 * ((first_id + row) % 10)
            left = 10 + drawer
            images[row, drawer, top : top + 50, left : left + 8] = False
            images[row, drawer, top + 42 : top + 50, left : left + 40] = False
    return images


def write_alphabets(folder: Path) -> None:
    frame = pd.DataFrame(ALPHABETS, columns=["alphabet", "first_character_id", "last_character_id", "omniglot_set"])
    frame[["first_character_id", "last_character_id", "alphabet", "omniglot_set"]].to_csv(
        folder / "alphabets.csv", index=False
    )


def write_npz(path: Path, images: np.ndarray) -> None:
    labels = np.repeat(np.arange(images.shape[0])[:, None], 20, axis=1).astype(np.int64)
    np.savez_compressed(path, images=images, labels=labels)


@pytest.fixture
def raw_omniglot(tmp_path) -> Path:
    """Raw-data folder with omniglot/ holding 6 background and 3 evaluation characters."""
    folder = tmp_path / "raw" / "omniglot"
    folder.mkdir(parents=True)
    write_npz(folder / "images_background.npz", synthetic_images(1, N_BACKGROUND))
    write_npz(folder / "images_evaluation.npz", synthetic_images(N_BACKGROUND + 1, N_EVALUATION))
    write_alphabets(folder)
    return folder.parent


def build_tiny(raw_dir: Path, out_dir: Path, **params) -> Path:
    params.setdefault("n_validation_alphabets", 1)
    return build_omniglot(raw_dir, out_dir, **params)


def test_build_counts_and_shapes(raw_omniglot, tmp_path):
    out = build_tiny(raw_omniglot, tmp_path / "out")

    pixels = np.load(out / "images.npy")
    images = read_image_table(out)
    concepts = read_concept_table(out)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (9 * 4 * 20, 28, 28)
    assert len(images) == pixels.shape[0]
    assert len(concepts) == 9 * 4
    assert (concepts["n_images"] == 20).all()
    assert (images["path"] == "").all()


def test_build_ink_is_bright(raw_omniglot, tmp_path):
    out = build_tiny(raw_omniglot, tmp_path / "out")

    pixels = np.load(out / "images.npy")
    assert pixels[:, 0, 0].max() == 0
    assert pixels.max() == 255
    assert 0.02 < (pixels > 127).mean() < 0.5


def test_rotation_concepts(raw_omniglot, tmp_path):
    out = build_tiny(raw_omniglot, tmp_path / "out")

    pixels = np.load(out / "images.npy")
    images = read_image_table(out)
    first = images[images["character_id"] == 1]
    assert sorted(first["concept"].unique()) == [
        "omniglot/c0001/r000",
        "omniglot/c0001/r090",
        "omniglot/c0001/r180",
        "omniglot/c0001/r270",
    ]
    upright = first[(first["rotation"] == 0) & (first["drawer"] == 3)]["image_id"].item()
    turned = first[(first["rotation"] == 90) & (first["drawer"] == 3)]["image_id"].item()
    np.testing.assert_array_equal(pixels[turned], np.rot90(pixels[upright]))
    assert not np.array_equal(pixels[turned], pixels[upright])


def test_no_character_in_two_splits(raw_omniglot, tmp_path):
    out = build_tiny(raw_omniglot, tmp_path / "out")

    images = read_image_table(out)
    assert (images.groupby("character_id")["split"].nunique() == 1).all()
    assert (images.groupby("alphabet")["split"].nunique() == 1).all()


def test_split_by_alphabet(raw_omniglot, tmp_path):
    out = build_tiny(raw_omniglot, tmp_path / "out")

    images = read_image_table(out)
    manifest = json.loads((out / "manifest.json").read_text())
    split_of = images.groupby("alphabet")["split"].first()
    assert sorted(split_of[split_of == "meta_val"].index) == manifest["validation_alphabets"]
    assert len(manifest["validation_alphabets"]) == 1
    assert (split_of[["Delta", "Epsilon"]] == "meta_test").all()
    assert (split_of == "meta_train").sum() == 2
    assert manifest["counts"]["images"]["meta_test"] == N_EVALUATION * 4 * 20


def test_split_same_for_same_seed(raw_omniglot, tmp_path):
    first = read_image_table(build_tiny(raw_omniglot, tmp_path / "a", seed=3))
    second = read_image_table(build_tiny(raw_omniglot, tmp_path / "b", seed=3))

    pd.testing.assert_frame_equal(first, second)


def test_image_size_and_rotation_subset(raw_omniglot, tmp_path):
    out = build_tiny(raw_omniglot, tmp_path / "out", image_size=14, rotations=(0, 180))

    pixels = np.load(out / "images.npy")
    images = read_image_table(out)
    assert pixels.shape == (9 * 2 * 20, 14, 14)
    assert set(images["rotation"]) == {0, 180}


def test_max_characters_keeps_each_split(raw_omniglot, tmp_path):
    out = build_tiny(raw_omniglot, tmp_path / "out", max_characters=2)
    again = build_tiny(raw_omniglot, tmp_path / "again", max_characters=2)

    images = read_image_table(out)
    per_split = images.groupby("split")["character_id"].nunique()
    assert per_split.to_dict() == {"meta_test": 2, "meta_train": 1, "meta_val": 1}
    assert images["character_id"].is_monotonic_increasing
    pd.testing.assert_frame_equal(images, read_image_table(again))


def test_too_many_validation_alphabets(raw_omniglot, tmp_path):
    with pytest.raises(ValueError, match="n_validation_alphabets=3"):
        build_omniglot(raw_omniglot, tmp_path / "out", n_validation_alphabets=3)


def test_invalid_rotation(raw_omniglot, tmp_path):
    with pytest.raises(ValueError, match="rotations"):
        build_tiny(raw_omniglot, tmp_path / "out", rotations=(0, 45))


def test_missing_raw_folder_names_path(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build_omniglot(tmp_path / "nowhere", tmp_path / "out")
    assert str(tmp_path / "nowhere" / "omniglot") in str(error.value)


def test_missing_npz_names_path(raw_omniglot, tmp_path):
    missing = raw_omniglot / "omniglot" / "images_evaluation.npz"
    missing.unlink()

    with pytest.raises(FileNotFoundError) as error:
        build_tiny(raw_omniglot, tmp_path / "out")
    assert str(missing) in str(error.value)
    assert "download=True" in str(error.value)


def test_missing_alphabets_csv(raw_omniglot, tmp_path):
    (raw_omniglot / "omniglot" / "alphabets.csv").unlink()

    with pytest.raises(FileNotFoundError, match="alphabets.csv"):
        build_tiny(raw_omniglot, tmp_path / "out")


def test_corrupt_npz_not_a_zip(raw_omniglot, tmp_path):
    corrupt = raw_omniglot / "omniglot" / "images_background.npz"
    corrupt.write_bytes(b"this is not an npz file")

    with pytest.raises(ValueError) as error:
        build_tiny(raw_omniglot, tmp_path / "out")
    assert str(corrupt) in str(error.value)
    assert "not a valid .npz" in str(error.value)


def test_corrupt_npz_missing_key(raw_omniglot, tmp_path):
    corrupt = raw_omniglot / "omniglot" / "images_background.npz"
    np.savez_compressed(corrupt, images=synthetic_images(1, N_BACKGROUND))

    with pytest.raises(ValueError) as error:
        build_tiny(raw_omniglot, tmp_path / "out")
    assert str(corrupt) in str(error.value)
    assert "labels" in str(error.value)


def test_corrupt_npz_wrong_dtype(raw_omniglot, tmp_path):
    corrupt = raw_omniglot / "omniglot" / "images_background.npz"
    write_npz(corrupt, synthetic_images(1, N_BACKGROUND).astype(np.uint8))

    with pytest.raises(ValueError, match="must be bool"):
        build_tiny(raw_omniglot, tmp_path / "out")


def test_npz_rows_disagree_with_alphabets(raw_omniglot, tmp_path):
    write_npz(raw_omniglot / "omniglot" / "images_background.npz", synthetic_images(1, N_BACKGROUND - 1))

    with pytest.raises(ValueError, match="5 characters"):
        build_tiny(raw_omniglot, tmp_path / "out")


def test_checksum_mismatch_warns(raw_omniglot, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="s2m.datasets.omniglot"):
        out = build_tiny(raw_omniglot, tmp_path / "out")

    manifest = json.loads((out / "manifest.json").read_text())
    assert "images_background.npz has sha256" in caplog.text
    assert all(not record["verified"] for record in manifest["inputs"])


def write_official_zip(path: Path, omniglot_set: str, first_id: int, images: np.ndarray) -> None:
    """Write images in the official layout images_<set>/<alphabet>/characterNN/<id>_<drawer>.png."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, first, last, part in ALPHABETS:
            if part != omniglot_set:
                continue
            for number, character_id in enumerate(range(first, last + 1), start=1):
                for drawer in range(1, 21):
                    buffer = io.BytesIO()
                    Image.fromarray(images[character_id - first_id, drawer - 1]).save(buffer, format="PNG")
                    member = f"images_{omniglot_set}/{name}_script/character{number:02d}/{character_id:04d}_{drawer:02d}.png"
                    archive.writestr(member, buffer.getvalue())


def test_download_official_zips(raw_omniglot, tmp_path, monkeypatch):
    served = tmp_path / "server"
    served.mkdir()
    sets = {"background": (1, synthetic_images(1, N_BACKGROUND)), "evaluation": (7, synthetic_images(7, N_EVALUATION))}
    checksums = {}
    for name, (first_id, images) in sets.items():
        write_official_zip(served / f"images_{name}.zip", name, first_id, images)
        checksums[name] = hashlib.md5((served / f"images_{name}.zip").read_bytes()).hexdigest()
    monkeypatch.setattr(omniglot, "OFFICIAL_URL_PREFIX", served.as_uri())
    monkeypatch.setattr(omniglot, "OFFICIAL_ZIP_MD5", checksums)
    empty_raw = tmp_path / "empty_raw"

    out = build_tiny(empty_raw, tmp_path / "from_zip", download=True)

    reference = build_tiny(raw_omniglot, tmp_path / "from_npz")
    np.testing.assert_array_equal(np.load(out / "images.npy"), np.load(reference / "images.npy"))
    assert (empty_raw / "omniglot" / "images_background.zip").is_file()
    images = read_image_table(out)
    assert set(images["alphabet"]) == {"Alpha script", "Beta script", "Gamma script", "Delta script", "Epsilon script"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert [record["verified"] for record in manifest["inputs"]] == [True, True]


def test_build_dataset_registry(raw_omniglot, tmp_path):
    out = build_dataset("omniglot", raw_omniglot, tmp_path / "out", n_validation_alphabets=1, rotations=(0,))

    assert set(DATASET_BUILDERS) == {"omniglot", "caltech101"}
    assert len(read_image_table(out)) == 9 * 20


def test_build_dataset_unknown_name(tmp_path):
    with pytest.raises(ValueError) as error:
        build_dataset("mnist", tmp_path, tmp_path / "out")
    assert "'mnist'" in str(error.value)
    assert "caltech101, omniglot" in str(error.value)


def test_real_mirror_npz_headers(raw_data_dir):
    """Light check of the real mirror: array headers and checksums, no full decode."""
    folder = raw_data_dir / "omniglot"
    expected_rows = {"background": 964, "evaluation": 659}

    for name, rows in expected_rows.items():
        path = folder / f"images_{name}.npz"
        headers = read_npz_headers(path)
        assert headers["images"] == ((rows, 20, 105, 105), np.dtype(bool))
        assert headers["labels"][0] == (rows, 20)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == omniglot.MIRROR_SHA256[path.name]
