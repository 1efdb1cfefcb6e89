import numpy as np
import pytest
import torch

from s2m.embeddings import BackboneHeadEmbedding, compute_descriptors, load_embedding, save_embedding
from s2m.models.convnet import ConvNetEmbedding
from s2m.set_models import SetModelSpec
from s2m.training.metatrain import MetaTrainingOptions, meta_train, validation_map
from s2m.training.pretrain import pretrain_classifier
from toy_data import toy_images, toy_validation


def test_convnet_output_is_unit_norm():
    network = ConvNetEmbedding(channels=8, descriptor_dim=5)
    descriptors = network(torch.rand(3, 1, 28, 28))
    assert descriptors.shape == (3, 5)
    assert torch.allclose(descriptors.norm(dim=1), torch.ones(3), atol=1e-6)


def test_pretraining_learns_and_is_deterministic():
    inputs, labels = toy_images()
    weights = []
    for _ in range(2):
        torch.manual_seed(123)
        network = ConvNetEmbedding(channels=8, descriptor_dim=8)
        history = pretrain_classifier(
            network, inputs, labels, epochs=4, batch_size=24, learning_rate=0.01, seed=1, show_progress=False
        )
        weights.append(network.projection.weight.detach().clone())

    assert history[-1]["loss"] < history[0]["loss"]
    assert torch.equal(weights[0], weights[1])


@pytest.mark.parametrize(
    "spec",
    [SetModelSpec("mean"), SetModelSpec("gaussian"), SetModelSpec("gmm", 2, {"max_iter": 50})],
    ids=["mean", "gaussian", "gmm"],
)
def test_meta_training_runs_and_keeps_best(spec):
    inputs, labels = toy_images()
    torch.manual_seed(0)
    network = ConvNetEmbedding(channels=8, descriptor_dim=8)
    validation = toy_validation(inputs, labels)
    options = MetaTrainingOptions(
        steps=6, episodes_per_step=3, set_size=4, n_positives=4, n_negatives=8,
        learning_rate=0.01, validate_every=3, seed=0,
    )

    history = meta_train(network, inputs, labels, spec, options, validation, show_progress=False)

    assert [record["step"] for record in history] == [0, 3, 6]
    assert all(0 <= record["loss"] <= 1 for record in history[1:])
    best = max(record["validation_map"] for record in history)
    assert validation_map(network, validation, spec, "cpu") == pytest.approx(best, abs=1e-6)


def test_training_environments_counted(tmp_path):
    from s2m.pipeline.reporting import training_environments

    network = ConvNetEmbedding(channels=8, descriptor_dim=6)
    spec = {"architecture": "convnet", "channels": 8, "descriptor_dim": 6}
    save_embedding(tmp_path / "a.pt", network, spec, {"device": "cpu", "torch": "2.13.0+cpu"})
    save_embedding(tmp_path / "b.pt", network, spec, {"device": "cpu", "torch": "2.13.0+cpu"})
    save_embedding(tmp_path / "c.pt", network, spec, {"device": "cuda:0", "torch": "2.13.0+cu128"})
    save_embedding(tmp_path / "d.pt", network, spec, {"kind": "older checkpoint"})
    paths = [tmp_path / name for name in ("a.pt", "b.pt", "c.pt", "d.pt")]

    summary = training_environments(paths)

    assert summary == (
        "cpu with torch 2.13.0+cpu (2 of 4), cuda:0 with torch 2.13.0+cu128 (1 of 4), not recorded (1 of 4)"
    )


def test_checkpoint_round_trip(tmp_path):
    network = ConvNetEmbedding(channels=8, descriptor_dim=6)
    spec = {"architecture": "convnet", "channels": 8, "descriptor_dim": 6}
    save_embedding(tmp_path / "m.pt", network, spec, {"kind": "test"})
    loaded, loaded_spec, metadata = load_embedding(tmp_path / "m.pt")
    inputs = torch.rand(5, 1, 28, 28)

    assert loaded_spec == spec
    assert metadata == {"kind": "test"}
    np.testing.assert_allclose(
        compute_descriptors(loaded, inputs, show_progress=False),
        compute_descriptors(network.eval(), inputs, show_progress=False),
        rtol=1e-6,
    )


def test_backbone_head_starts_as_normalised_identity():
    features = torch.randn(4, 16)
    descriptors = BackboneHeadEmbedding(16)(features)
    assert torch.allclose(descriptors, torch.nn.functional.normalize(features, dim=1), atol=1e-6)


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_embedding(tmp_path / "absent.pt")


def test_unfrozen_tail_matches_backbone_at_start(raw_data_dir):
    from s2m.embeddings import build_embedding
    from s2m.models.mobilenet_v2 import load_mobilenet_v2_tflite

    tflite_path = raw_data_dir / "mobilenet_v2" / "mobilenet_v2_1.0_224_quant.tflite"
    backbone = load_mobilenet_v2_tflite(tflite_path).eval()
    spec = {"architecture": "backbone_head", "feature_dim": 1280, "start_block": 16, "tflite_path": str(tflite_path)}
    network = build_embedding(spec).eval()
    images = torch.rand(2, 3, 224, 224) * 2 - 1

    with torch.no_grad():
        cached = backbone.forward_features(images, start=0, end=16)
        descriptors = network(cached)
        expected = torch.nn.functional.normalize(backbone.pooled_features(images), dim=1)

    assert torch.allclose(descriptors, expected, atol=1e-5)
    trainable = [name for name, p in network.named_parameters() if p.requires_grad]
    assert any(name.startswith("tail.backbone.blocks.16") for name in trainable)


def test_mobilenet_block_count_constant():
    from s2m.models.mobilenet_v2 import N_BLOCKS, MobileNetV2

    assert N_BLOCKS == MobileNetV2().n_blocks
    assert N_BLOCKS == 19
