"""Result tables, the mAP-against-noise plot and run provenance.

The summary produced by :func:`summarise_aps` is a long-format DataFrame with
one row per (method, protocol) pair. :func:`write_tables` saves it as

- ``<stem>.csv``: the summary itself, numeric columns included, readable with
  ``pandas.read_csv``. A wide table of mAPs is then
  ``df.pivot(index="method", columns="protocol", values="map")``.
- ``<stem>.md``: a caption line and a Markdown table whose cells read
  ``mAP [ci_low, ci_high]``.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from s2m.evaluation import mean_average_precision

logger = logging.getLogger(__name__)

#: Markers of the figure's lines, one per group of 10 methods (see :func:`method_marker`).
FIGURE_MARKERS = ("o", "s", "^", "D")


def method_marker(index: int) -> str:
    """Return the marker of the ``index``-th method's line in the figure.

    matplotlib's default colour cycle has 10 colours, so the 11th method repeats the first
    colour. It gets another marker, so that every line stays distinguishable.
    """
    return FIGURE_MARKERS[(index // 10) % len(FIGURE_MARKERS)]

__all__ = [
    "SUMMARY_COLUMNS",
    "format_table",
    "plot_map_vs_noise",
    "provenance",
    "summarise_aps",
    "write_tables",
]

SUMMARY_COLUMNS = [
    "method",
    "protocol",
    "map",
    "ci_low",
    "ci_high",
    "n_concepts",
    "confidence",
    "n_bootstrap",
    "seed",
]

_VERSIONED_PACKAGES = ("s2m", "torch", "numpy", "scikit-learn", "pandas")

#: Top-level repository paths that hold the code and config of a run. Changes elsewhere, such
#: as rewritten committed results or edited docs, do not change what runs.
CODE_PATHS = ("s2m", "baselines", "workflow", "config", "Snakefile", "pyproject.toml")
_GIT_TIMEOUT_S = 30

#: Config entries that only locate the raw data and the results, or allow downloading missing
#: raw data, so they cannot change a result. The config hash leaves them out, and runs of the
#: same settings into different folders share a hash.
LOCATION_KEYS = ("raw_data_dir", "results_dir", "download")


def summarise_aps(
    ap_tables: Mapping[tuple[str, str], pd.DataFrame],
    n_bootstrap: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Compute mAP with a bootstrap interval for every (method, protocol) pair.

    Parameters
    ----------
    ap_tables : mapping from (method, protocol) to DataFrame
        Per-concept results with an ``average_precision`` column, as returned
        by :func:`s2m.evaluation.evaluate_problems`.
    n_bootstrap, seed, confidence
        Passed to :func:`s2m.evaluation.mean_average_precision`. Every pair
        uses the same seed.

    Returns
    -------
    summary : DataFrame with one row per pair
        Columns ``method``, ``protocol``, ``map``, ``ci_low``, ``ci_high`` and
        ``n_concepts``, then the bootstrap settings ``confidence``,
        ``n_bootstrap`` and ``seed``, so that a saved summary records them.
    """
    if not ap_tables:
        raise ValueError("ap_tables is empty. Pass at least one (method, protocol) table.")

    rows = []
    for key, table in ap_tables.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"ap_tables keys must be (method, protocol) tuples; got {key!r}.")
        if "average_precision" not in table.columns:
            raise ValueError(
                f"AP table for {key!r} has no 'average_precision' column; got columns "
                f"{list(table.columns)}."
            )

        method, protocol = key
        estimate = mean_average_precision(
            table["average_precision"].to_numpy(dtype=float),
            n_bootstrap=n_bootstrap,
            confidence=confidence,
            seed=seed,
        )
        rows.append(
            {
                "method": method,
                "protocol": protocol,
                "map": estimate.mean,
                "ci_low": estimate.low,
                "ci_high": estimate.high,
                "n_concepts": estimate.n_concepts,
                "confidence": confidence,
                "n_bootstrap": n_bootstrap,
                "seed": seed,
            }
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _resolve_order(values: pd.Series, order: Sequence[str] | None, *, what: str) -> list[str]:
    present = list(dict.fromkeys(values))
    if order is None:
        return present

    missing = [name for name in order if name not in present]
    if missing:
        raise ValueError(
            f"{what}_order names {missing}, which are not in the summary. Available: {present}."
        )

    dropped = [name for name in present if name not in order]
    if dropped:
        logger.info(
            "Leaving %s %s out of the table because %s_order omits them.", what, dropped, what
        )
    return list(order)


def _format_cell(row: pd.Series, digits: int) -> str:
    return f"{row['map']:.{digits}f} [{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]"


def format_table(
    summary: pd.DataFrame,
    method_order: Sequence[str] | None = None,
    protocol_order: Sequence[str] | None = None,
    *,
    digits: int = 3,
) -> pd.DataFrame:
    """Arrange a summary as a methods-by-protocols table of ``mAP [low, high]`` strings.

    Parameters
    ----------
    summary : DataFrame
        Output of :func:`summarise_aps`.
    method_order, protocol_order : sequence of str, optional
        Rows and columns to show, in order. Defaults to the order of first
        appearance in ``summary``. Names not in ``summary`` raise ValueError,
        and summary entries left out of an order are not shown.
    digits : int, default=3
        Decimal places.

    Returns
    -------
    table : DataFrame of shape (n_methods, n_protocols)
        Cells like ``"0.812 [0.801, 0.823]"``, or ``"n/a"`` where a pair was
        not run. The index is named ``method``.
    """
    methods = _resolve_order(summary["method"], method_order, what="method")
    protocols = _resolve_order(summary["protocol"], protocol_order, what="protocol")

    duplicated = summary.duplicated(["method", "protocol"])
    if duplicated.any():
        pairs = summary.loc[duplicated, ["method", "protocol"]].to_records(index=False).tolist()
        raise ValueError(f"summary has more than one row for (method, protocol) pairs {pairs}.")

    cells = summary.assign(cell=summary.apply(_format_cell, axis=1, digits=digits))
    table = cells.pivot(index="method", columns="protocol", values="cell")
    table = table.reindex(index=methods, columns=protocols).fillna("n/a")
    table.index.name = "method"
    table.columns.name = None
    return table


def _caption(summary: pd.DataFrame, dataset: str, provenance_info: Mapping[str, Any]) -> str:
    concept_counts = sorted(set(summary["n_concepts"].astype(int)))
    concepts = ", ".join(str(count) for count in concept_counts)
    confidence = ", ".join(f"{value:.0%}" for value in sorted(set(summary["confidence"])))
    n_bootstrap = ", ".join(str(value) for value in sorted(set(summary["n_bootstrap"])))
    seeds = ", ".join(str(value) for value in sorted(set(summary["seed"])))

    commit = str(provenance_info.get("git_commit", "unknown"))[:12]
    if provenance_info.get("git_dirty"):
        commit += " with uncommitted changes"
    config_hash = str(provenance_info.get("config_sha256", "unknown"))[:12]

    return (
        f"mAP over concepts on {dataset} ({concepts} concepts) with {confidence} "
        f"percentile bootstrap intervals ({n_bootstrap} resamples of the concepts, "
        f"seed {seeds}). Config SHA-256 {config_hash}, git commit {commit}."
    )


def write_tables(
    summary: pd.DataFrame,
    path_stem: str | os.PathLike,
    *,
    dataset: str,
    provenance: Mapping[str, Any],
    method_order: Sequence[str] | None = None,
    protocol_order: Sequence[str] | None = None,
    digits: int = 3,
) -> tuple[Path, Path]:
    """Write ``<path_stem>.csv`` and ``<path_stem>.md`` (see the module docstring).

    Parameters
    ----------
    summary : DataFrame
        Output of :func:`summarise_aps`.
    path_stem : path
        Output path without suffix; parent folders are created.
    dataset : str
        Dataset name for the caption.
    provenance : mapping
        Output of :func:`provenance`; the caption shows the config hash and
        git commit.
    method_order, protocol_order, digits
        Passed to :func:`format_table`. The CSV rows follow the same order.

    Returns
    -------
    csv_path, md_path : Path
    """
    missing = [column for column in SUMMARY_COLUMNS if column not in summary.columns]
    if missing:
        raise ValueError(f"summary lacks columns {missing}. Build it with summarise_aps().")

    table = format_table(summary, method_order, protocol_order, digits=digits)
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path = path_stem.with_name(path_stem.name + ".csv")
    md_path = path_stem.with_name(path_stem.name + ".md")

    shown = summary[summary["method"].isin(table.index) & summary["protocol"].isin(table.columns)]
    method_rank = {name: rank for rank, name in enumerate(table.index)}
    protocol_rank = {name: rank for rank, name in enumerate(table.columns)}
    ordered = shown.sort_values(
        ["method", "protocol"],
        key=lambda column: column.map(method_rank if column.name == "method" else protocol_rank),
    )
    ordered.to_csv(csv_path, index=False)

    caption = _caption(shown, dataset, provenance)
    md_path.write_text(f"{caption}\n\n{table.to_markdown()}\n", encoding="utf-8")

    logger.info("Wrote %s and %s.", csv_path, md_path)
    return csv_path, md_path


def plot_map_vs_noise(
    summary: pd.DataFrame,
    x_values: Mapping[str, float],
    path: str | os.PathLike,
    title: str,
    method_order: Sequence[str] | None = None,
) -> Path:
    """Plot mAP against the noise fraction of the concept sets, one line per method.

    Error bars show the bootstrap interval. Protocols not in ``x_values`` are
    left out. The PNG carries no software or time metadata, so the same
    summary gives the same file bytes with the same matplotlib version.

    Parameters
    ----------
    summary : DataFrame
        Output of :func:`summarise_aps`.
    x_values : mapping from protocol to float
        Fraction of noise images in the concept sets of each protocol, in [0, 1].
    path : path
        Output PNG file; parent folders are created.
    title : str
        Axes title.
    method_order : sequence of str, optional
        Methods to draw, in legend order. Defaults to order of appearance.

    Returns
    -------
    path : Path
    """
    if not x_values:
        raise ValueError("x_values is empty. Map at least one protocol to its noise fraction.")
    unknown = [protocol for protocol in x_values if protocol not in set(summary["protocol"])]
    if unknown:
        raise ValueError(
            f"x_values names protocols {unknown}, which are not in the summary. "
            f"Available: {sorted(set(summary['protocol']))}."
        )

    noisy = summary[summary["protocol"].isin(list(x_values))]
    noisy = noisy.assign(noise=noisy["protocol"].map(dict(x_values)).astype(float))
    methods = _resolve_order(noisy["method"], method_order, what="method")

    figure = Figure(figsize=(6.0, 4.0), dpi=150)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, method in enumerate(methods):
        points = noisy[noisy["method"] == method].sort_values("noise")
        error = np.vstack([points["map"] - points["ci_low"], points["ci_high"] - points["map"]])

        axes.errorbar(
            points["noise"], points["map"], yerr=error, marker=method_marker(index), capsize=3, label=method
        )

    axes.set_xlabel("Fraction of noise images in the concept set")
    axes.set_ylabel("mAP")
    axes.set_ylim(0.0, 1.0)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Software": None})
    logger.info("Wrote %s.", path)
    return path


def _path_inside(repo_dir: Path, path: Path) -> str | None:
    """Return ``path`` relative to ``repo_dir`` if it lies inside it, else None.

    A relative ``path`` is taken from the current directory, where Snakemake runs the jobs.
    git rejects a pathspec outside the repository, so such a path cannot be excluded.
    """
    try:
        return (Path.cwd() / path).resolve().relative_to(repo_dir.resolve()).as_posix()
    except ValueError:
        return None


def _changes_code(status: str) -> bool:
    """Tell whether ``git status --porcelain -z`` output lists a path under :data:`CODE_PATHS`."""
    paths = []
    tokens = iter(status.split("\0"))
    for entry in tokens:
        if not entry:
            continue

        # Each entry is two status letters, a space and a path relative to the repository root.
        # A rename or copy is followed by a token with the original path alone.
        code, path = entry[:2], entry[3:]
        paths.append(path)
        if code[0] in "RC":
            paths.append(next(tokens, ""))
    return any(path.split("/", 1)[0] in CODE_PATHS for path in paths)


def _run_git(repo_dir: Path, *arguments: str) -> str | None:
    """Return the stdout of a git command in ``repo_dir``, or None if git is missing or fails."""
    try:
        completed = subprocess.run(
            ["git", "-C", str(repo_dir), *arguments],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("git %s failed in %s: %s", " ".join(arguments), repo_dir, error)
        return None

    if completed.returncode != 0:
        logger.debug(
            "git %s exited with %d in %s: %s",
            " ".join(arguments),
            completed.returncode,
            repo_dir,
            completed.stderr.strip(),
        )
        return None
    return completed.stdout


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def config_sha256(config: Mapping[str, Any]) -> str:
    """Return the SHA-256 hex digest of the config without :data:`LOCATION_KEYS`, as canonical JSON (sorted keys, no spaces)."""
    settings = {key: value for key, value in config.items() if key not in LOCATION_KEYS}
    try:
        canonical = json.dumps(
            settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"config cannot be hashed because it is not plain JSON data ({error}). Use "
            f"only dicts, lists, strings, finite numbers, booleans and None."
        ) from error
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def provenance(config: Mapping[str, Any], repo_dir: str | os.PathLike) -> dict[str, Any]:
    """Collect what is needed to trace a result back to its code and config.

    Never raises because of git: outside a repository, or without git on the
    PATH, the commit is ``"unknown"`` and ``git_dirty`` is None.

    Parameters
    ----------
    config : mapping
        Run configuration, plain JSON data.
    repo_dir : path
        Folder inside the git working tree of the code that ran.

    Returns
    -------
    info : dict
        ``git_commit`` (str), ``git_dirty`` (bool or None: True if a file under
        :data:`CODE_PATHS` and outside the config's ``results_dir`` differs from
        the commit, or is untracked and not ignored by git),
        ``config_sha256`` (str, see :func:`config_sha256`), ``created_utc``
        (ISO 8601 str) and ``versions`` (dict of package name to version).
    """
    repo_dir = Path(repo_dir)
    commit = _run_git(repo_dir, "rev-parse", "HEAD")
    status = None
    if commit is not None:
        pathspecs = ["."]
        results_inside = _path_inside(repo_dir, Path(config.get("results_dir", "results")))
        if results_inside is not None:
            pathspecs.append(f":(exclude){results_inside}")
        status = _run_git(repo_dir, "status", "--porcelain", "-z", "--", *pathspecs)

    return {
        "git_commit": commit.strip() if commit is not None else "unknown",
        "git_dirty": _changes_code(status) if status is not None else None,
        "config_sha256": config_sha256(config),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {package: _package_version(package) for package in _VERSIONED_PACKAGES},
    }
