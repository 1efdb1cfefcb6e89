import pytest
import torch

from s2m.losses import histogram_loss, soft_histogram, standardise_episode_scores


def _brute_force_reverse_rate(positive, negative):
    """Fraction of positive-negative pairs in which the negative scores higher."""
    return (negative[None, :] > positive[:, None]).double().mean().item()


def test_soft_histogram_sums_to_one():
    values = torch.rand(50, dtype=torch.float64)
    nodes = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert soft_histogram(values, nodes).sum().item() == pytest.approx(1.0)


def test_soft_histogram_splits_weight_linearly():
    nodes = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    histogram = soft_histogram(torch.tensor([0.25], dtype=torch.float64), nodes)
    assert histogram.tolist() == pytest.approx([0.75, 0.25, 0.0])


def test_histogram_loss_converges_to_pair_count():
    generator = torch.Generator().manual_seed(0)
    positive = torch.randn(60, generator=generator, dtype=torch.float64) + 1.0
    negative = torch.randn(90, generator=generator, dtype=torch.float64)
    expected = _brute_force_reverse_rate(positive, negative)

    errors = []
    for n_bins in (10, 100, 1000, 20000):
        loss = histogram_loss(positive, negative, n_bins=n_bins).item()
        errors.append(abs(loss - expected))

    assert errors[-1] < 1e-3
    assert errors[-1] < errors[0]


def test_histogram_loss_separated_scores():
    positive = torch.tensor([5.0, 6.0, 7.0])
    negative = torch.tensor([-3.0, -2.0])
    assert histogram_loss(positive, negative, n_bins=100).item() == pytest.approx(0.0, abs=1e-6)
    assert histogram_loss(negative, positive, n_bins=100).item() == pytest.approx(1.0, abs=1e-6)


def test_histogram_loss_gradient_pushes_scores_apart():
    # Coarse bins, so that every positive shares a bin with some negative.
    positive = torch.tensor([0.0, 0.2], requires_grad=True)
    negative = torch.tensor([0.1, 0.3], requires_grad=True)
    histogram_loss(positive, negative, n_bins=4).backward()

    assert torch.all(positive.grad <= 0)
    assert torch.all(negative.grad >= 0)
    assert positive.grad.abs().sum() > 0


def test_histogram_loss_rejects_bad_input():
    scores = torch.zeros(3)
    with pytest.raises(ValueError, match="n_bins"):
        histogram_loss(scores, scores, n_bins=1)
    with pytest.raises(ValueError, match="1-D"):
        histogram_loss(scores[None], scores)
    with pytest.raises(ValueError, match="at least one"):
        histogram_loss(scores[:0], scores)


def test_standardise_keeps_order_within_episode():
    positive = torch.tensor([[1.0, 2.0], [100.0, 300.0]])
    negative = torch.tensor([[0.0, 1.5], [0.0, 200.0]])
    standard_positive, standard_negative = standardise_episode_scores(positive, negative)
    joined = torch.cat([standard_positive, standard_negative], dim=1)

    assert torch.allclose(joined.mean(dim=1), torch.zeros(2), atol=1e-6)
    assert torch.equal(
        torch.argsort(joined, dim=1), torch.argsort(torch.cat([positive, negative], dim=1), dim=1)
    )
