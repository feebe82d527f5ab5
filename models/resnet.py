"""`resnet`: a small ResNet on 32x32 RGB images with random (seeded) weights.

A heavier twin for load tests and parity checks, not a trained classifier. Signature for both
frameworks: input `images` FP32 [-1, 32, 32, 3] (channels-last; the PyTorch model permutes
internally), output `logits` FP32 [-1, 10].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from models import porting
from models.digits import deterministic_torch

NAME = "resnet"
SIGNATURE: dict[str, Any] = {
    "name": NAME,
    "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 32, 32, 3]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
}
SEED = 0
# (channels, stride) per stage; one basic block each.
STAGES = ((16, 1), (32, 2), (64, 2))
BN_EPS = 1e-5


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (1x1 projection when shapes change)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.project = stride != 1 or in_channels != channels
        self.shortcut = nn.Sequential()
        if self.project:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv, three basic blocks, global average pool, linear head; input NHWC."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16, eps=BN_EPS)
        blocks = []
        in_channels = 16
        for channels, stride in STAGES:
            blocks.append(BasicBlock(in_channels, channels, stride))
            in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(in_channels, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The signature is channels-last in both frameworks; torch convolutions want NCHW.
        x = images.permute(0, 3, 1, 2)
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return self.head(torch.mean(x, dim=(2, 3)))


def torch_model() -> ResNet:
    """The seeded model in eval mode, with random batch-norm statistics so they matter."""
    with deterministic_torch():
        torch.manual_seed(SEED)
        net = ResNet()
        generator = torch.Generator().manual_seed(SEED)
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                with torch.no_grad():
                    module.weight.copy_(1.0 + 0.1 * torch.randn(n, generator=generator))
                    module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                    module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                    module.running_var.copy_(1.0 + 0.5 * torch.rand(n, generator=generator))
    return net.eval()


def evaluation_data() -> tuple[np.ndarray, None]:
    """Seeded random images in 0..1 (no labels: the weights are random)."""
    rng = np.random.default_rng(SEED)
    return rng.random((64, 32, 32, 3), dtype=np.float32), None


def keras_model(net: ResNet) -> Any:
    """The Keras twin of a ResNet, carrying the same weights."""
    import keras
    from keras import layers

    def conv(x: Any, torch_conv: nn.Conv2d) -> Any:
        kernel = torch_conv.kernel_size[0]
        stride = torch_conv.stride[0]
        pad = torch_conv.padding[0]
        # Keras "same" pads asymmetrically at stride 2; torch pads evenly. Pad explicitly.
        if pad:
            x = layers.ZeroPadding2D(pad)(x)
        layer = layers.Conv2D(torch_conv.out_channels, kernel, strides=stride, use_bias=False)
        out = layer(x)
        layer.set_weights(porting.conv_weights(torch_conv))
        return out

    def norm(x: Any, torch_norm: nn.BatchNorm2d) -> Any:
        layer = layers.BatchNormalization(epsilon=torch_norm.eps)
        out = layer(x)
        layer.set_weights(porting.batchnorm_weights(torch_norm))
        return out

    images = keras.Input(shape=(32, 32, 3), name="images", dtype="float32")
    x = layers.ReLU()(norm(conv(images, net.stem), net.stem_bn))
    for block in net.blocks:
        assert isinstance(block, BasicBlock)
        out = layers.ReLU()(norm(conv(x, block.conv1), block.bn1))
        out = norm(conv(out, block.conv2), block.bn2)
        shortcut = x
        if block.project:
            shortcut = norm(conv(x, block.shortcut[0]), block.shortcut[1])
        x = layers.ReLU()(layers.Add()([out, shortcut]))
    x = layers.GlobalAveragePooling2D()(x)
    head = layers.Dense(10, name="logits")
    logits = head(x)
    head.set_weights(porting.dense_weights(net.head))
    return keras.Model(images, logits, name=NAME)
