"""Pipeline step 5: the mAP table and figure of each dataset, and the report."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from s2m.config import REPOSITORY_ROOT
from s2m.pipeline.evaluation import method_label, method_names
from s2m.problems import Protocol

logger = logging.getLogger(__name__)


def read_ap_tables(paths: list[str | Path]) -> dict[tuple[str, str], pd.DataFrame]:
    """Read per-concept AP files and split them by (method, protocol)."""
    tables = {}
    for path in paths:
        frame = pd.read_csv(path)
        for key, group in frame.groupby(["method", "protocol"], sort=False):
            tables[key] = group.reset_index(drop=True)
    return tables


def table_step(
    config: dict,
    dataset: str,
    ap_paths: list[str | Path],
    csv_path: str | Path,
    markdown_path: str | Path,
    figure_path: str | Path,
) -> None:
    """Write the mAP table (CSV and Markdown) and the mAP-against-noise plot of a dataset."""
    from s2m.reporting import plot_map_vs_noise, provenance, summarise_aps, write_tables

    evaluation = config["evaluation"]
    summary = summarise_aps(
        read_ap_tables(ap_paths),
        n_bootstrap=evaluation["n_bootstrap"],
        seed=config["seed"],
        confidence=evaluation["confidence"],
    )
    summary.insert(1, "method_id", summary["method"])
    summary["method"] = [method_label(config, m) for m in summary["method_id"]]

    protocols = config[dataset]["protocols"]
    labels = [method_label(config, m) for m in method_names(config)]
    info = provenance(config, REPOSITORY_ROOT)

    stem = Path(csv_path).with_suffix("")
    written_csv, written_md = write_tables(
        summary,
        stem,
        dataset=dataset,
        provenance=info,
        method_order=labels,
        protocol_order=list(protocols),
    )
    if Path(written_csv) != Path(csv_path) or Path(written_md) != Path(markdown_path):
        raise RuntimeError(f"Tables written to {written_csv} and {written_md}, expected {csv_path} and {markdown_path}.")

    # The x value is the fraction actually replaced, round(noise_fraction * set_size) / set_size,
    # which can differ from the fraction in the protocol's name.
    noise_levels = {}
    for name, options in protocols.items():
        protocol = Protocol(name=name, **options)
        if protocol.categories_per_concept == 1:
            noise_levels[name] = protocol.n_noise / protocol.set_size
    plot_map_vs_noise(
        summary,
        noise_levels,
        figure_path,
        title=f"{dataset}: mAP against noise, single-category concepts",
        method_order=labels,
    )


def _benchmark_seconds(results_dir: Path, dataset: str) -> float:
    """Sum the wall times Snakemake recorded for the jobs of one dataset."""
    total = 0.0
    for path in (results_dir / "benchmarks").rglob("*.tsv"):
        relative = path.relative_to(results_dir / "benchmarks")
        if dataset in relative.parts or path.stem == dataset:
            total += float(pd.read_csv(path, sep="\t")["s"].sum())
    return total


def _validation_summary(history_paths: list[str | Path], dataset: str) -> pd.DataFrame:
    rows = []
    for path in history_paths:
        path = Path(path)
        if path.parent.parent.name != dataset:
            continue
        history = pd.read_csv(path)
        row = {"variant": path.stem.removesuffix("_history"), "steps": int(history["step"].max())}
        if "validation_map" in history:
            row["validation mAP before"] = history["validation_map"].iloc[0]
            row["best validation mAP"] = history["validation_map"].max()
        rows.append(row)
    return pd.DataFrame(rows)


def training_environments(model_paths: list[str | Path]) -> str:
    """Summarise the devices and torch versions recorded in embedding checkpoints, with a count for each."""
    from s2m.embeddings import read_embedding_metadata

    counts: dict[str, int] = {}
    for path in model_paths:
        metadata = read_embedding_metadata(path)
        if "device" in metadata:
            environment = f"{metadata['device']} with torch {metadata.get('torch', 'of unknown version')}"
        else:
            environment = "not recorded"
        counts[environment] = counts.get(environment, 0) + 1
    return ", ".join(f"{environment} ({count} of {len(model_paths)})" for environment, count in counts.items())


def report_step(
    config: dict,
    table_paths: list[str | Path],
    history_paths: list[str | Path],
    model_paths: list[str | Path],
    out_path: str | Path,
) -> None:
    """Write a Markdown report with every table, figure, validation curve summary and timing."""
    from s2m.reporting import provenance

    info = provenance(config, REPOSITORY_ROOT)
    results_dir = Path(config["results_dir"])
    lines = [
        "# Set2Model benchmark report",
        "",
        f"- git commit: `{info.get('git_commit')}`" + (" (uncommitted changes)" if info.get("git_dirty") else ""),
        f"- config SHA-256: `{info.get('config_sha256')}`",
        f"- created (UTC): {info['created_utc']}",
        "- packages: " + ", ".join(f"{name} {version}" for name, version in info["versions"].items()),
        f"- embeddings trained on: {training_environments(model_paths)}",
        "",
    ]

    for dataset, table_path in zip(config["datasets"], table_paths):
        lines += [f"## {dataset}", "", Path(table_path).read_text().strip(), ""]
        lines += [f"![mAP against noise](figures/{dataset}_map_vs_noise.png)", ""]

        validation = _validation_summary(history_paths, dataset)
        if not validation.empty:
            lines += ["Meta-training (mAP on the meta-validation problems):", ""]
            lines += [validation.to_markdown(index=False, floatfmt=".4f"), ""]

        seconds = _benchmark_seconds(results_dir, dataset)
        lines += [f"Summed job wall time of {dataset}: {seconds / 60:.1f} min.", ""]

    Path(out_path).write_text("\n".join(lines))
    logger.info("Wrote %s", out_path)
