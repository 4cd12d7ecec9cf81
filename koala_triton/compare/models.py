"""The comparison's models, built from code with random weights (nothing is downloaded).

- ``digits_cnn``: a small CNN for 8x8 grey images ([B, 1, 8, 8] -> logits [B, 10]).
- ``CharTransformer``: a tiny causal character-level transformer ([B, T] ids -> logits
  [B, T, V]).
- ``resnet18_cifar``: ResNet-18 with the CIFAR stem of the KOALA authors' training code
  (a 3x3 stride-1 first convolution, no max-pool), [B, 3, 32, 32] -> logits [B, C]; the layer
  structure and initialisation of torchvision's ``resnet18`` (torchvision is not needed).
"""

from __future__ import annotations

import torch
from torch import nn


def digits_cnn(num_classes: int = 10) -> nn.Sequential:
    """Two 3x3 convolutions (16, 32 channels), a 2x2 max-pool, a 64-unit hidden layer:
    38,282 parameters for 10 classes. Input [B, 1, 8, 8] (pixel values scaled to [0, 1])."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )


class CharTransformer(nn.Module):
    """A pre-norm causal transformer over characters.

    Args:
        vocab: number of character ids V.
        context: longest input T (learned position embeddings of that length).
        width: model width d; ``heads`` attention heads of width d / heads; feed-forward 4d.
        layers: number of transformer blocks.

    ``forward(ids [B, T] int64) -> logits [B, T, V]``: position t sees ids 0..t only.
    """

    def __init__(self, vocab: int, context: int = 64, width: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        nn.init.normal_(self.position, std=0.02)
        block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"input of length {t} exceeds the context of {self.context}")
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        h = self.embed(ids) + self.position[:t]
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (torchvision's
    ``BasicBlock``); a 1x1 convolution matches the shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32x32 images: [B, 3, 32, 32] -> logits [B, num_classes].

    11,173,962 parameters for 10 classes and 11,220,132 for 100, in the same tensors (names,
    shapes, order) as torchvision's ``resnet18`` with ``conv1`` replaced by a 3x3 stride-1
    convolution and ``maxpool`` by the identity, as in the authors' ``resnet18_cifar``.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        widths, cin = (64, 128, 256, 512), 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(_BasicBlock(cin, width, stride), _BasicBlock(width, width, 1)))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar(num_classes: int) -> ResNet18Cifar:
    """See ``ResNet18Cifar``."""
    return ResNet18Cifar(num_classes)
