"""MobileNetV2 (width 1.0, ImageNet-1k) as a trainable float32 PyTorch module.

The weights come from the quantized TensorFlow Lite model
``mobilenet_v2_1.0_224_quant.tflite``. Its batch normalization is folded into
the convolutions, so every layer is a convolution with a bias, optionally
followed by ReLU6. The module reproduces that graph in float32:

* TensorFlow ``SAME`` padding. A stride-2 convolution on an even-sized input
  pads one pixel more at the bottom and right than at the top and left, which
  symmetric PyTorch ``padding=1`` gets wrong.
* ReLU6 after the stem, every expansion and depthwise convolution and the final
  1x1 convolution. The projection convolutions and the classifier are linear.
* A residual ``ADD`` in every inverted residual block with stride 1 and equal
  input and output channels.

Block indexing, used by ``forward_features(x, start, end)``:

* block 0: stem, 3x3 stride-2 convolution, 3 -> 32 channels (224 -> 112 pixels).
* blocks 1..17: inverted residual blocks (TFLite names ``expanded_conv`` and
  ``expanded_conv_1`` .. ``expanded_conv_16``).
* block 18: final 1x1 convolution, 320 -> 1280 channels.

Global average pooling of block 18's output gives the 1280-d feature, and
``classifier`` maps it to 1001 ImageNet logits (index 0 is ``background``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from s2m.models.tflite_weights import TFLiteLayer, read_tflite_layers

logger = logging.getLogger(__name__)

INPUT_SIZE = 224
# Input quantization of the TFLite model: real = INPUT_SCALE * (q - INPUT_ZERO_POINT).
INPUT_SCALE = 0.0078125
INPUT_ZERO_POINT = 128
NUM_CLASSES = 1001
FEATURE_DIM = 1280

# (expansion factor t, output channels c, repeats n, first stride s) of each
# stage of MobileNetV2 1.0. load_mobilenet_v2_tflite checks the resulting layer
# shapes, strides and residuals against the TFLite graph.
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32

# The stem, every inverted residual block and the final 1x1 convolution.
N_BLOCKS = 1 + sum(repeats for _, _, repeats, _ in INVERTED_RESIDUAL_SETTINGS) + 1


def tf_same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """Compute TensorFlow ``SAME`` padding of one spatial dimension.

    The output size is ``ceil(size / stride)``. When the total padding is odd,
    the extra pixel goes after the input (bottom or right).

    Returns:
        ``(before, after)`` padding in pixels.
    """
    output_size = math.ceil(size / stride)
    total = max((output_size - 1) * stride + kernel_size - size, 0)
    before = total // 2
    return before, total - before


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``SAME`` padding computed from the input size.

    Input ``(B, C_in, H, W)``, output ``(B, C_out, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = tf_same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = tf_same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])

        if top == bottom and left == right:
            padding = (top, left)
        else:
            x = F.pad(x, (left, right, top, bottom))
            padding = (0, 0)

        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class ConvLayer(nn.Module):
    """One TFLite convolution operator: ``Conv2dSame`` then ReLU6 or nothing.

    ``depthwise`` marks a depthwise convolution (``groups == channels``), and
    ``relu6`` records whether the TFLite graph fuses ReLU6 into it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        depthwise: bool = False,
        relu6: bool = True,
    ) -> None:
        super().__init__()
        groups = in_channels if depthwise else 1
        self.conv = Conv2dSame(in_channels, out_channels, kernel_size, stride=stride, groups=groups)
        self.activation = nn.ReLU6() if relu6 else nn.Identity()
        self.depthwise = depthwise
        self.relu6 = relu6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x))


class InvertedResidual(nn.Module):
    """Inverted residual block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection.

    The expansion is absent when ``expand_ratio == 1``. The block adds its
    input to the output when ``stride == 1`` and the channel counts match.
    Input ``(B, in_channels, H, W)``, output ``(B, out_channels, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden_channels = in_channels * expand_ratio

        self.expand = None
        if expand_ratio != 1:
            self.expand = ConvLayer(in_channels, hidden_channels, 1)
        self.depthwise = ConvLayer(hidden_channels, hidden_channels, 3, stride=stride, depthwise=True)
        self.project = ConvLayer(hidden_channels, out_channels, 1, relu6=False)
        self.use_residual = stride == 1 and in_channels == out_channels

    def conv_layers(self) -> list[ConvLayer]:
        """Return the convolutions in TFLite graph order."""
        layers = [self.expand] if self.expand is not None else []
        return layers + [self.depthwise, self.project]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.conv_layers():
            out = layer(out)

        if self.use_residual:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    """MobileNetV2 1.0 with TF-SAME padding, 19 feature blocks and a 1001-way classifier.

    See the module docstring for the block indexing. All parameters are
    trainable. Freeze early blocks by setting ``requires_grad = False`` on
    ``blocks[:k].parameters()``, cache ``forward_features(x, 0, k)`` and train
    the rest with ``pooled_features(cached, start=k)`` or ``forward(cached, start=k)``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        blocks: list[nn.Module] = [ConvLayer(3, STEM_CHANNELS, 3, stride=2)]
        in_channels = STEM_CHANNELS
        for expand_ratio, out_channels, repeats, first_stride in INVERTED_RESIDUAL_SETTINGS:
            for repeat in range(repeats):
                stride = first_stride if repeat == 0 else 1
                blocks.append(InvertedResidual(in_channels, out_channels, stride, expand_ratio))
                in_channels = out_channels
        blocks.append(ConvLayer(in_channels, FEATURE_DIM, 1))

        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(FEATURE_DIM, num_classes)
        self.n_blocks = len(self.blocks)
        self.feature_dim = FEATURE_DIM
        self.block_out_channels = tuple(_block_out_channels(block) for block in self.blocks)

    def conv_layers(self) -> list[ConvLayer]:
        """Return the 52 convolutions in TFLite graph order (the classifier excluded)."""
        layers = []
        for block in self.blocks:
            if isinstance(block, InvertedResidual):
                layers.extend(block.conv_layers())
            else:
                layers.append(block)
        return layers

    def forward_features(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run blocks ``start .. end - 1`` on a feature map.

        Args:
            x: ``(B, 3, H, W)`` preprocessed images when ``start == 0``, otherwise
                the output of block ``start - 1``, ``(B, block_out_channels[start - 1], h, w)``.
            start: first block to run, in ``[0, n_blocks]``.
            end: one past the last block to run, in ``[start, n_blocks]``;
                ``None`` runs to the end.

        Returns:
            Output of block ``end - 1``, ``(B, block_out_channels[end - 1], h', w')``,
            or ``x`` itself when ``start == end``. For 224x224 images block 18
            gives ``(B, 1280, 7, 7)``.
        """
        if end is None:
            end = self.n_blocks
        if not 0 <= start <= end <= self.n_blocks:
            raise ValueError(
                f"invalid block range start={start}, end={end}. "
                f"Expected 0 <= start <= end <= {self.n_blocks}."
            )

        for block in self.blocks[start:end]:
            x = block(x)
        return x

    def pooled_features(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Compute the global-average-pooled 1280-d features.

        Args:
            x: input of block ``start``, as in ``forward_features``.

        Returns:
            ``(B, 1280)`` features, the TFLite tensor ``MobilenetV2/Logits/AvgPool``.
        """
        return self.forward_features(x, start).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Compute ``(B, 1001)`` ImageNet logits (before softmax) from the input of block ``start``."""
        return self.classifier(self.pooled_features(x, start))


def _block_out_channels(block: nn.Module) -> int:
    if isinstance(block, InvertedResidual):
        return block.project.conv.out_channels
    return block.conv.out_channels


def load_mobilenet_v2_tflite(path: str | Path) -> MobileNetV2:
    """Build a ``MobileNetV2`` and copy into it the dequantized weights of a TFLite file.

    Args:
        path: ``mobilenet_v2_1.0_224_quant.tflite`` or another MobileNetV2 1.0
            TFLite graph with the same layers.

    Returns:
        The float32 module with trainable parameters.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a TFLite flatbuffer, or its layers do not
            match MobileNetV2 1.0 in count, operator type, stride, padding,
            fused activation, residual connections, shape, or input quantization.
    """
    path = Path(path)
    layers = read_tflite_layers(path)
    model = MobileNetV2()
    conv_layers = model.conv_layers()

    expected_count = len(conv_layers) + 1
    if len(layers) != expected_count:
        raise ValueError(
            f"{path} has {len(layers)} convolution and fully-connected layers, but "
            f"MobileNetV2 1.0 has {expected_count}. Use mobilenet_v2_1.0_224_quant.tflite."
        )
    _check_input_quantization(path, layers[0])

    for layer, target in zip(layers[:-1], conv_layers):
        _copy_conv_layer(path, layer, target)
    _copy_classifier(path, layers[-1], model.classifier)
    _check_residuals(path, layers, model)

    logger.info("loaded MobileNetV2 weights from %s", path)
    return model


def _check_input_quantization(path: Path, first_layer: TFLiteLayer) -> None:
    quantization = first_layer.input_quantization
    if quantization is None:
        raise ValueError(f"{path}: the input tensor is not quantized, but a uint8 input is expected.")

    scale = float(quantization.scale[0])
    zero_point = int(quantization.zero_point[0])
    if not (math.isclose(scale, INPUT_SCALE) and zero_point == INPUT_ZERO_POINT):
        raise ValueError(
            f"{path}: input quantization is scale {scale}, zero point {zero_point}, but "
            f"preprocess() assumes scale {INPUT_SCALE}, zero point {INPUT_ZERO_POINT}."
        )


def _copy_conv_layer(path: Path, layer: TFLiteLayer, target: ConvLayer) -> None:
    """Check one TFLite convolution against ``target`` and copy its weights.

    Layouts: ``CONV_2D`` weights ``(O, H, W, I)`` become ``(O, I, H, W)``,
    and ``DEPTHWISE_CONV_2D`` weights ``(1, H, W, C)`` become ``(C, 1, H, W)``.
    """
    where = f"{path}, operator {layer.operator_index} ({layer.weight_name})"
    expected_operator = "DEPTHWISE_CONV_2D" if target.depthwise else "CONV_2D"
    expected_activation = "RELU6" if target.relu6 else "NONE"
    kernel_size = target.conv.kernel_size

    if layer.operator != expected_operator:
        raise ValueError(f"{where}: found {layer.operator}, expected {expected_operator}.")
    if layer.stride != target.conv.stride:
        raise ValueError(f"{where}: stride {layer.stride}, expected {target.conv.stride}.")
    if layer.activation != expected_activation:
        raise ValueError(f"{where}: fused activation {layer.activation}, expected {expected_activation}.")
    # VALID equals SAME for a 1x1 stride-1 convolution, so only larger kernels must be SAME.
    if layer.padding != "SAME" and kernel_size != (1, 1):
        raise ValueError(f"{where}: padding {layer.padding}, expected SAME.")
    if layer.depth_multiplier != 1:
        raise ValueError(f"{where}: depth multiplier {layer.depth_multiplier}, expected 1.")

    if target.depthwise:
        weight = layer.weight.transpose(3, 0, 1, 2)
    else:
        weight = layer.weight.transpose(0, 3, 1, 2)
    _copy_parameter(where, "weight", weight, target.conv.weight)
    _copy_parameter(where, "bias", layer.bias, target.conv.bias)


def _copy_classifier(path: Path, layer: TFLiteLayer, classifier: nn.Linear) -> None:
    """Copy the logits layer, a 1x1 ``CONV_2D`` ``(O, 1, 1, I)`` or a ``FULLY_CONNECTED`` ``(O, I)``."""
    where = f"{path}, operator {layer.operator_index} ({layer.weight_name})"
    if layer.activation != "NONE":
        raise ValueError(
            f"{where}: the logits layer has fused activation {layer.activation}, expected NONE."
        )

    weight = layer.weight
    if layer.operator == "CONV_2D":
        if weight.shape[1:3] != (1, 1):
            raise ValueError(
                f"{where}: the logits convolution has kernel {weight.shape[1:3]}, expected (1, 1)."
            )
        weight = weight.reshape(weight.shape[0], weight.shape[3])
    elif layer.operator != "FULLY_CONNECTED":
        raise ValueError(
            f"{where}: the logits layer is {layer.operator}, expected CONV_2D or FULLY_CONNECTED."
        )

    _copy_parameter(where, "weight", weight, classifier.weight)
    _copy_parameter(where, "bias", layer.bias, classifier.bias)


def _copy_parameter(where: str, kind: str, values: np.ndarray | None, parameter: nn.Parameter) -> None:
    if values is None:
        raise ValueError(f"{where}: the layer has no {kind}, expected shape {tuple(parameter.shape)}.")
    if values.shape != tuple(parameter.shape):
        raise ValueError(
            f"{where}: {kind} shape {values.shape} does not match the module's {tuple(parameter.shape)}."
        )

    with torch.no_grad():
        parameter.copy_(torch.from_numpy(np.ascontiguousarray(values)))


def _check_residuals(path: Path, layers: list[TFLiteLayer], model: MobileNetV2) -> None:
    """Check that the TFLite ``ADD`` operators sit exactly where the module adds residuals."""
    conv_layers = model.conv_layers()
    found = [layer.weight_name for layer in layers[:-1] if layer.residual_add]
    expected = [
        layers[conv_layers.index(block.project)].weight_name
        for block in model.blocks
        if isinstance(block, InvertedResidual) and block.use_residual
    ]
    if found != expected:
        raise ValueError(
            f"{path}: residual ADD operators follow {found}, but MobileNetV2 1.0 adds "
            f"residuals after {expected}."
        )


def resize_image(image: Image.Image | np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Convert one image to RGB and resize it bilinearly to ``size x size``.

    Args:
        image: PIL image of any mode, or a uint8 array ``(H, W)``, ``(H, W, 1)``,
            ``(H, W, 3)`` or ``(H, W, 4)``. Greyscale is replicated to three
            channels, and the alpha channel of RGBA is dropped (no compositing).

    Returns:
        uint8 array ``(size, size, 3)``, the pixels the TFLite model takes as input.
    """
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}.")

    resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image array, got dtype {array.dtype}. Convert it with astype(np.uint8)."
        )

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(
            f"expected an image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}."
        )

    # Pillow picks mode L, RGB or RGBA from the shape of a uint8 array.
    return Image.fromarray(np.ascontiguousarray(array))


def preprocess(images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """Turn images into the float input of ``MobileNetV2``.

    Each image goes through ``resize_image`` (RGB, bilinear resize to 224x224)
    and every uint8 pixel ``q`` becomes ``0.0078125 * (q - 128)``, in
    ``[-1, 0.9921875]``. That is the real value the TFLite model assigns to its
    quantized input, so both models see the same numbers.

    Args:
        images: one PIL image, one uint8 array ``(H, W[, C])``, a uint8 batch
            ``(B, H, W, C)``, or a sequence of PIL images and arrays.

    Returns:
        float32 tensor ``(B, 3, 224, 224)``.
    """
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess() got no images. Pass at least one.")

    pixels = np.stack([resize_image(image) for image in images])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().contiguous()
    return INPUT_SCALE * (batch - INPUT_ZERO_POINT)


class TorchvisionMobileNetV2(nn.Module):
    """torchvision's ImageNet MobileNetV2 behind the ``MobileNetV2`` interface.

    It takes the output of ``preprocess`` and converts it to torchvision's
    normalization (ImageNet mean and standard deviation of [0, 1] pixels).
    Blocks are ``features[0..18]`` with the same indexing as ``MobileNetV2``,
    but the classifier has 1000 classes without ``background``, and the
    convolutions use symmetric padding.
    """

    _MEAN = (0.485, 0.456, 0.406)
    _STD = (0.229, 0.224, 0.225)

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.blocks = network.features
        self.classifier = network.classifier
        self.n_blocks = len(self.blocks)
        self.feature_dim = FEATURE_DIM
        self.register_buffer("mean", torch.tensor(self._MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self._STD).view(1, 3, 1, 1))

    def forward_features(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run blocks ``start .. end - 1``, as ``MobileNetV2.forward_features`` does."""
        if end is None:
            end = self.n_blocks
        if not 0 <= start <= end <= self.n_blocks:
            raise ValueError(
                f"invalid block range start={start}, end={end}. "
                f"Expected 0 <= start <= end <= {self.n_blocks}."
            )

        if start == 0:
            unit_pixels = (x / INPUT_SCALE + INPUT_ZERO_POINT) / 255.0
            x = (unit_pixels - self.mean) / self.std
        for block in self.blocks[start:end]:
            x = block(x)
        return x

    def pooled_features(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Compute ``(B, 1280)`` global-average-pooled features from the input of block ``start``."""
        return self.forward_features(x, start).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Compute ``(B, 1000)`` ImageNet logits from the input of block ``start``."""
        return self.classifier(self.pooled_features(x, start))


def load_torchvision_mobilenet_v2() -> TorchvisionMobileNetV2:
    """Load torchvision's ``mobilenet_v2(weights="IMAGENET1K_V1")``, downloading the weights if needed.

    Raises:
        RuntimeError: torchvision cannot be imported or the weights cannot be
            downloaded. The TFLite backbone (config ``caltech101.backbone.kind: tflite``) needs neither.
    """
    # NOTE: untested, because torchvision does not import beside the pinned
    # torch here and there is no network access to fetch its weights.
    try:
        import torchvision
    except (ImportError, RuntimeError) as error:
        raise RuntimeError(
            f"torchvision is not available ({error}). Install a torchvision matching "
            f"torch {torch.__version__}, or use the TFLite backbone (config `caltech101.backbone.kind: tflite`)."
        ) from error

    try:
        network = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    except (OSError, RuntimeError) as error:
        raise RuntimeError(
            f"failed to load the torchvision MobileNetV2 ImageNet weights ({error}). "
            "Check the network connection or the torch hub cache, or use the TFLite "
            "backbone (config `caltech101.backbone.kind: tflite`)."
        ) from error

    return TorchvisionMobileNetV2(network)
