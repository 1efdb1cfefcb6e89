import pytest

import yaml

from s2m.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, merge_configs, reorder_like_defaults


def test_default_config_is_valid():
    config = load_config()
    assert config["datasets"] == ["omniglot", "caltech101"]
    assert set(config["meta_trained"]) == {"avg", "s2m_gauss", "s2m_gmm_k2", "s2m_gmm_k4"}


def test_tiny_config_is_valid():
    from s2m.config import REPOSITORY_ROOT

    config = load_config(REPOSITORY_ROOT / "config" / "tiny.yaml")
    assert config["omniglot"]["meta_training"]["steps"] < 50


def test_merge_is_recursive():
    merged = merge_configs({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}})
    assert merged == {"a": {"b": 5, "c": 2}, "d": 3}


def test_reorder_restores_default_key_order():
    default = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    override = {"extra": 1, "baselines": {"linear_svm": {"params": {"C": 2.0}}}}
    # Snakemake starts from the --configfile, adds the Snakefile's config file, then the --configfile again.
    config = merge_configs(merge_configs(override, default), override)

    reorder_like_defaults(config)

    assert list(config["baselines"]) == list(default["baselines"])
    assert list(config)[: len(default)] == list(default)
    assert list(config)[-1] == "extra"
    assert config["baselines"]["linear_svm"]["params"]["C"] == 2.0


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"device": "tpu"}, "'tpu'"),
        ({"seed": -1}, "-1"),
        ({"omniglot": {"protocols": {"noise-0.3": {"noise_fraction": 1.5}}}}, "1.5"),
        ({"omniglot": {"meta_training": {"steps": 0}}}, "0"),
        ({"datasets": ["mnist"]}, "'mnist'"),
        ({"meta_trained": {"avg": {"label": "AVG", "set_model": "svm"}}}, "'svm'"),
        ({"meta_trained": {"s2m+v2": {"label": "S2M", "set_model": "gmm"}}}, "'s2m+v2'"),
        ({"baselines": {"median+v2": {"label": "Median"}}}, "'median+v2'"),
        ({"omniglot": {"pretraining": {"epochs": 2, "batch_size": 4, "learning_rate": 1, "momentum": 0.9}}}, "momentum"),
    ],
)
def test_invalid_value_names_value(override, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=override)
    assert fragment in str(error.value)


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match=r"split_fractions must sum to 1, got \[0.5, 0.1, 0.1\]"):
        load_config(overrides={"caltech101": {"build": {"split_fractions": [0.5, 0.1, 0.1]}}})


def test_method_name_clash_rejected():
    with pytest.raises(ConfigError, match="gmm"):
        load_config(overrides={"meta_trained": {"gmm": {"label": "x", "set_model": "gmm", "n_components": 2}}})


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_torchvision_backbone_cannot_unfreeze():
    override = {"caltech101": {"backbone": {"kind": "torchvision", "unfreeze_last_blocks": 2}}}
    with pytest.raises(ConfigError, match="unfreeze_last_blocks 2"):
        load_config(overrides=override)


def test_unknown_baseline_rejected_at_load():
    with pytest.raises(ConfigError, match=r"baselines.centroid_distanse: Unknown baseline 'centroid_distanse'") as error:
        load_config(overrides={"baselines": {"centroid_distanse": {"label": "Centroid"}}})

    assert "mean_embedding" in str(error.value)


def test_invalid_baseline_param_rejected_at_load():
    override = {"baselines": {"gmm": {"label": "GMM", "params": {"n_components": 0}}}}
    with pytest.raises(ConfigError, match=r"baselines.gmm: Parameter n_components must be"):
        load_config(overrides=override)


def test_duplicate_baseline_name_blames_package(monkeypatch):
    import baselines

    class SecondGMM(baselines.SetMethod):
        name = "gmm"

        def fit(self, concept_set):
            return self

        def score(self, gallery):
            return gallery[:, 0]

    methods_defined_in = baselines._methods_defined_in

    def with_second_gmm(module):
        extra = [SecondGMM] if module.__name__ == "baselines.nearest_neighbour" else []
        return methods_defined_in(module) + extra

    monkeypatch.setattr(baselines, "_methods_defined_in", with_second_gmm)
    with pytest.raises(ConfigError, match=r"^baselines package: Duplicate baseline name 'gmm'") as error:
        load_config()

    assert "baselines.mean_embedding:" not in str(error.value)
