import numpy as np
import pandas as pd
import pytest

from s2m.problems import (
    Protocol,
    make_problem_set,
    read_problem_set,
    write_problem_set,
)


def _image_table(n_test=6, per_concept=8, n_train=3, n_clutter_noise=0, n_clutter_gallery=0):
    concepts, splits = [], []
    for c in range(n_train):
        concepts += [f"train{c}"] * per_concept
        splits += ["meta_train"] * per_concept
    for c in range(n_test):
        concepts += [f"test{c}"] * per_concept
        splits += ["meta_test"] * per_concept
    concepts += ["clutter"] * (n_clutter_noise + n_clutter_gallery)
    splits += ["clutter_noise"] * n_clutter_noise + ["clutter_gallery"] * n_clutter_gallery
    return pd.DataFrame({"image_id": np.arange(len(concepts)), "concept": concepts, "split": splits})


def test_clean_protocol_structure():
    table = _image_table()
    problem_set = make_problem_set(table, Protocol("noise-0.0", set_size=5), seed=1)
    concepts = table["concept"].to_numpy()

    assert len(problem_set.problems) == 6
    assert len(problem_set.gallery) == 6 * 3
    for problem in problem_set.problems:
        assert len(problem.concept_set) == 5
        assert set(concepts[problem.concept_set]) == {problem.concept}
        assert not np.isin(problem.concept_set, problem_set.gallery).any()
        assert not problem.is_noise.any()

    assert set(table.loc[problem_set.gallery, "split"]) == {"meta_test"}


def test_relevance_marks_gallery_of_concept():
    table = _image_table()
    problem_set = make_problem_set(table, Protocol("p", set_size=5), seed=0)
    relevance = problem_set.relevance(table["concept"].to_numpy())

    assert relevance.shape == (6, 18)
    assert relevance.sum(axis=1).tolist() == [3] * 6


def test_noise_replaces_fraction_outside_gallery():
    table = _image_table(per_concept=12)
    problem_set = make_problem_set(table, Protocol("noise-0.4", set_size=5, noise_fraction=0.4), seed=3)
    concepts = table["concept"].to_numpy()

    for problem in problem_set.problems:
        assert problem.is_noise.sum() == 2
        noise = problem.concept_set[problem.is_noise]
        clean = problem.concept_set[~problem.is_noise]
        assert problem.concept not in set(concepts[noise])
        assert set(concepts[clean]) == {problem.concept}
        assert not np.isin(noise, problem_set.gallery).any()


def test_protocols_share_gallery_and_clean_part():
    table = _image_table(per_concept=12)
    clean = make_problem_set(table, Protocol("a", set_size=5), seed=7)
    noisy = make_problem_set(table, Protocol("b", set_size=5, noise_fraction=0.4), seed=7)

    assert np.array_equal(clean.gallery, noisy.gallery)
    for clean_problem, noisy_problem in zip(clean.problems, noisy.problems):
        kept = noisy_problem.concept_set[~noisy_problem.is_noise]
        assert np.isin(kept, clean_problem.concept_set).all()


def test_clutter_noise_and_gallery_roles():
    table = _image_table(n_clutter_noise=10, n_clutter_gallery=4)
    problem_set = make_problem_set(table, Protocol("n", set_size=4, noise_fraction=0.5), seed=0)
    splits = table["split"].to_numpy()

    for problem in problem_set.problems:
        assert set(splits[problem.concept_set[problem.is_noise]]) == {"clutter_noise"}
    assert (splits[problem_set.gallery] == "clutter_gallery").sum() == 4
    assert not (splits[problem_set.gallery] == "clutter_noise").any()


def test_polysemous_concepts_mix_two_categories():
    table = _image_table(per_concept=10)
    problem_set = make_problem_set(table, Protocol("poly", set_size=6, categories_per_concept=2), seed=2)
    concepts = table["concept"].to_numpy()
    used = np.concatenate([p.concept_set for p in problem_set.problems])

    assert len(problem_set.problems) == 6
    assert len(np.unique(used)) == len(used)
    for problem in problem_set.problems:
        first, second = problem.positive_concepts
        members = concepts[problem.concept_set]
        assert (members == first).sum() == 3
        assert (members == second).sum() == 3

    relevance = problem_set.relevance(concepts)
    assert relevance.sum(axis=1).tolist() == [8] * 6


def test_polysemous_protocols_share_pairs():
    table = _image_table(n_test=8, per_concept=10, n_clutter_noise=20)
    clean = make_problem_set(table, Protocol("polysemous-0.00", set_size=6, categories_per_concept=2), seed=4)
    noisy = make_problem_set(
        table, Protocol("polysemous-0.50", set_size=6, noise_fraction=0.5, categories_per_concept=2), seed=4
    )
    other_seed = make_problem_set(table, Protocol("polysemous-0.00", set_size=6, categories_per_concept=2), seed=5)

    pairs = [problem.positive_concepts for problem in clean.problems]
    assert [problem.positive_concepts for problem in noisy.problems] == pairs
    assert [problem.positive_concepts for problem in other_seed.problems] != pairs
    assert [int(problem.is_noise.sum()) for problem in noisy.problems] == [3] * 8


def test_same_seed_same_problems_and_round_trip(tmp_path):
    table = _image_table(per_concept=12)
    protocol = Protocol("noise-0.2", set_size=5, noise_fraction=0.2)
    first = make_problem_set(table, protocol, seed=5)
    second = make_problem_set(table, protocol, seed=5)
    other = make_problem_set(table, protocol, seed=6)

    write_problem_set(first, tmp_path / "p.json")
    loaded = read_problem_set(tmp_path / "p.json")

    assert all(np.array_equal(a.concept_set, b.concept_set) for a, b in zip(first.problems, second.problems))
    assert not all(np.array_equal(a.concept_set, b.concept_set) for a, b in zip(first.problems, other.problems))
    assert np.array_equal(loaded.gallery, first.gallery)
    assert loaded.protocol == protocol
    assert loaded.dataset_checksum == first.dataset_checksum
    for a, b in zip(first.problems, loaded.problems):
        assert np.array_equal(a.concept_set, b.concept_set)
        assert np.array_equal(a.is_noise, b.is_noise)
        assert a.positive_concepts == b.positive_concepts


def test_small_concept_rejected():
    table = _image_table(per_concept=5)
    with pytest.raises(ValueError, match="has 5 images"):
        make_problem_set(table, Protocol("p", set_size=5), seed=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"set_size": 1}, "set_size"),
        ({"set_size": 5, "noise_fraction": 1.0}, "noise_fraction"),
        ({"set_size": 5, "noise_fraction": 0.95}, "replaces all"),
        ({"set_size": 5, "categories_per_concept": 3}, "categories_per_concept"),
    ],
)
def test_protocol_rejects_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Protocol("bad", **kwargs)


def test_read_problem_set_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_problem_set(tmp_path / "missing.json")

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt.json"):
        read_problem_set(corrupt)
