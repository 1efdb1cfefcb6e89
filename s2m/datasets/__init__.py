"""Dataset builders: raw data -> processed dataset folder (images and concept table).

Each builder has the signature ``build(raw_data_dir, out_dir, **params) -> Path``
and writes the files described in :mod:`s2m.datasets.table`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from s2m.datasets.caltech101 import build_caltech101
from s2m.datasets.omniglot import build_omniglot

DATASET_BUILDERS: dict[str, Callable[..., Path]] = {
    "omniglot": build_omniglot,
    "caltech101": build_caltech101,
}


def build_dataset(
    name: str, raw_data_dir: str | os.PathLike, out_dir: str | os.PathLike, **params: Any
) -> Path:
    """Run the builder registered as ``name`` and return its output folder.

    ``params`` are passed to the builder as keyword arguments.

    Raises:
        ValueError: ``name`` is not in :data:`DATASET_BUILDERS`. The message
            lists the known names.
    """
    try:
        builder = DATASET_BUILDERS[name]
    except KeyError:
        known = ", ".join(sorted(DATASET_BUILDERS))
        raise ValueError(f"Unknown dataset {name!r}. Known datasets: {known}.") from None
    return builder(raw_data_dir, out_dir, **params)


__all__ = ["DATASET_BUILDERS", "build_caltech101", "build_dataset", "build_omniglot"]
