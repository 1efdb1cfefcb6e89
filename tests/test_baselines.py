"""Tests of the baselines package: discovery, parameters, input checks and retrieval quality."""

from __future__ import annotations

import logging
import sys
import textwrap
from contextlib import contextmanager

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.metrics import average_precision_score

import baselines
from baselines import SetMethod, discover_baselines, get_baseline

SHIPPED_BASELINES = {"gmm", "linear_svm", "mean_embedding", "nearest_neighbour"}

# Every discovered baseline, so that a new module in baselines/ runs through the
# parametrised tests below without editing this file.
ALL_BASELINES = sorted(discover_baselines())
N_FEATURES = 16


@contextmanager
def method_package(tmp_path, monkeypatch, package_name: str, modules: dict[str, str]):
    """Write a package of baseline modules under ``tmp_path``, importable while the block runs."""
    package = tmp_path / package_name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module_name, source in modules.items():
        (package / f"{module_name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))

    try:
        yield package_name
    finally:
        for module_name in [package_name, *(f"{package_name}.{name}" for name in modules)]:
            sys.modules.pop(module_name, None)


def _unit_blob(rng: np.random.Generator, centre: np.ndarray, n: int, spread: float = 0.05) -> np.ndarray:
    points = centre + spread * rng.standard_normal((n, centre.size))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def _random_direction(rng: np.random.Generator) -> np.ndarray:
    direction = rng.standard_normal(N_FEATURES)
    return direction / np.linalg.norm(direction)


@pytest.fixture(scope="module")
def blobs() -> dict[str, np.ndarray]:
    """Two well-separated blobs on the unit sphere plus background blobs from other concepts."""
    rng = np.random.default_rng(42)
    concept_centre, other_centre = _random_direction(rng), _random_direction(rng)

    background_centres = [_random_direction(rng) for _ in range(5)]
    background = np.concatenate([_unit_blob(rng, centre, 60) for centre in background_centres])

    return {
        "concept_set": _unit_blob(rng, concept_centre, 10),
        "gallery": np.concatenate([_unit_blob(rng, concept_centre, 40), _unit_blob(rng, other_centre, 40)]),
        "relevant": np.repeat([True, False], 40),
        "background": background,
        "background_concepts": np.repeat(np.arange(5), 60),
    }


def _fitted(name: str, blobs: dict[str, np.ndarray], **params) -> SetMethod:
    method = get_baseline(name, **params)
    if method.needs_background:
        method.set_background(blobs["background"], blobs["background_concepts"])
    return method.fit(blobs["concept_set"])


def test_discovery_finds_shipped_baselines():
    registry = discover_baselines()

    assert SHIPPED_BASELINES <= set(registry)
    for name, cls in registry.items():
        assert issubclass(cls, SetMethod)
        assert cls.name == name


def test_discovery_rejects_duplicate_names(tmp_path, monkeypatch):
    module_text = textwrap.dedent(
        """
        from baselines import SetMethod

        class {cls}(SetMethod):
            name = "same"

            def fit(self, concept_set):
                return self

            def score(self, gallery):
                return gallery[:, 0]
        """
    )
    modules = {"first": module_text.format(cls="First"), "second": module_text.format(cls="Second")}

    with method_package(tmp_path, monkeypatch, "dup_methods", modules) as package:
        with pytest.raises(ValueError, match="Duplicate baseline name 'same'"):
            discover_baselines(package)


def test_discovery_skips_private_and_imported(tmp_path, monkeypatch):
    modules = {
        "_helpers": (
            "from baselines import SetMethod\n"
            "class Hidden(SetMethod):\n"
            "    name = 'hidden'\n"
            "    def fit(self, concept_set):\n"
            "        return self\n"
            "    def score(self, gallery):\n"
            "        return gallery[:, 0]\n"
        ),
        "reexport": "from baselines.mean_embedding import MeanEmbedding\n",
    }

    with method_package(tmp_path, monkeypatch, "other_methods", modules) as package:
        assert discover_baselines(package) == {}


@pytest.mark.parametrize(
    "source, error",
    [
        (
            "class Half(SetMethod):\n    name = 'half'\n    def fit(self, concept_set):\n        return self\n",
            r"Baseline Half \(name 'half'\) in .*half_methods/module.py does not implement score\. ",
        ),
        (
            "class Odd(SetMethod):\n    name = 'median+v2'\n"
            "    def fit(self, concept_set):\n        return self\n"
            "    def score(self, gallery):\n        return gallery[:, 0]\n",
            r"has the name 'median\+v2', which contains characters other than .* 'median_v2'",
        ),
    ],
    ids=["missing-method", "bad-characters"],
)
def test_discovery_rejects_half_written_baselines(tmp_path, monkeypatch, source, error):
    modules = {"module": "from baselines import SetMethod\n" + source}

    with method_package(tmp_path, monkeypatch, "half_methods", modules) as package:
        with pytest.raises(ValueError, match=error):
            discover_baselines(package)


def test_discovery_skips_abstract_base_without_name(tmp_path, monkeypatch):
    source = (
        "from baselines import SetMethod\n"
        "class Base(SetMethod):\n"
        "    def fit(self, concept_set):\n"
        "        return self\n"
        "class Child(Base):\n"
        "    name = 'child'\n"
        "    def score(self, gallery):\n"
        "        return gallery[:, 0]\n"
    )

    with method_package(tmp_path, monkeypatch, "base_methods", {"module": source}) as package:
        assert list(discover_baselines(package)) == ["child"]


@pytest.mark.parametrize(
    "source, error",
    [
        ("import os\nimport no_such_package_for_s2m\n", r"line 2, failed to import: ModuleNotFoundError"),
        ("x = 1\n\ndef broken(:\n", r"line 3, failed to import: SyntaxError"),
        ("VALUE = undefined_name\n", r"line 1, failed to import: NameError"),
    ],
    ids=["missing-import", "syntax-error", "name-error"],
)
def test_discovery_names_module_that_fails(tmp_path, monkeypatch, source, error):
    with method_package(tmp_path, monkeypatch, "broken_methods", {"broken": source}) as package:
        with pytest.raises(ImportError, match=rf"broken_methods/broken.py, {error}") as raised:
            discover_baselines(package)

    assert "leading underscore" in str(raised.value)


def test_get_baseline_unknown_name():
    with pytest.raises(ValueError, match="Unknown baseline 'nope'") as error:
        get_baseline("nope")

    for name in ALL_BASELINES:
        assert name in str(error.value)


@pytest.mark.parametrize("name", ALL_BASELINES)
def test_unknown_param_lists_accepted(name):
    with pytest.raises(ValueError, match="unknown parameter") as error:
        get_baseline(name, not_a_param=1)

    for accepted in baselines.discover_baselines()[name].default_params:
        assert accepted in str(error.value)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("linear_svm", {"C": 0.0}),
        ("linear_svm", {"C": True}),
        ("linear_svm", {"n_negatives": 0}),
        ("linear_svm", {"seed": -1}),
        ("linear_svm", {"class_weight": "unbalanced"}),
        ("gmm", {"n_components": 0}),
        ("gmm", {"n_components": 1.5}),
        ("gmm", {"reg_covar": -1e-3}),
        ("gmm", {"reg_covar": float("nan")}),
        ("gmm", {"max_iter": 0}),
        ("gmm", {"n_init": 0}),
    ],
)
def test_invalid_param_value(name, params):
    (param, value), = params.items()

    with pytest.raises(ValueError, match=f"Parameter {param} must be") as error:
        get_baseline(name, **params)

    assert repr(value) in str(error.value)


def test_get_params_include_defaults():
    method = get_baseline("gmm", n_components=3)

    assert method.get_params() == {"n_components": 3, "reg_covar": 1e-3, "max_iter": 100, "n_init": 1, "seed": 0}
    assert "n_components=3" in repr(method)


@pytest.mark.parametrize("name", ALL_BASELINES)
def test_baseline_separates_blobs(name, blobs):
    scores = _fitted(name, blobs).score(blobs["gallery"])

    assert scores.shape == (blobs["gallery"].shape[0],)
    assert scores.dtype == np.float64
    assert np.all(np.isfinite(scores))
    assert average_precision_score(blobs["relevant"], scores) > 0.9


@pytest.mark.parametrize("name", ALL_BASELINES)
def test_baseline_accepts_float32(name, blobs):
    float32_blobs = {key: value.astype(np.float32) if value.dtype == np.float64 else value for key, value in blobs.items()}

    scores = _fitted(name, float32_blobs).score(float32_blobs["gallery"])

    assert scores.shape == (blobs["gallery"].shape[0],)
    assert average_precision_score(blobs["relevant"], scores) > 0.9


@pytest.mark.parametrize("name", ALL_BASELINES)
def test_score_rejects_dimension_mismatch(name, blobs):
    method = _fitted(name, blobs)

    with pytest.raises(ValueError, match=f"gallery has {N_FEATURES - 1} features") as error:
        method.score(blobs["gallery"][:, :-1])

    assert str(N_FEATURES) in str(error.value)


@pytest.mark.parametrize("name", ALL_BASELINES)
@pytest.mark.parametrize(
    ("concept_set", "message"),
    [
        (np.ones(N_FEATURES), r"2-D array .* got shape \(16,\)"),
        (np.ones((0, N_FEATURES)), r"at least one descriptor .* got shape \(0, 16\)"),
        (np.ones((3, N_FEATURES), dtype=int), "floating-point dtype; got dtype int"),
        (np.array([[np.nan] * N_FEATURES]), "NaN or infinite values in 1 of 1 rows"),
    ],
)
def test_fit_rejects_bad_input(name, concept_set, message, blobs):
    method = get_baseline(name)
    if method.needs_background:
        method.set_background(blobs["background"], blobs["background_concepts"])

    with pytest.raises(ValueError, match=message):
        method.fit(concept_set)


@pytest.mark.parametrize("name", ALL_BASELINES)
def test_score_before_fit_raises(name, blobs):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        get_baseline(name).score(blobs["gallery"])


def test_mean_embedding_matches_formula(blobs):
    method = _fitted("mean_embedding", blobs)
    mean = blobs["concept_set"].mean(axis=0)

    expected = -np.sqrt(((blobs["gallery"] - mean) ** 2).sum(axis=1))

    np.testing.assert_allclose(method.score(blobs["gallery"]), expected)


def test_nearest_neighbour_normalises_inputs(blobs):
    scaled_set = 3.0 * blobs["concept_set"]
    scaled_gallery = 0.5 * blobs["gallery"]

    scores = get_baseline("nearest_neighbour").fit(scaled_set).score(scaled_gallery)
    expected = (blobs["gallery"] @ blobs["concept_set"].T).max(axis=1)

    np.testing.assert_allclose(scores, expected)
    assert np.all(scores <= 1.0 + 1e-12)


def test_svm_requires_background(blobs):
    with pytest.raises(RuntimeError, match="set_background"):
        get_baseline("linear_svm").fit(blobs["concept_set"])


def test_svm_background_label_shape(blobs):
    with pytest.raises(ValueError, match=r"shape \(300,\)"):
        get_baseline("linear_svm").set_background(blobs["background"], np.zeros(5))


def test_svm_deterministic_across_call_order(blobs):
    other_set = blobs["gallery"][40:45]
    first = _fitted("linear_svm", blobs, n_negatives=50)
    first_negatives = first.negative_indices_.copy()
    first_scores = first.score(blobs["gallery"])

    second = get_baseline("linear_svm", n_negatives=50)
    second.set_background(blobs["background"], blobs["background_concepts"])
    second.fit(other_set)
    second.fit(blobs["concept_set"])

    np.testing.assert_array_equal(second.negative_indices_, first_negatives)
    np.testing.assert_array_equal(second.score(blobs["gallery"]), first_scores)


def test_svm_negatives_depend_on_seed_and_set(blobs):
    reference = _fitted("linear_svm", blobs, n_negatives=50).negative_indices_
    other_seed = _fitted("linear_svm", blobs, n_negatives=50, seed=1).negative_indices_

    other_set = get_baseline("linear_svm", n_negatives=50)
    other_set.set_background(blobs["background"], blobs["background_concepts"])
    other_set.fit(blobs["concept_set"][:-1])

    assert reference.shape == (50,)
    assert np.unique(reference).size == 50
    assert not np.array_equal(reference, other_seed)
    assert not np.array_equal(reference, other_set.negative_indices_)


def test_svm_uses_whole_small_background(blobs):
    method = _fitted("linear_svm", blobs, n_negatives=10_000)

    np.testing.assert_array_equal(method.negative_indices_, np.arange(blobs["background"].shape[0]))


def test_svm_rejects_background_dimension_mismatch(blobs):
    method = get_baseline("linear_svm")
    method.set_background(blobs["background"][:, :-1], blobs["background_concepts"])

    with pytest.raises(ValueError, match=f"concept_set has {N_FEATURES} features"):
        method.fit(blobs["concept_set"])


def test_gmm_small_set_reduces_components(blobs, caplog):
    method = get_baseline("gmm", n_components=3)

    with caplog.at_level(logging.DEBUG, logger="baselines.gmm"):
        method.fit(blobs["concept_set"][:2])

    assert method.mixture_.n_components == 2
    assert "fewer than n_components=3" in caplog.text
    assert np.all(np.isfinite(method.score(blobs["gallery"])))


def test_gmm_single_point_is_isotropic_gaussian(blobs):
    point = blobs["concept_set"][:1]
    reg_covar = 1e-3

    scores = get_baseline("gmm", reg_covar=reg_covar).fit(point).score(blobs["gallery"])
    squared_distances = ((blobs["gallery"] - point) ** 2).sum(axis=1)
    expected = -0.5 * (N_FEATURES * np.log(2 * np.pi * reg_covar) + squared_distances / reg_covar)

    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert average_precision_score(blobs["relevant"], scores) > 0.9


@pytest.mark.parametrize("name", ["mean_embedding", "nearest_neighbour"])
def test_batch_scores_match_one_by_one(name):
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(40, 6))
    sets = [rng.normal(size=(size, 6)) for size in (3, 5, 1)]
    method = get_baseline(name)

    batched = method.fit_score_batch(sets, gallery)
    one_by_one = np.stack([method.fit(s).score(gallery) for s in sets])

    assert batched.shape == (3, 40)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-10, atol=1e-10)
