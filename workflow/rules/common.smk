# Names and paths shared by the rules.

import re

from s2m.config import check_config_consistency

check_config_consistency(config)

RESULTS = config["results_dir"]
DATASETS = config["datasets"]
VARIANTS = list(config["meta_trained"])
BASELINES = list(config["baselines"])
METHODS = BASELINES + VARIANTS
THREADS = config["threads"]


def code_version():
    """The commit and the flag for uncommitted code changes that tables and the report print.

    A parameter of those rules, so that Snakemake's params rerun trigger remakes them after
    a commit or a code change, and their captions never name an older commit.
    """
    from s2m.config import REPOSITORY_ROOT
    from s2m.reporting import provenance

    info = provenance(config, REPOSITORY_ROOT)
    return f"{info['git_commit']} uncommitted changes: {info['git_dirty']}"


CODE_VERSION = code_version()


def _choice(names):
    return "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))


wildcard_constraints:
    dataset=_choice(DATASETS),
    variant=_choice(VARIANTS),
    method=_choice(METHODS),
    embedding=_choice(VARIANTS + ["pretrained"]),
    protocol=r"[A-Za-z0-9._-]+",


def dataset_dir(dataset):
    return f"{RESULTS}/{dataset}/dataset"


def manifest(wildcards):
    return f"{dataset_dir(wildcards.dataset)}/manifest.json"


def backbone_features(wildcards):
    """The cached backbone features, for datasets embedded through a frozen backbone."""
    if wildcards.dataset == "omniglot":
        return []
    return f"{RESULTS}/{wildcards.dataset}/features/backbone.npy"


def protocols(dataset):
    return list(config[dataset]["protocols"])


def baseline_source(wildcards):
    """The module that defines a baseline, as an input so that editing it reruns the baseline's evaluation."""
    if wildcards.method not in config["baselines"]:
        return []
    import inspect

    from baselines import discover_baselines

    return inspect.getsourcefile(discover_baselines()[wildcards.method])


def method_embedding(method):
    return "pretrained" if method in config["baselines"] else method


def uses_mixture(method):
    """The config path "mixture" for a meta-trained variant whose set model is a mixture, else None."""
    entry = config["meta_trained"].get(method, {})
    return "mixture" if entry.get("set_model") == "gmm" else None


def settings(*parts, labels=False):
    """Canonical JSON of the config entries a job reads.

    Passed as a rule parameter, so that Snakemake's params rerun trigger reruns
    a job, and everything after it, when one of these entries changes. A part is
    a dotted config path with wildcards, or a function of the wildcards that
    returns such a path or None. The methods' display labels are left out
    unless ``labels`` is True, because only the tables and the report show them.
    """
    import json

    def lookup(path):
        value = config
        for key in path.split("."):
            value = value.get(key, {}) if isinstance(value, dict) else {}
        if isinstance(value, dict) and not labels:
            value = {key: entry for key, entry in value.items() if key != "label"}
        return value

    def render(wildcards):
        paths = [part(wildcards) if callable(part) else part.format(**dict(wildcards.items())) for part in parts]
        return json.dumps({path: lookup(path) for path in paths if path is not None}, sort_keys=True)

    return render
