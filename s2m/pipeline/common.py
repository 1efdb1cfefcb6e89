"""Helpers shared by the pipeline steps: logging, paths and seeds."""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch

from s2m.config import REPOSITORY_ROOT


def setup_logging(log_path: str | Path | None = None, level: int = logging.INFO) -> None:
    """Send log records to ``log_path`` (if given) and to standard error."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))

    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def raw_data_dir(config: dict) -> Path:
    """Return the raw-data folder: S2M_RAW_DATA, else the config entry taken from the repository root."""
    from s2m.rawdata import resolve_raw_data_dir

    configured = str(config.get("raw_data_dir") or "").strip()
    if not configured:
        return resolve_raw_data_dir(None)

    path = Path(configured).expanduser()
    if not path.is_absolute():
        path = REPOSITORY_ROOT / path
    return resolve_raw_data_dir(path, config_source="config entry raw_data_dir in config/config.yaml")


def run_step(log_path: str | Path | None, step, *args, **kwargs):
    """Run one pipeline step with logging to ``log_path``; log any error before re-raising it."""
    setup_logging(log_path)
    logger = logging.getLogger("s2m.pipeline")
    logger.info("Starting %s", step.__name__)

    try:
        result = step(*args, **kwargs)
    except Exception:
        logger.exception("%s failed", step.__name__)
        raise

    logger.info("Finished %s", step.__name__)
    return result
