"""Smoke run of the whole Snakemake workflow on config/tiny.yaml, on the real raw data."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from s2m.device import select_device
from s2m.embeddings import load_embedding

REPOSITORY = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPOSITORY / "Snakefile")]


def _run(arguments, workdir, raw_data_dir):
    environment = dict(os.environ, S2M_RAW_DATA=str(raw_data_dir))
    return subprocess.run(
        SNAKEMAKE + ["--directory", str(workdir)] + arguments,
        env=environment,
        capture_output=True,
        text=True,
        timeout=3600,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, raw_data_dir):
    workdir = tmp_path_factory.mktemp("workflow")
    result = _run(
        ["--cores", "2", "--configfile", str(REPOSITORY / "config" / "tiny.yaml")], workdir, raw_data_dir
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir / "results-tiny"


def _tiny_config():
    default = yaml.safe_load((REPOSITORY / "config" / "config.yaml").read_text())
    return default, yaml.safe_load((REPOSITORY / "config" / "tiny.yaml").read_text())


@pytest.mark.workflow
@pytest.mark.parametrize("dataset", ["omniglot", "caltech101"])
def test_tables_hold_every_method_and_protocol(tiny_run, dataset):
    default, _ = _tiny_config()
    table = pd.read_csv(tiny_run / "tables" / f"{dataset}.csv")
    methods = list(default["baselines"]) + list(default["meta_trained"])

    assert list(table["method_id"].unique()) == methods
    assert sorted(table["protocol"].unique()) == sorted(default[dataset]["protocols"])
    assert len(table) == len(methods) * len(default[dataset]["protocols"])
    assert table["map"].between(0, 1).all()
    assert (table["ci_low"] <= table["map"]).all()
    assert (table["map"] <= table["ci_high"]).all()

    markdown = (tiny_run / "tables" / f"{dataset}.md").read_text()
    assert "n/a" not in markdown
    assert "git commit" in markdown

    figure = tiny_run / "figures" / f"{dataset}_map_vs_noise.png"
    assert figure.read_bytes().startswith(b"\x89PNG")


@pytest.mark.workflow
def test_meta_trained_models_come_from_this_run(tiny_run):
    default, _ = _tiny_config()
    for dataset in ("omniglot", "caltech101"):
        for variant in default["meta_trained"]:
            history = pd.read_csv(tiny_run / dataset / "models" / f"{variant}_history.csv")
            assert history["step"].max() == 6
            assert history["loss"].dropna().between(0, 1).all()

            _, _, metadata = load_embedding(tiny_run / dataset / "models" / f"{variant}.pt")
            assert metadata["device"] == str(select_device(default["device"]))
            assert metadata["torch"] == torch.__version__


@pytest.mark.workflow
def test_every_rule_has_log_and_benchmark(tiny_run):
    logged_rules = {p.name for p in (tiny_run / "logs").iterdir()}
    benchmarked_rules = {p.name for p in (tiny_run / "benchmarks").iterdir()}
    rules = {"build_dataset", "make_problems", "cache_backbone_features", "pretrain",
             "meta_train", "descriptors", "evaluate", "table"}

    assert rules <= {name.removesuffix(".log") for name in logged_rules}
    assert rules <= {name.removesuffix(".tsv") for name in benchmarked_rules}
    assert (tiny_run / "logs" / "report.log").is_file()
    assert (tiny_run / "report.md").read_text().startswith("# Set2Model benchmark report")


@pytest.mark.workflow
def test_report_names_training_device(tiny_run):
    default, _ = _tiny_config()
    n_checkpoints = 2 * (1 + len(default["meta_trained"]))
    device = select_device(default["device"])
    expected = f"- embeddings trained on: {device} with torch {torch.__version__} ({n_checkpoints} of {n_checkpoints})"

    assert expected in (tiny_run / "report.md").read_text()


@pytest.mark.workflow
def test_per_concept_aps_written(tiny_run):
    aps = pd.read_csv(tiny_run / "omniglot" / "aps" / "s2m_gmm_k2.csv")
    assert set(aps["protocol"]) == {"noise-0.0", "noise-0.3"}
    aps = aps[aps["protocol"] == "noise-0.3"]
    assert {"concept", "average_precision", "n_relevant", "set_size"} <= set(aps.columns)
    assert aps["average_precision"].between(0, 1).all()
    assert (aps["n_noise"] == 3).all()


@pytest.mark.workflow
def test_rerun_has_nothing_to_do(tiny_run, raw_data_dir):
    result = _run(
        ["--cores", "2", "--dry-run", "--configfile", str(REPOSITORY / "config" / "tiny.yaml")],
        tiny_run.parent,
        raw_data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_invalid_config_value_stops_workflow(tmp_path, raw_data_dir):
    result = _run(["--cores", "1", "--dry-run", "--config", "seed=-1"], tmp_path, raw_data_dir)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "-1 is less than the minimum of 0" in output
    assert "seed" in output


def test_missing_raw_data_stops_workflow(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = _run(
        ["results-tiny/omniglot/dataset/manifest.json", "--cores", "1",
         "--configfile", str(REPOSITORY / "config" / "tiny.yaml")],
        tmp_path,
        missing,
    )
    assert result.returncode != 0
    log = (tmp_path / "results-tiny" / "logs" / "build_dataset" / "omniglot.log").read_text()
    assert str(missing) in log
    assert "S2M_RAW_DATA" in log


def _scheduled_outputs(output):
    """Collect the output files of the jobs that a dry run lists."""
    files = set()
    for line in output.splitlines():
        if line.strip().startswith("output:"):
            files.update(path.strip() for path in line.split(":", 1)[1].split(","))
    return files


@pytest.mark.workflow
@pytest.mark.parametrize(
    ("change", "rerun", "kept"),
    [
        (
            "evaluation:\n  n_bootstrap: 300\n",
            ["tables/omniglot.csv", "report.md"],
            ["omniglot/models/s2m_gmm_k2.pt", "omniglot/aps/linear_svm.csv"],
        ),
        (
            "meta_trained:\n  s2m_gauss: {label: Gauss renamed}\n",
            ["tables/omniglot.csv", "tables/caltech101.csv"],
            ["omniglot/models/s2m_gauss.pt", "omniglot/aps/s2m_gauss.csv"],
        ),
        (
            "mixture:\n  max_iter: 31\n",
            ["omniglot/models/s2m_gmm_k2.pt", "caltech101/aps/s2m_gmm_k4.csv", "tables/omniglot.csv"],
            ["omniglot/models/s2m_gauss.pt", "caltech101/models/avg.pt", "omniglot/aps/linear_svm.csv", "omniglot/aps/gmm.csv"],
        ),
    ],
    ids=["evaluation", "label", "mixture"],
)
def test_config_change_reruns_affected_jobs(tiny_run, raw_data_dir, tmp_path, change, rerun, kept):
    changed = tmp_path / "changed.yaml"
    changed.write_text(change)
    result = _run(
        ["--cores", "2", "--dry-run", "--configfile", str(REPOSITORY / "config" / "tiny.yaml"), str(changed)],
        tiny_run.parent,
        raw_data_dir,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]

    scheduled = _scheduled_outputs(output)
    for path in rerun:
        assert f"results-tiny/{path}" in scheduled
    for path in kept:
        assert f"results-tiny/{path}" not in scheduled


@pytest.mark.workflow
def test_baseline_module_is_evaluation_input(tiny_run, raw_data_dir):
    # Editing a baseline's module must rerun its evaluation, so the module is an input file.
    target = "results-tiny/omniglot/aps/linear_svm.csv"
    result = _run(
        ["--cores", "2", "--dry-run", "--forcerun", target, "--configfile", str(REPOSITORY / "config" / "tiny.yaml")],
        tiny_run.parent,
        raw_data_dir,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert str(REPOSITORY / "baselines" / "linear_svm.py") in output
