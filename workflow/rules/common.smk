# Names and paths shared by the rules.

from s2m.config import check_config_consistency

check_config_consistency(config)

RESULTS = config["results_dir"]
DATASETS = config["datasets"]
VARIANTS = list(config["meta_trained"])
BASELINES = list(config["baselines"])
METHODS = BASELINES + VARIANTS
THREADS = config["threads"]


def _choice(names):
    return "|".join(sorted(names, key=len, reverse=True))


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


def settings(*parts):
    """Canonical JSON of the config entries a job reads.

    Passed as a rule parameter, so that Snakemake's params rerun trigger reruns
    a job, and everything after it, when one of these entries changes.
    """
    import json

    def lookup(path):
        value = config
        for key in path.split("."):
            value = value.get(key, {}) if isinstance(value, dict) else {}
        return value

    def render(wildcards):
        paths = [part.format(**dict(wildcards.items())) for part in parts]
        return json.dumps({path: lookup(path) for path in paths}, sort_keys=True)

    return render
