"""Tests of the MobileNetV2 module and its TFLite weight reader.

The PyTorch module runs in float32 on the dequantized weights, while the
TensorFlow Lite runtime (``ai-edge-litert``) runs the uint8 graph, so the two
agree on the top-1 class and correlate closely, but not bit for bit.
"""

import dataclasses
import sys
import warnings
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
import tflite
import torch
import torch.nn.functional as F
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

from s2m.models import mobilenet_v2 as mobilenet_v2_module
from s2m.models.mobilenet_v2 import (
    Conv2dSame,
    MobileNetV2,
    TorchvisionMobileNetV2,
    load_mobilenet_v2_tflite,
    load_torchvision_mobilenet_v2,
    preprocess,
    resize_image,
    tf_same_padding,
)
from s2m.models.tflite_weights import Quantization, TFLiteModelError, dequantize, read_tflite_layers

MODEL_FILE = "mobilenet_v2_1.0_224_quant.tflite"
POOLED_TENSOR = "MobilenetV2/Logits/AvgPool"
# Top-1 class of the TFLite runtime after a PIL bilinear resize to 224x224.
REFERENCE_TOP1 = {
    "cat.bmp": 286,  # Egyptian cat
    "grace_hopper.bmp": 653,  # military uniform
    "bird.bmp": 20,  # chickadee
    "hot_dog.jpg": 935,  # hotdog
}
IMAGES = list(REFERENCE_TOP1)
MIN_CORRELATION = 0.99


@pytest.fixture(scope="module")
def model_dir(raw_data_dir: Path) -> Path:
    return raw_data_dir / "mobilenet_v2"


@pytest.fixture(scope="module")
def tflite_path(model_dir: Path) -> Path:
    return model_dir / MODEL_FILE


@pytest.fixture(scope="module")
def model(tflite_path: Path) -> MobileNetV2:
    return load_mobilenet_v2_tflite(tflite_path)


@pytest.fixture(scope="module")
def labels(model_dir: Path) -> list[str]:
    return (model_dir / "imagenet_labels.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def pixels(model_dir: Path) -> dict[str, np.ndarray]:
    """Resized uint8 ``(224, 224, 3)`` pixels of each test image, fed to both runtimes."""
    return {name: resize_image(Image.open(model_dir / name)) for name in IMAGES}


@pytest.fixture(scope="module")
def tflite_outputs(tflite_path: Path, pixels: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Run the TFLite runtime on each image: top-1 class, pooled features (1280,), logits (1001,)."""
    logits_tensor = read_tflite_layers(tflite_path)[-1].output_name
    with warnings.catch_warnings():
        # The runtime warns that preserving all tensors costs memory.
        warnings.simplefilter("ignore", UserWarning)
        interpreter = Interpreter(model_path=str(tflite_path), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    details = {detail["name"]: detail for detail in interpreter.get_tensor_details()}
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]

    outputs = {}
    for name, image_pixels in pixels.items():
        interpreter.set_tensor(input_index, image_pixels[np.newaxis])
        interpreter.invoke()
        outputs[name] = {
            "top1": int(np.argmax(interpreter.get_tensor(output_index)[0])),
            "pooled": _read_dequantized(interpreter, details[POOLED_TENSOR]),
            "logits": _read_dequantized(interpreter, details[logits_tensor]),
        }
    return outputs


def _read_dequantized(interpreter: Interpreter, detail: dict) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    values = interpreter.get_tensor(detail["index"]).reshape(-1).astype(np.float64)
    return scale * (values - zero_point)


def _torch_outputs(model: MobileNetV2, image_pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        x = preprocess(image_pixels)
        pooled = model.pooled_features(x)
        logits = model.classifier(pooled)
    return pooled[0].numpy(), logits[0].numpy()


@pytest.mark.parametrize("image_name", IMAGES)
def test_top1_matches_tflite_and_reference(model, labels, pixels, tflite_outputs, image_name):
    _, logits = _torch_outputs(model, pixels[image_name])
    torch_top1 = int(np.argmax(logits))
    tflite_top1 = tflite_outputs[image_name]["top1"]
    reference = REFERENCE_TOP1[image_name]

    message = f"torch {torch_top1} ({labels[torch_top1]}), tflite {tflite_top1} ({labels[tflite_top1]})"
    assert torch_top1 == tflite_top1, message
    assert tflite_top1 == reference, message
    assert torch_top1 == reference, message


@pytest.mark.parametrize("image_name", IMAGES)
def test_pooled_features_correlate_with_tflite(model, pixels, tflite_outputs, image_name):
    pooled, _ = _torch_outputs(model, pixels[image_name])
    tflite_pooled = tflite_outputs[image_name]["pooled"]

    assert pooled.shape == (1280,)
    assert tflite_pooled.shape == (1280,)
    correlation = np.corrcoef(pooled, tflite_pooled)[0, 1]
    assert correlation > MIN_CORRELATION


@pytest.mark.parametrize("image_name", IMAGES)
def test_logits_correlate_with_tflite(model, pixels, tflite_outputs, image_name):
    _, logits = _torch_outputs(model, pixels[image_name])
    tflite_logits = tflite_outputs[image_name]["logits"]

    assert tflite_logits.shape == (1001,)
    correlation = np.corrcoef(logits, tflite_logits)[0, 1]
    assert correlation > MIN_CORRELATION


def test_backward_reaches_last_block(model, pixels):
    assert all(parameter.requires_grad for parameter in model.parameters())

    x = preprocess(pixels["cat.bmp"])
    loss = F.cross_entropy(model(x), torch.tensor([REFERENCE_TOP1["cat.bmp"]]))
    model.zero_grad(set_to_none=True)
    loss.backward()

    last_block_conv = model.blocks[model.n_blocks - 1].conv
    gradients = {
        "last block weight": last_block_conv.weight.grad,
        "last block bias": last_block_conv.bias.grad,
        "classifier weight": model.classifier.weight.grad,
    }
    model.zero_grad(set_to_none=True)
    for name, gradient in gradients.items():
        assert gradient is not None, name
        assert torch.isfinite(gradient).all(), name
        assert gradient.abs().sum() > 0, name


def test_forward_features_split_matches_full(model, pixels):
    x = preprocess([pixels["bird.bmp"], pixels["hot_dog.jpg"]])
    with torch.no_grad():
        full = model(x)
        cached = model.forward_features(x, 0, 7)
        resumed = model(cached, start=7)
        block_18 = model.forward_features(x)

    assert cached.shape == (2, 32, 28, 28)
    assert block_18.shape == (2, 1280, 7, 7)
    assert full.shape == (2, 1001)
    torch.testing.assert_close(resumed, full)


@pytest.mark.parametrize(("start", "end"), [(-1, 5), (5, 4), (0, 20)])
def test_forward_features_rejects_bad_range(model, start, end):
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="invalid block range"):
        model.forward_features(x, start, end)


def test_module_structure():
    model = MobileNetV2()
    conv_layers = model.conv_layers()

    assert model.n_blocks == 19
    assert model.block_out_channels[0] == 32
    assert model.block_out_channels[17] == 320
    assert model.block_out_channels[18] == 1280
    assert len(conv_layers) == 52
    assert sum(layer.relu6 for layer in conv_layers) == 35
    assert sum(layer.conv.stride == (2, 2) for layer in conv_layers) == 5
    assert sum(getattr(block, "use_residual", False) for block in model.blocks) == 10


@pytest.mark.parametrize(
    ("size", "kernel_size", "stride", "expected"),
    [
        (224, 3, 2, (0, 1)),
        (8, 3, 2, (0, 1)),
        (7, 3, 2, (1, 1)),
        (112, 3, 1, (1, 1)),
        (7, 1, 1, (0, 0)),
    ],
)
def test_tf_same_padding_values(size, kernel_size, stride, expected):
    assert tf_same_padding(size, kernel_size, stride) == expected


def test_conv2d_same_stride2_pads_bottom_right():
    torch.manual_seed(0)
    conv = Conv2dSame(4, 6, 3, stride=2)
    x = torch.randn(2, 4, 8, 8)

    with torch.no_grad():
        output = conv(x)
        manual = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
        symmetric = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)

    assert output.shape == (2, 6, 4, 4)
    torch.testing.assert_close(output, manual)
    assert not torch.allclose(output, symmetric)


def test_conv2d_same_odd_input_pads_symmetrically():
    torch.manual_seed(0)
    conv = Conv2dSame(4, 6, 3, stride=2)
    x = torch.randn(2, 4, 7, 7)

    with torch.no_grad():
        output = conv(x)
        symmetric = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)

    assert output.shape == (2, 6, 4, 4)
    torch.testing.assert_close(output, symmetric)


def test_preprocess_maps_tflite_input_quantization():
    for value, expected in [(0, -1.0), (128, 0.0), (255, 0.9921875)]:
        image = np.full((50, 70, 3), value, dtype=np.uint8)
        x = preprocess(image)
        assert x.shape == (1, 3, 224, 224)
        assert x.dtype == torch.float32
        assert torch.all(x == expected), value


def test_preprocess_converts_greyscale_and_rgba():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.zeros((40, 60, 1), dtype=np.uint8)], axis=2)
    grey = rgb[:, :, 0]

    x = preprocess([Image.fromarray(rgb), rgba, Image.fromarray(grey), grey[:, :, np.newaxis]])

    assert x.shape == (4, 3, 224, 224)
    torch.testing.assert_close(x[1], x[0])
    torch.testing.assert_close(x[2, 0], x[2, 1])
    torch.testing.assert_close(x[2, 0], x[2, 2])
    torch.testing.assert_close(x[3], x[2])


def test_preprocess_rejects_non_uint8_array():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((32, 32, 3), dtype=np.float32))


def test_torchvision_wrapper_normalizes_input():
    network = torch.nn.Module()
    network.features = torch.nn.Sequential(*[torch.nn.Identity() for _ in range(19)])
    network.classifier = torch.nn.Linear(3, 1000)
    wrapper = TorchvisionMobileNetV2(network)
    image = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)

    normalized = wrapper.forward_features(preprocess(image))

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - mean) / std
    torch.testing.assert_close(normalized, expected)
    assert wrapper.n_blocks == 19
    assert wrapper.pooled_features(preprocess(image)).shape == (1, 3)


def test_torchvision_missing_raises_runtime_error(monkeypatch):
    # A None entry in sys.modules makes `import torchvision` raise ImportError.
    monkeypatch.setitem(sys.modules, "torchvision", None)

    with pytest.raises(RuntimeError, match="caltech101.backbone.kind: tflite"):
        load_torchvision_mobilenet_v2()


def test_reader_graph_facts(tflite_path):
    layers = read_tflite_layers(tflite_path)

    assert len(layers) == 53
    assert sum(layer.activation == "RELU6" for layer in layers) == 35
    assert sum(layer.stride == (2, 2) for layer in layers) == 5
    assert sum(layer.residual_add for layer in layers) == 10
    assert all(layer.padding == "SAME" for layer in layers)
    assert all(layer.weight.dtype == np.float32 for layer in layers)
    assert layers[1].operator == "DEPTHWISE_CONV_2D"
    assert layers[1].weight.shape == (1, 3, 3, 32)
    assert layers[-1].weight.shape == (1001, 1, 1, 1280)


def test_dequantize_per_channel():
    values = np.array([[0, 10], [20, 30]], dtype=np.uint8)
    quantization = Quantization(scale=np.array([0.5, 2.0]), zero_point=np.array([10, 20]), axis=0)

    result = dequantize(values, quantization)

    np.testing.assert_allclose(result, [[-5.0, 0.0], [0.0, 20.0]])
    assert result.dtype == np.float32


def test_loader_rejects_shape_mismatch(tflite_path, monkeypatch):
    layers = read_tflite_layers(tflite_path)
    layers[3] = dataclasses.replace(layers[3], weight=layers[3].weight[:48])
    monkeypatch.setattr(mobilenet_v2_module, "read_tflite_layers", lambda path: layers)

    with pytest.raises(ValueError, match="weight shape") as error:
        load_mobilenet_v2_tflite(tflite_path)
    assert layers[3].weight_name in str(error.value)


def test_missing_file_raises(tmp_path):
    path = tmp_path / "absent.tflite"

    with pytest.raises(FileNotFoundError) as reader_error:
        read_tflite_layers(path)
    with pytest.raises(FileNotFoundError) as loader_error:
        load_mobilenet_v2_tflite(path)

    assert str(path) in str(reader_error.value)
    assert str(path) in str(loader_error.value)


def test_random_bytes_raise(tmp_path):
    path = tmp_path / "random.tflite"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size=64, dtype=np.uint8).tobytes())

    with pytest.raises(ValueError, match="not a TensorFlow Lite flatbuffer") as error:
        load_mobilenet_v2_tflite(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("corruption", ["truncated", "random body"])
def test_corrupt_flatbuffer_raises(tflite_path, tmp_path, corruption):
    original = tflite_path.read_bytes()
    if corruption == "truncated":
        content = original[:4096]
    else:
        # Keep the root table offset and the TFL3 identifier so the header check passes.
        content = original[:8] + np.random.default_rng(1).integers(0, 256, size=2000, dtype=np.uint8).tobytes()
    path = tmp_path / "corrupt.tflite"
    path.write_bytes(content)

    with pytest.raises(TFLiteModelError) as error:
        read_tflite_layers(path)
    assert str(path) in str(error.value)


def test_unexpected_operator_raises(tmp_path):
    path = tmp_path / "pad.tflite"
    path.write_bytes(_build_single_operator_model(tflite.BuiltinOperator.PAD))

    with pytest.raises(ValueError, match="PAD") as error:
        read_tflite_layers(path)
    assert str(path) in str(error.value)


def _build_single_operator_model(opcode: int) -> bytes:
    """Build a TFLite flatbuffer with one operator mapping tensor 0 to tensor 1."""
    builder = flatbuffers.Builder(1024)

    tflite.BufferStart(builder)
    empty_buffer = tflite.BufferEnd(builder)

    tensors = []
    for name in ("input", "output"):
        name_offset = builder.CreateString(name)
        shape = builder.CreateNumpyVector(np.array([1, 4], dtype=np.int32))
        tflite.TensorStart(builder)
        tflite.TensorAddShape(builder, shape)
        tflite.TensorAddType(builder, tflite.TensorType.FLOAT32)
        tflite.TensorAddBuffer(builder, 0)
        tflite.TensorAddName(builder, name_offset)
        tensors.append(tflite.TensorEnd(builder))

    inputs = builder.CreateNumpyVector(np.array([0], dtype=np.int32))
    outputs = builder.CreateNumpyVector(np.array([1], dtype=np.int32))
    tflite.OperatorStart(builder)
    tflite.OperatorAddOpcodeIndex(builder, 0)
    tflite.OperatorAddInputs(builder, inputs)
    tflite.OperatorAddOutputs(builder, outputs)
    operator = tflite.OperatorEnd(builder)

    tflite.OperatorCodeStart(builder)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, opcode)
    tflite.OperatorCodeAddBuiltinCode(builder, opcode)
    tflite.OperatorCodeAddVersion(builder, 1)
    operator_code = tflite.OperatorCodeEnd(builder)

    tensor_vector = _create_offset_vector(builder, tflite.SubGraphStartTensorsVector, tensors)
    operator_vector = _create_offset_vector(builder, tflite.SubGraphStartOperatorsVector, [operator])
    graph_inputs = builder.CreateNumpyVector(np.array([0], dtype=np.int32))
    graph_outputs = builder.CreateNumpyVector(np.array([1], dtype=np.int32))
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensor_vector)
    tflite.SubGraphAddInputs(builder, graph_inputs)
    tflite.SubGraphAddOutputs(builder, graph_outputs)
    tflite.SubGraphAddOperators(builder, operator_vector)
    graph = tflite.SubGraphEnd(builder)

    code_vector = _create_offset_vector(builder, tflite.ModelStartOperatorCodesVector, [operator_code])
    graph_vector = _create_offset_vector(builder, tflite.ModelStartSubgraphsVector, [graph])
    buffer_vector = _create_offset_vector(builder, tflite.ModelStartBuffersVector, [empty_buffer])
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, 3)
    tflite.ModelAddOperatorCodes(builder, code_vector)
    tflite.ModelAddSubgraphs(builder, graph_vector)
    tflite.ModelAddBuffers(builder, buffer_vector)
    model = tflite.ModelEnd(builder)

    builder.Finish(model, file_identifier=b"TFL3")
    return bytes(builder.Output())


def _create_offset_vector(builder: flatbuffers.Builder, start_vector, offsets: list[int]) -> int:
    start_vector(builder, len(offsets))
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()
