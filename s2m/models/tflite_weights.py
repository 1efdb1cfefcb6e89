"""Read the weights of a quantized TensorFlow Lite convolutional network.

The reader parses the ``.tflite`` flatbuffer with the ``tflite`` package (the
generated schema classes of TensorFlow Lite) and returns the convolution,
depthwise-convolution and fully-connected operators in graph order, with their
weights and biases dequantized to float32 as ``scale * (q - zero_point)``.

It targets MobileNet-style graphs. Besides the layers that carry weights it
accepts only the operators listed in ``PASSIVE_OPERATORS``, whose effect a
caller models itself (residual ``ADD``, global pooling, reshapes, softmax and
quantization casts). Any other operator, such as an explicit ``PAD``, raises
``TFLiteModelError`` (a ``ValueError``), because a model built from the
returned layers alone would compute something else.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tflite
from tflite.utils import BUILTIN_OPCODE2NAME

logger = logging.getLogger(__name__)

WEIGHT_OPERATORS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
PASSIVE_OPERATORS = (
    "ADD",
    "AVERAGE_POOL_2D",
    "MEAN",
    "RESHAPE",
    "SQUEEZE",
    "SOFTMAX",
    "QUANTIZE",
    "DEQUANTIZE",
)

_FILE_IDENTIFIER = b"TFL3"
_TENSOR_TYPE_NAMES = {
    value: name for name, value in vars(tflite.TensorType).items() if not name.startswith("_")
}
_ACTIVATION_NAMES = {
    value: name
    for name, value in vars(tflite.ActivationFunctionType).items()
    if not name.startswith("_")
}
_PADDING_NAMES = {
    value: name for name, value in vars(tflite.Padding).items() if not name.startswith("_")
}
_NUMPY_DTYPES = {
    "FLOAT32": np.float32,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
}


class TFLiteModelError(ValueError):
    """A file that is not a TFLite model the reader supports, with the path in the message."""


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of a tensor: ``real = scale * (q - zero_point)``.

    ``scale`` and ``zero_point`` have one entry per tensor, or one entry per
    slice along ``axis`` for per-channel quantization.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int


@dataclass(frozen=True)
class TFLiteLayer:
    """One weight-carrying operator of a TFLite graph, with float32 parameters.

    ``weight`` keeps the TFLite layout: ``(O, H, W, I)`` for ``CONV_2D``,
    ``(1, H, W, C * depth_multiplier)`` for ``DEPTHWISE_CONV_2D`` and ``(O, I)``
    for ``FULLY_CONNECTED``. ``bias`` has shape ``(O,)`` or is ``None``.
    ``residual_add`` is true when an ``ADD`` operator sums this layer's output
    with an earlier tensor and this layer is the last producer feeding that
    ``ADD``, that is, the layer closes a residual block.
    """

    operator_index: int
    operator: str
    weight_name: str
    output_name: str
    weight: np.ndarray
    bias: np.ndarray | None
    stride: tuple[int, int]
    padding: str
    activation: str
    depth_multiplier: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_quantization: Quantization | None
    residual_add: bool


def dequantize(values: np.ndarray, quantization: Quantization | None) -> np.ndarray:
    """Convert quantized integers to float32 as ``scale * (values - zero_point)``.

    Args:
        values: quantized array of any shape. Float arrays pass through as float32.
        quantization: per-tensor parameters (one scale) or per-channel
            parameters along ``quantization.axis``. ``None`` means the array
            contains real values already.

    Returns:
        float32 array with the shape of ``values``.
    """
    if quantization is None:
        return values.astype(np.float32)

    scale = quantization.scale.astype(np.float64)
    zero_point = quantization.zero_point.astype(np.float64)
    if scale.size > 1:
        broadcast_shape = [1] * values.ndim
        broadcast_shape[quantization.axis] = scale.size
        scale = scale.reshape(broadcast_shape)
        zero_point = zero_point.reshape(broadcast_shape)

    return (scale * (values.astype(np.float64) - zero_point)).astype(np.float32)


def read_tflite_layers(path: str | Path) -> list[TFLiteLayer]:
    """Read the convolution and fully-connected layers of a ``.tflite`` file.

    Args:
        path: TensorFlow Lite flatbuffer with one subgraph.

    Returns:
        The layers in the order the graph runs them, with dequantized float32
        weights and biases.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        TFLiteModelError: a ``ValueError`` raised when the file is not a
            TFLite flatbuffer, cannot be parsed, has more than one subgraph,
            or contains an operator outside ``WEIGHT_OPERATORS`` and
            ``PASSIVE_OPERATORS``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"TFLite model file not found: {path}. Check the path, or set S2M_RAW_DATA "
            "to the raw data folder that contains mobilenet_v2/."
        )

    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != _FILE_IDENTIFIER:
        raise TFLiteModelError(
            f"{path} is not a TensorFlow Lite flatbuffer: expected the file identifier "
            f"{_FILE_IDENTIFIER!r} at bytes 4..8, found {data[4:8]!r}. "
            "Replace it with the original .tflite file."
        )

    # A corrupt flatbuffer surfaces as whatever error the generated accessors,
    # flatbuffers or numpy hit first, so all of them become one TFLiteModelError.
    try:
        layers = _parse_layers(path, data)
    except TFLiteModelError:
        raise
    except (struct.error, IndexError, UnicodeDecodeError, OverflowError, TypeError, ValueError) as error:
        raise TFLiteModelError(
            f"failed to parse the TFLite flatbuffer {path} ({type(error).__name__}: {error}). "
            "The file is truncated or corrupt. Replace it with the original .tflite file."
        ) from error

    logger.info("read %d weight layers from %s", len(layers), path)
    return layers


def _parse_layers(path: Path, data: bytes) -> list[TFLiteLayer]:
    model = tflite.Model.GetRootAsModel(data, 0)
    if model.SubgraphsLength() != 1:
        raise TFLiteModelError(
            f"{path} has {model.SubgraphsLength()} subgraphs, but the reader supports "
            "exactly one. Export the model as a single-subgraph .tflite file."
        )
    graph = model.Subgraphs(0)

    operator_names = [_operator_name(model, graph.Operators(i)) for i in range(graph.OperatorsLength())]
    unexpected = sorted(set(operator_names) - set(WEIGHT_OPERATORS) - set(PASSIVE_OPERATORS))
    if unexpected:
        raise TFLiteModelError(
            f"{path} contains unexpected TFLite operators {unexpected}. The reader supports "
            f"{list(WEIGHT_OPERATORS)} plus {list(PASSIVE_OPERATORS)}. "
            "Use a MobileNet-style model without these operators."
        )

    residual_producers = _find_residual_producers(graph, operator_names)

    layers = []
    for index, name in enumerate(operator_names):
        if name in WEIGHT_OPERATORS:
            layer = _read_layer(path, model, data, graph, index, name, index in residual_producers)
            layers.append(layer)
    return layers


def _operator_name(model: tflite.Model, operator: tflite.Operator) -> str:
    # Older files set only the int8 field deprecated_builtin_code, and newer
    # files store 127 (PLACEHOLDER_FOR_GREATER_OP_CODES) there for larger codes,
    # so the larger of the two fields is the real code.
    code_table = model.OperatorCodes(operator.OpcodeIndex())
    code = max(code_table.BuiltinCode(), code_table.DeprecatedBuiltinCode())
    name = BUILTIN_OPCODE2NAME.get(code, f"unknown opcode {code}")
    if name == "CUSTOM":
        custom_code = code_table.CustomCode() or b""
        name = f"CUSTOM({custom_code.decode()})"
    return name


def _find_residual_producers(graph: tflite.SubGraph, operator_names: list[str]) -> set[int]:
    """Find the last operator feeding each ``ADD`` operator and return their indices."""
    producer_of = {}
    for index in range(graph.OperatorsLength()):
        for tensor_index in graph.Operators(index).OutputsAsNumpy():
            producer_of[int(tensor_index)] = index

    residual_producers = set()
    for index, name in enumerate(operator_names):
        if name != "ADD":
            continue
        inputs = graph.Operators(index).InputsAsNumpy()
        producers = [producer_of[int(t)] for t in inputs if int(t) in producer_of]
        if producers:
            residual_producers.add(max(producers))
    return residual_producers


def _read_layer(
    path: Path,
    model: tflite.Model,
    data: bytes,
    graph: tflite.SubGraph,
    index: int,
    name: str,
    residual_add: bool,
) -> TFLiteLayer:
    operator = graph.Operators(index)
    inputs = [int(t) for t in operator.InputsAsNumpy()]
    if len(inputs) < 2:
        raise TFLiteModelError(f"{path}: operator {index} ({name}) has no weight input.")
    input_tensor = graph.Tensors(inputs[0])
    weight_tensor = graph.Tensors(inputs[1])
    output_tensor = graph.Tensors(int(operator.OutputsAsNumpy()[0]))

    weight = dequantize(_read_constant(path, model, data, weight_tensor), _quantization(weight_tensor))
    bias = None
    if len(inputs) > 2 and inputs[2] >= 0:
        bias_tensor = graph.Tensors(inputs[2])
        bias = dequantize(_read_constant(path, model, data, bias_tensor), _quantization(bias_tensor))

    options = _read_options(path, operator, index, name)

    return TFLiteLayer(
        operator_index=index,
        operator=name,
        weight_name=weight_tensor.Name().decode(),
        output_name=output_tensor.Name().decode(),
        weight=weight,
        bias=bias,
        stride=options["stride"],
        padding=options["padding"],
        activation=options["activation"],
        depth_multiplier=options["depth_multiplier"],
        input_shape=tuple(int(d) for d in input_tensor.ShapeAsNumpy()),
        output_shape=tuple(int(d) for d in output_tensor.ShapeAsNumpy()),
        input_quantization=_quantization(input_tensor),
        residual_add=residual_add,
    )


def _read_options(path: Path, operator: tflite.Operator, index: int, name: str) -> dict:
    """Decode stride, padding, fused activation and depth multiplier of one operator."""
    table = operator.BuiltinOptions()
    if table is None:
        raise TFLiteModelError(f"{path}: operator {index} ({name}) has no builtin options.")

    if name == "FULLY_CONNECTED":
        options = tflite.FullyConnectedOptions()
        options.Init(table.Bytes, table.Pos)
        return {
            "stride": (1, 1),
            "padding": "VALID",
            "activation": _ACTIVATION_NAMES.get(options.FusedActivationFunction(), "unknown"),
            "depth_multiplier": 1,
        }

    if name == "CONV_2D":
        options = tflite.Conv2DOptions()
        options.Init(table.Bytes, table.Pos)
        depth_multiplier = 1
    else:
        options = tflite.DepthwiseConv2DOptions()
        options.Init(table.Bytes, table.Pos)
        depth_multiplier = options.DepthMultiplier()

    dilation = (options.DilationHFactor(), options.DilationWFactor())
    if dilation != (1, 1):
        raise TFLiteModelError(
            f"{path}: operator {index} ({name}) has dilation {dilation}, but the reader "
            "supports only undilated convolutions."
        )

    return {
        "stride": (options.StrideH(), options.StrideW()),
        "padding": _PADDING_NAMES.get(options.Padding(), "unknown"),
        "activation": _ACTIVATION_NAMES.get(options.FusedActivationFunction(), "unknown"),
        "depth_multiplier": depth_multiplier,
    }


def _quantization(tensor: tflite.Tensor) -> Quantization | None:
    parameters = tensor.Quantization()
    if parameters is None or parameters.ScaleLength() == 0:
        return None

    scale = parameters.ScaleAsNumpy()
    if parameters.ZeroPointLength() == 0:
        zero_point = np.zeros_like(scale, dtype=np.int64)
    else:
        zero_point = parameters.ZeroPointAsNumpy()
    return Quantization(scale=scale, zero_point=zero_point, axis=parameters.QuantizedDimension())


def _read_constant(path: Path, model: tflite.Model, data: bytes, tensor: tflite.Tensor) -> np.ndarray:
    """Return the stored values of a constant tensor, in its own dtype and shape."""
    tensor_name = tensor.Name().decode()
    type_name = _TENSOR_TYPE_NAMES.get(tensor.Type(), f"type {tensor.Type()}")
    if type_name not in _NUMPY_DTYPES:
        raise TFLiteModelError(f"{path}: tensor {tensor_name!r} has unsupported type {type_name}.")
    dtype = np.dtype(_NUMPY_DTYPES[type_name]).newbyteorder("<")

    # Files above 2 GiB store buffers after the flatbuffer and give their
    # offset and size instead of inline data.
    buffer = model.Buffers(tensor.Buffer())
    if buffer.Offset() > 1:
        raw = data[buffer.Offset() : buffer.Offset() + buffer.Size()]
    elif buffer.DataLength() > 0:
        raw = buffer.DataAsNumpy().tobytes()
    else:
        raise TFLiteModelError(
            f"{path}: tensor {tensor_name!r} has no constant data, but the reader expects "
            "weights and biases stored in the file."
        )

    shape = tuple(int(d) for d in tensor.ShapeAsNumpy())
    values = np.frombuffer(raw, dtype=dtype)
    if values.size != int(np.prod(shape)):
        raise TFLiteModelError(
            f"{path}: tensor {tensor_name!r} contains {values.size} values, but its shape is {shape}."
        )
    return values.reshape(shape).astype(dtype.newbyteorder("="))
