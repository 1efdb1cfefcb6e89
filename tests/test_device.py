"""The set-to-model layer and meta-training on another torch device give the CPU's results.

The device is ``$S2M_TEST_DEVICE``, or ``cuda`` when it is unset. These tests are skipped when
that device is not available, which is the case on a CPU-only machine such as CI. On a GPU
machine, ``benchmarks/device_check.sh`` runs them. ``S2M_TEST_DEVICE=cpu`` runs them against
the CPU itself, which checks only the tests' own code.
"""

import os

import numpy as np
import pytest
import torch

from s2m.mixture import fit_diagonal_gaussian, fit_diagonal_gmm, mixture_log_prob
from s2m.mixture.em import kmeans_plusplus_centers
from s2m.mixture.synthetic import clustered_sets
from s2m.models.convnet import ConvNetEmbedding
from s2m.set_models import SetModelSpec
from s2m.training.metatrain import MetaTrainingOptions, meta_train, validation_map
from toy_data import toy_images, toy_validation

DEVICE = os.environ.get("S2M_TEST_DEVICE", "cuda")


def _device_available(name: str) -> bool:
    try:
        torch.empty(1, device=name)
    except (RuntimeError, AssertionError):
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _device_available(DEVICE),
    reason=f"torch device {DEVICE!r} is not available; set S2M_TEST_DEVICE to one that is",
)


def _masked_sets(dtype=torch.float64):
    """Sets of 12 points in 4 dimensions, of sizes 12, 9 and 7, and their mask."""
    x = clustered_sets(3, 12, 4, 3, noise=0.8, normalize=False, seed=301, dtype=dtype)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 9:] = False
    mask[2, 7:] = False
    return x, mask


def _on_cpu(fit):
    return [tensor.detach().cpu() for tensor in (fit.weights, fit.means, fit.variances)]


def test_kmeans_seeds_match_cpu():
    x, mask = _masked_sets()
    member = mask.to(x.dtype)

    on_cpu = kmeans_plusplus_centers(x, member, 3, seed=7)
    on_device = kmeans_plusplus_centers(x.to(DEVICE), member.to(DEVICE), 3, seed=7)

    assert torch.equal(on_device.cpu(), on_cpu)


def test_gaussian_fit_matches_cpu():
    x, mask = _masked_sets()

    on_cpu = fit_diagonal_gaussian(x, mask)
    on_device = fit_diagonal_gaussian(x.to(DEVICE), mask.to(DEVICE))

    for device_tensor, cpu_tensor in zip(_on_cpu(on_device), _on_cpu(on_cpu)):
        torch.testing.assert_close(device_tensor, cpu_tensor, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n_components", [2, 3])
def test_mixture_fit_matches_cpu(n_components):
    x, mask = _masked_sets()

    on_cpu = fit_diagonal_gmm(x, n_components, mask, tol=1e-10)
    on_device = fit_diagonal_gmm(x.to(DEVICE), n_components, mask.to(DEVICE), tol=1e-10)

    assert on_device.weights.device.type == torch.device(DEVICE).type
    assert torch.equal(on_device.n_iter.cpu(), on_cpu.n_iter)
    assert torch.equal(on_device.converged.cpu(), on_cpu.converged)
    for device_tensor, cpu_tensor in zip(_on_cpu(on_device), _on_cpu(on_cpu)):
        torch.testing.assert_close(device_tensor, cpu_tensor, rtol=1e-8, atol=1e-10)


def test_float32_fit_matches_float64_log_likelihood():
    x = clustered_sets(16, 50, 64, 3, seed=302, dtype=torch.float64).to(DEVICE)

    fits = {dtype: fit_diagonal_gmm(x.to(dtype), 2, seed=3) for dtype in (torch.float32, torch.float64)}
    log_likelihood = {
        dtype: mixture_log_prob(fit, x.to(dtype)).double().mean(dim=-1).cpu() for dtype, fit in fits.items()
    }

    relative = (log_likelihood[torch.float32] - log_likelihood[torch.float64]).abs() / log_likelihood[torch.float64].abs()
    assert float(relative.max()) < 1e-4


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_mixture_gradient_matches_cpu(backward):
    x, mask = _masked_sets()
    queries = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(303), dtype=torch.float64)

    gradients = []
    for device in ("cpu", DEVICE):
        points = x.to(device).requires_grad_(True)
        fit = fit_diagonal_gmm(points, 3, mask.to(device), tol=1e-10, backward=backward)
        loss = mixture_log_prob(fit, queries.to(device)).sum()
        gradients.append(torch.autograd.grad(loss, points)[0].cpu())

    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-7, atol=1e-9)


def test_meta_training_runs_on_device(monkeypatch):
    # cuDNN convolutions round through TF32 by default, about 1e-3 relative, which could
    # reorder close gallery scores between the device and the CPU.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    inputs, labels = toy_images(per_concept=10)
    validation = toy_validation(inputs, labels)
    spec = SetModelSpec("gmm", 2, {"max_iter": 50})
    options = MetaTrainingOptions(
        steps=4, episodes_per_step=3, set_size=4, n_positives=4, n_negatives=8, learning_rate=0.01, validate_every=2, seed=0
    )
    torch.manual_seed(0)
    network = ConvNetEmbedding(channels=8, descriptor_dim=8)

    history = meta_train(network, inputs, labels, spec, options, validation, device=DEVICE, show_progress=False)

    assert [record["step"] for record in history] == [0, 2, 4]
    assert all(np.isfinite(record["loss"]) for record in history[1:])
    assert next(network.parameters()).device.type == torch.device(DEVICE).type

    # The kept network scores the validation problems the same on the device and on the CPU.
    on_device = validation_map(network, validation, spec, DEVICE)
    on_cpu = validation_map(network.cpu(), validation, spec, "cpu")
    assert on_device == pytest.approx(on_cpu, abs=1e-4)
