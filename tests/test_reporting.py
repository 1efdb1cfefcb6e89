"""Tests of the summary tables, the noise plot and provenance."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from s2m.evaluation import mean_average_precision
from s2m.reporting import (
    SUMMARY_COLUMNS,
    config_sha256,
    format_table,
    method_marker,
    plot_map_vs_noise,
    provenance,
    summarise_aps,
    write_tables,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METHODS = ["mean_embedding", "gmm"]
PROTOCOLS = ["noise_0.0", "noise_0.5"]


@pytest.fixture(scope="module")
def ap_tables() -> dict[tuple[str, str], pd.DataFrame]:
    rng = np.random.default_rng(0)
    return {
        (method, protocol): pd.DataFrame(
            {"concept": [f"c{i}" for i in range(30)], "average_precision": rng.beta(4, 2, size=30)}
        )
        for method in METHODS
        for protocol in PROTOCOLS
    }


@pytest.fixture(scope="module")
def summary(ap_tables) -> pd.DataFrame:
    return summarise_aps(ap_tables, n_bootstrap=500, seed=3)


@pytest.fixture
def provenance_info() -> dict:
    return {"git_commit": "0123456789abcdef" * 2 + "01234567", "git_dirty": True, "config_sha256": "f" * 64}


def test_summary_matches_bootstrap(ap_tables, summary):
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert len(summary) == 4

    for row in summary.itertuples():
        aps = ap_tables[(row.method, row.protocol)]["average_precision"].to_numpy()
        estimate = mean_average_precision(aps, n_bootstrap=500, seed=3)
        assert (row.map, row.ci_low, row.ci_high, row.n_concepts) == tuple(estimate)
        assert (row.confidence, row.n_bootstrap, row.seed) == (0.95, 500, 3)


def test_summary_rejects_missing_ap_column():
    with pytest.raises(ValueError, match="no 'average_precision' column"):
        summarise_aps({("m", "p"): pd.DataFrame({"ap": [0.5]})})


def test_format_table_cells_and_order(summary):
    table = format_table(summary, method_order=["gmm", "mean_embedding"], protocol_order=PROTOCOLS)

    assert table.index.tolist() == ["gmm", "mean_embedding"]
    assert table.columns.tolist() == PROTOCOLS
    row = summary[(summary["method"] == "gmm") & (summary["protocol"] == "noise_0.5")].iloc[0]
    expected = f"{row['map']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    assert table.loc["gmm", "noise_0.5"] == expected
    for cell in table.to_numpy().ravel():
        assert re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", cell)


def test_format_table_missing_pair_and_subset(summary):
    partial = summary.drop(index=summary.index[-1])

    table = format_table(partial, method_order=METHODS)
    subset = format_table(summary, method_order=["gmm"])

    assert table.loc[METHODS[-1], PROTOCOLS[-1]] == "n/a"
    assert subset.index.tolist() == ["gmm"]


def test_format_table_rejects_unknown_names(summary):
    with pytest.raises(ValueError, match=r"method_order names \['svm'\]"):
        format_table(summary, method_order=["svm"])
    with pytest.raises(ValueError, match=r"protocol_order names \['clean'\]"):
        format_table(summary, protocol_order=["clean"])


def test_format_table_rejects_duplicate_pairs(summary):
    with pytest.raises(ValueError, match="more than one row"):
        format_table(pd.concat([summary, summary.iloc[:1]]))


def test_write_tables_csv_round_trip(summary, provenance_info, tmp_path):
    csv_path, md_path = write_tables(
        summary,
        tmp_path / "tables" / "main",
        dataset="toy",
        provenance=provenance_info,
        method_order=["gmm", "mean_embedding"],
        protocol_order=PROTOCOLS,
    )

    loaded = pd.read_csv(csv_path)

    assert csv_path.name == "main.csv"
    assert list(loaded.columns) == SUMMARY_COLUMNS
    assert loaded["method"].tolist() == ["gmm", "gmm", "mean_embedding", "mean_embedding"]
    assert loaded["protocol"].tolist() == PROTOCOLS * 2
    expected = summary.set_index(["method", "protocol"]).loc[list(zip(loaded["method"], loaded["protocol"]))]
    np.testing.assert_allclose(loaded[["map", "ci_low", "ci_high"]].to_numpy(), expected[["map", "ci_low", "ci_high"]].to_numpy())
    assert loaded["n_concepts"].tolist() == [30] * 4

    assert md_path.name == "main.md"


def test_write_tables_markdown_caption(summary, provenance_info, tmp_path):
    _, md_path = write_tables(summary, tmp_path / "main", dataset="toy", provenance=provenance_info)

    caption, blank, *table_lines = md_path.read_text().splitlines()

    assert "toy (30 concepts)" in caption
    assert "95% percentile bootstrap" in caption
    assert "500 resamples" in caption
    assert "seed 3" in caption
    assert "f" * 12 in caption
    assert "0123456789ab with uncommitted changes" in caption
    assert blank == ""
    assert table_lines[0].split("|")[1].strip() == "method"
    assert len(table_lines) == 2 + len(METHODS)


def test_plot_writes_reproducible_png(summary, tmp_path):
    noise = {"noise_0.0": 0.0, "noise_0.5": 0.5}

    first = plot_map_vs_noise(summary, noise, tmp_path / "plots" / "first.png", title="toy")
    second = plot_map_vs_noise(summary, noise, tmp_path / "second.png", title="toy")

    data = first.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert data == second.read_bytes()
    assert b"Software" not in data
    image = imread(first)
    assert image.ndim == 3
    assert image.shape[0] > 100
    assert image.shape[1] > 100


def test_method_marker_changes_with_colour_cycle():
    markers = [method_marker(index) for index in range(21)]

    assert set(markers[:10]) == {"o"}
    assert set(markers[10:20]) == {"s"}
    assert markers[20] == "^"


def test_plot_rejects_unknown_protocol(summary, tmp_path):
    with pytest.raises(ValueError, match=r"protocols \['noise_0.9'\]"):
        plot_map_vs_noise(summary, {"noise_0.9": 0.9}, tmp_path / "plot.png", title="toy")


def test_config_hash_ignores_key_order():
    first = config_sha256({"a": 1, "b": {"c": [1, 2], "d": "x"}})
    second = config_sha256({"b": {"d": "x", "c": [1, 2]}, "a": 1})
    different = config_sha256({"a": 2, "b": {"c": [1, 2], "d": "x"}})

    assert first == second
    assert first != different
    assert re.fullmatch(r"[0-9a-f]{64}", first)


def test_config_hash_ignores_locations():
    settings = {"seed": 0, "evaluation": {"n_bootstrap": 100}}
    located = dict(settings, raw_data_dir="/data/raw", results_dir="results-mine", download=True)

    assert config_sha256(located) == config_sha256(settings)
    assert config_sha256(dict(located, seed=1)) != config_sha256(located)


def test_config_hash_rejects_non_json():
    with pytest.raises(ValueError, match="not plain JSON data"):
        config_sha256({"path": object()})


def test_provenance_outside_git_repo(tmp_path):
    info = provenance({"seed": 0}, tmp_path)

    assert info["git_commit"] == "unknown"
    assert info["git_dirty"] is None
    assert info["config_sha256"] == config_sha256({"seed": 0})
    assert set(info["versions"]) >= {"s2m", "torch", "numpy", "scikit-learn"}
    assert info["versions"]["numpy"] == np.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", info["created_utc"])
    json.dumps(info)


def test_provenance_without_git_executable(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))

    info = provenance({}, tmp_path)

    assert info["git_commit"] == "unknown"
    assert info["git_dirty"] is None


def _git(repo, *arguments):
    subprocess.run(["git", "-C", str(repo), *arguments], check=True, capture_output=True)


def test_provenance_in_git_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    _git(tmp_path, "init", "--quiet")
    (tmp_path / "Snakefile").write_text("content\n")
    _git(tmp_path, "add", "Snakefile")
    _git(tmp_path, "-c", "user.name=Test", "-c", "user.email=test@example.com", "commit", "--quiet", "-m", "Add file")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    clean = provenance({}, tmp_path)
    (tmp_path / "Snakefile").write_text("changed\n")
    dirty = provenance({}, tmp_path)

    assert clean["git_commit"] == head
    assert clean["git_dirty"] is False
    assert dirty["git_dirty"] is True


def test_provenance_excludes_only_inner_results(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "--quiet")
    (repo / "Snakefile").write_text("content\n")
    _git(repo, "add", "Snakefile")
    _git(repo, "-c", "user.name=Test", "-c", "user.email=test@example.com", "commit", "--quiet", "-m", "Add file")
    monkeypatch.chdir(repo)
    outside = {"results_dir": str(tmp_path / "scratch")}

    # git rejects an exclude pathspec outside the repository, so such a results_dir is not excluded.
    clean_outside = provenance(outside, repo)
    (repo / "Snakefile").write_text("changed\n")
    dirty_outside = provenance(outside, repo)
    (repo / "Snakefile").write_text("content\n")
    (repo / "results").mkdir()
    (repo / "results" / "table.md").write_text("table\n")
    clean_inside = provenance({"results_dir": "results"}, repo)

    assert clean_outside["git_dirty"] is False
    assert dirty_outside["git_dirty"] is True
    assert clean_inside["git_dirty"] is False


def test_provenance_counts_code_changes_only(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    _git(tmp_path, "init", "--quiet")
    for path in ("baselines/mean_embedding.py", "results/tables/omniglot.md", "README.md", "s2m/old_name.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(f"{path}\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=Test", "-c", "user.email=test@example.com", "commit", "--quiet", "-m", "Add files")
    monkeypatch.chdir(tmp_path)

    # A scratch run folder, notes, the committed results and the docs are not code.
    (tmp_path / "results-mine").mkdir()
    (tmp_path / "results-mine" / "table.md").write_text("table\n")
    (tmp_path / "notes with spaces.txt").write_text("notes\n")
    (tmp_path / "results" / "tables" / "omniglot.md").write_text("rewritten by a default run\n")
    (tmp_path / "README.md").write_text("edited\n")
    without_code = provenance({"results_dir": "results-mine"}, tmp_path)

    (tmp_path / "baselines" / "my_method.py").write_text("NAME = 'mine'\n")
    with_new_module = provenance({"results_dir": "results-mine"}, tmp_path)
    (tmp_path / "baselines" / "my_method.py").unlink()

    _git(tmp_path, "mv", "s2m/old_name.py", "docs_old_name.py")
    with_moved_module = provenance({"results_dir": "results-mine"}, tmp_path)

    assert without_code["git_dirty"] is False
    assert with_new_module["git_dirty"] is True
    assert with_moved_module["git_dirty"] is True
