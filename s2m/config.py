"""Loading and validation of the workflow configuration outside Snakemake.

The Snakefile validates its config with ``snakemake.utils.validate`` against
``workflow/schemas/config.schema.yaml``; :func:`load_config` does the same for
library users, so both see the same defaults and the same errors.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPOSITORY_ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG_PATH = REPOSITORY_ROOT / "config" / "config.yaml"


class ConfigError(ValueError):
    """An invalid workflow configuration."""


def merge_configs(base: dict, override: dict) -> dict:
    """Return ``base`` updated recursively by ``override``, as Snakemake merges --configfile."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def reorder_like_defaults(config: dict) -> None:
    """Reorder the keys of ``config`` in place, recursively, as they appear in ``config/config.yaml``.

    Keys that the default config lacks follow in their own order. Snakemake puts the keys of
    a ``--configfile`` before those of the Snakefile's own config file, and the order of
    ``baselines`` and ``meta_trained`` is the order of the rows in the tables.
    """
    ordered = merge_configs(yaml.safe_load(DEFAULT_CONFIG_PATH.read_text()), config)
    config.clear()
    config.update(ordered)


def validate_config(config: dict) -> dict:
    """Validate ``config`` against the schema, fill in defaults, and check cross-field rules.

    Raises
    ------
    ConfigError
        Naming the invalid entry, the value received and what is allowed.
    """
    import jsonschema
    from snakemake.utils import validate

    try:
        validate(config, str(SCHEMA_PATH))
    except Exception as error:  # snakemake wraps jsonschema errors in WorkflowError
        cause = error.__cause__ if isinstance(error.__cause__, jsonschema.ValidationError) else error
        raise ConfigError(f"Invalid configuration: {cause}") from error

    check_config_consistency(config)
    return config


def check_config_consistency(config: dict) -> None:
    """Check the rules a JSON schema cannot express.

    Raises
    ------
    ConfigError
    """
    for dataset in config["datasets"]:
        if dataset not in config:
            raise ConfigError(
                f"Dataset {dataset!r} is listed in 'datasets' but has no section "
                f"{dataset!r}. Add the section (see config/config.yaml) or remove "
                "the dataset from the list."
            )

        fractions = config[dataset].get("build", {}).get("split_fractions")
        if fractions is not None and abs(sum(fractions) - 1.0) > 1e-6:
            raise ConfigError(
                f"{dataset}.build.split_fractions must sum to 1, got {fractions} "
                f"(sum {sum(fractions)})."
            )

        for name, protocol in config[dataset]["protocols"].items():
            n_noise = round(protocol.get("noise_fraction", 0.0) * protocol["set_size"])
            if n_noise >= protocol["set_size"]:
                raise ConfigError(
                    f"{dataset}.protocols.{name}: noise_fraction "
                    f"{protocol.get('noise_fraction')} leaves no relevant image in a "
                    f"set of {protocol['set_size']}. Lower noise_fraction."
                )

    backbone = config.get("caltech101", {}).get("backbone", {})
    if backbone.get("kind") == "torchvision" and backbone.get("unfreeze_last_blocks", 0):
        raise ConfigError(
            "caltech101.backbone: unfreeze_last_blocks "
            f"{backbone['unfreeze_last_blocks']} needs the tflite backbone; the "
            "torchvision backbone only supports a frozen backbone. Set "
            "unfreeze_last_blocks: 0 or kind: tflite."
        )

    overlap = set(config["meta_trained"]) & set(config["baselines"])
    if overlap:
        raise ConfigError(
            f"Method names {sorted(overlap)} appear both in meta_trained and in "
            "baselines. Rename one of them, since each names an output file."
        )

    check_baselines(config["baselines"])

    for name, variant in config["meta_trained"].items():
        if name == "pretrained":
            raise ConfigError(
                "'pretrained' is reserved for the pretrained embedding. Rename the "
                "meta_trained entry."
            )
        if variant["set_model"] != "gmm" and variant.get("n_components", 1) != 1:
            raise ConfigError(
                f"meta_trained.{name}: n_components {variant['n_components']} is only "
                "used by set_model gmm. Remove it or set set_model: gmm."
            )


def check_baselines(entries: dict) -> None:
    """Build every configured baseline once, so that an unknown name or parameter stops the run before any job.

    Raises
    ------
    ConfigError
        If the ``baselines`` package defines a class without a name or two classes with
        the same name. Also if a baseline name or parameter is invalid: then the message
        names the entry and repeats the baseline's own message, which lists the available
        names or the accepted parameters.
    """
    from baselines import discover_baselines, get_baseline

    try:
        discover_baselines()
    except ValueError as error:
        raise ConfigError(f"baselines package: {error}") from error

    for name, entry in entries.items():
        try:
            get_baseline(name, **entry.get("params", {}))
        except ValueError as error:
            raise ConfigError(f"baselines.{name}: {error}") from error


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Read, merge and validate a workflow config.

    Parameters
    ----------
    path : path, optional
        A YAML file merged on top of ``config/config.yaml``. ``None`` loads the
        default config alone.
    overrides : dict, optional
        Merged last.

    Returns
    -------
    dict
        The validated config with defaults filled in.
    """
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())

    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} not found.")
        config = merge_configs(config, yaml.safe_load(path.read_text()) or {})

    if overrides:
        config = merge_configs(config, overrides)

    return validate_config(config)
