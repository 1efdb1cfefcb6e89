"""Tests for s2m.rawdata: raw-data folder lookup, checksums, download and archive safety."""

import hashlib
import http.client
import urllib.error
import zipfile

import pytest

from s2m import rawdata

ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_resolve_env_overrides_config(tmp_path, monkeypatch):
    env_dir = tmp_path / "from_env"
    config_dir = tmp_path / "from_config"
    env_dir.mkdir()
    config_dir.mkdir()
    monkeypatch.setenv(rawdata.RAW_DATA_ENV_VAR, str(env_dir))

    assert rawdata.resolve_raw_data_dir(str(config_dir)) == env_dir.resolve()


def test_resolve_relative_config_uses_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv(rawdata.RAW_DATA_ENV_VAR, raising=False)
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)

    assert rawdata.resolve_raw_data_dir("data") == (tmp_path / "data").resolve()


def test_resolve_missing_env_folder_names_path(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(rawdata.RAW_DATA_ENV_VAR, str(missing))

    with pytest.raises(FileNotFoundError) as error:
        rawdata.resolve_raw_data_dir(None)
    message = str(error.value)
    assert str(missing) in message
    assert "environment variable S2M_RAW_DATA" in message
    assert "raw_data_dir" in message


def test_resolve_missing_config_folder_names_source(tmp_path, monkeypatch):
    monkeypatch.delenv(rawdata.RAW_DATA_ENV_VAR, raising=False)
    missing = tmp_path / "nowhere"

    with pytest.raises(FileNotFoundError) as error:
        rawdata.resolve_raw_data_dir(str(missing))
    assert str(missing) in str(error.value)
    assert "config_value argument" in str(error.value)


def test_pipeline_missing_folder_names_config_entry(tmp_path, monkeypatch):
    from s2m.pipeline.common import raw_data_dir

    monkeypatch.delenv(rawdata.RAW_DATA_ENV_VAR, raising=False)
    missing = tmp_path / "nowhere"

    with pytest.raises(FileNotFoundError) as error:
        raw_data_dir({"raw_data_dir": str(missing)})
    assert str(missing) in str(error.value)
    assert "config entry raw_data_dir" in str(error.value)


def test_resolve_missing_env_folder_suggests_unsetting(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(rawdata.RAW_DATA_ENV_VAR, str(missing))

    with pytest.raises(FileNotFoundError) as error:
        rawdata.resolve_raw_data_dir(str(tmp_path))
    assert "environment variable S2M_RAW_DATA" in str(error.value)
    assert "or unset it" in str(error.value)


def test_resolve_file_instead_of_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(rawdata.RAW_DATA_ENV_VAR, raising=False)
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")

    with pytest.raises(FileNotFoundError, match="is not a folder"):
        rawdata.resolve_raw_data_dir(str(not_a_folder))


def test_resolve_unset_raises(monkeypatch):
    monkeypatch.delenv(rawdata.RAW_DATA_ENV_VAR, raising=False)

    with pytest.raises(ValueError, match="S2M_RAW_DATA"):
        rawdata.resolve_raw_data_dir(None)


@pytest.mark.parametrize("value", ["", "  ", None])
def test_pipeline_empty_config_entry_raises(monkeypatch, value):
    from s2m.pipeline.common import raw_data_dir

    monkeypatch.delenv(rawdata.RAW_DATA_ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="No raw-data folder is set"):
        raw_data_dir({"raw_data_dir": value})


def test_pipeline_relative_entry_uses_repository_root(tmp_path, monkeypatch):
    from s2m.pipeline.common import REPOSITORY_ROOT, raw_data_dir

    monkeypatch.delenv(rawdata.RAW_DATA_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    assert raw_data_dir({"raw_data_dir": "s2m"}) == (REPOSITORY_ROOT / "s2m").resolve()


def test_tflite_model_downloaded_when_missing(tmp_path, monkeypatch):
    from s2m.pipeline import backbone

    source = tmp_path / "source.tflite"
    source.write_bytes(b"model bytes")
    monkeypatch.setattr(backbone, "TFLITE_URL", source.as_uri())
    monkeypatch.setattr(backbone, "TFLITE_SHA256", hashlib.sha256(b"model bytes").hexdigest())
    monkeypatch.delenv(rawdata.RAW_DATA_ENV_VAR, raising=False)
    raw = tmp_path / "raw"
    raw.mkdir()

    path = backbone.tflite_model_path({"raw_data_dir": str(raw), "download": True})

    assert path == raw / "mobilenet_v2" / "mobilenet_v2_1.0_224_quant.tflite"
    assert path.read_bytes() == b"model bytes"


def test_tflite_model_missing_names_remedy(tmp_path, monkeypatch):
    from s2m.pipeline import backbone

    monkeypatch.delenv(rawdata.RAW_DATA_ENV_VAR, raising=False)

    with pytest.raises(FileNotFoundError, match=r"mobilenet_v2_1.0_224_quant.tflite not found.*download: true"):
        backbone.tflite_model_path({"raw_data_dir": str(tmp_path), "download": False})


def test_tflite_model_other_digest_warns(tmp_path, monkeypatch, caplog):
    from s2m.pipeline import backbone

    monkeypatch.delenv(rawdata.RAW_DATA_ENV_VAR, raising=False)
    model = tmp_path / "mobilenet_v2" / "mobilenet_v2_1.0_224_quant.tflite"
    model.parent.mkdir()
    model.write_bytes(b"another model")

    for download in (False, True):
        caplog.clear()
        with caplog.at_level("WARNING", logger="s2m.pipeline.backbone"):
            path = backbone.tflite_model_path({"raw_data_dir": str(tmp_path), "download": download})

        assert path == model
        assert model.read_bytes() == b"another model"
        assert "not the expected" in caplog.text


def test_tflite_model_checksum_matches_mirror(raw_data_dir, monkeypatch, caplog):
    from s2m.pipeline import backbone

    monkeypatch.setenv(rawdata.RAW_DATA_ENV_VAR, str(raw_data_dir))

    with caplog.at_level("WARNING", logger="s2m.pipeline.backbone"):
        path = backbone.tflite_model_path({"raw_data_dir": "unused", "download": False})

    assert path == raw_data_dir.resolve() / "mobilenet_v2" / "mobilenet_v2_1.0_224_quant.tflite"
    assert "not the expected" not in caplog.text


def test_sha256sum_known_value(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_bytes(b"abc")

    assert rawdata.sha256sum(path) == ABC_SHA256
    assert rawdata.file_digest(path, "md5") == hashlib.md5(b"abc").hexdigest()


def test_verify_checksum_accepts_uppercase(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_bytes(b"abc")

    rawdata.verify_checksum(path, ABC_SHA256.upper())


def test_verify_checksum_mismatch_message(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_bytes(b"abc")
    wrong = "0" * 64

    with pytest.raises(ValueError) as error:
        rawdata.verify_checksum(path, wrong)
    message = str(error.value)
    assert str(path) in message
    assert wrong in message
    assert ABC_SHA256 in message
    assert "download it again" in message


def test_verify_checksum_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        rawdata.verify_checksum(tmp_path / "missing.bin", ABC_SHA256)


def test_download_file_url(tmp_path):
    source = tmp_path / "source.bin"
    payload = bytes(range(256)) * 5000
    source.write_bytes(payload)
    destination = tmp_path / "out" / "copy.bin"

    result = rawdata.download(source.as_uri(), destination, hashlib.sha256(payload).hexdigest())

    assert result == destination
    assert destination.read_bytes() == payload
    assert list(destination.parent.glob("*.part")) == []


def test_download_md5(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload")
    destination = tmp_path / "copy.bin"

    rawdata.download(source.as_uri(), destination, hashlib.md5(b"payload").hexdigest(), "md5")

    assert destination.read_bytes() == b"payload"


def test_download_checksum_mismatch_leaves_nothing(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload")
    destination = tmp_path / "out" / "copy.bin"

    with pytest.raises(ValueError) as error:
        rawdata.download(source.as_uri(), destination, "0" * 64)
    assert source.as_uri() in str(error.value)
    assert not destination.exists()
    assert list(destination.parent.iterdir()) == []


def test_download_missing_source_names_url(tmp_path):
    url = (tmp_path / "missing.bin").as_uri()

    with pytest.raises(RuntimeError) as error:
        rawdata.download(url, tmp_path / "copy.bin", "0" * 64)
    assert url in str(error.value)
    assert not (tmp_path / "copy.bin").exists()


@pytest.mark.parametrize(
    "error",
    [urllib.error.URLError("connection refused"), http.client.IncompleteRead(b"partial", 100)],
    ids=["refused", "incomplete-read"],
)
def test_download_network_error(tmp_path, monkeypatch, error):
    def failing_urlopen(url, timeout):
        raise error

    monkeypatch.setattr(rawdata.urllib.request, "urlopen", failing_urlopen)

    with pytest.raises(RuntimeError, match=r"Download of https://example.invalid/data.zip failed: .*Check the network"):
        rawdata.download("https://example.invalid/data.zip", tmp_path / "data.zip", "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_download_keeps_verified_file(tmp_path, monkeypatch):
    destination = tmp_path / "data.bin"
    destination.write_bytes(b"abc")

    def unexpected_urlopen(url, timeout):
        raise AssertionError("download() fetched a file that was already verified")

    monkeypatch.setattr(rawdata.urllib.request, "urlopen", unexpected_urlopen)

    assert rawdata.download("https://example.invalid/data.bin", destination, ABC_SHA256) == destination


def test_download_replaces_corrupt_file(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"abc")
    destination = tmp_path / "out.bin"
    destination.write_bytes(b"corrupt")

    rawdata.download(source.as_uri(), destination, ABC_SHA256)

    assert destination.read_bytes() == b"abc"


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/etc/evil.txt", "C:/evil.txt", ""])
def test_archive_member_rejects_unsafe(name):
    with pytest.raises(ValueError, match="unsafe member name"):
        rawdata.check_archive_member("archive.tar", name)


def test_archive_member_accepts_relative():
    assert rawdata.check_archive_member("archive.tar", "a/b/c.jpg").parts == ("a", "b", "c.jpg")


def test_extract_zip_member(tmp_path):
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("inner/file.bin", b"content")

    target = rawdata.extract_zip_member(archive, "inner/file.bin", tmp_path / "out" / "file.bin")

    assert target.read_bytes() == b"content"


def test_extract_zip_member_missing(tmp_path):
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("other.bin", b"content")

    with pytest.raises(KeyError, match="inner/file.bin"):
        rawdata.extract_zip_member(archive, "inner/file.bin", tmp_path / "file.bin")


def test_extract_zip_member_bad_zip(tmp_path):
    archive = tmp_path / "archive.zip"
    archive.write_bytes(b"not a zip")

    with pytest.raises(ValueError, match="not a valid zip"):
        rawdata.extract_zip_member(archive, "inner/file.bin", tmp_path / "file.bin")
