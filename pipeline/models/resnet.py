"""ResNet-18/34 (BasicBlock) and ResNet-50 (Bottleneck), written out so no torchvision import is needed.

Module layout and parameter names follow torchvision (`conv1`, `bn1`, `layer1..4`, `fc`; blocks hold
`conv1/bn1/conv2/bn2(/conv3/bn3)` and `downsample.0/1`), so a torchvision state_dict loads with
strict=True when stem="imagenet", 3 input channels and num_classes=1000. ResNet-50 is v1.5: the stride
sits on the 3x3 conv, as in torchvision.

The stem adapts to the data: "imagenet" is the 7x7 stride-2 conv + max-pool that shrinks 224 px by 4;
"small" is a 3x3 stride-1 conv with no pool, because shrinking 28-32 px images by 4 before layer1 throws
most of the picture away; "auto" picks small when min(H, W) <= 64.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.layers import make_activation

STEMS = ("auto", "imagenet", "small")
_SMALL_STEM_MAX_SIDE_PX = 64


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None, act: str) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act = make_activation(act)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand by 4, and a shortcut (ResNet-50)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None, act: str) -> None:
        super().__init__()
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act = make_activation(act)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + shortcut)


class ResNet(nn.Module):
    """Subclasses fix `block` and `stage_depths`; the constructor arguments are the user's model.args."""

    # what `model.activation_checkpointing: true` recomputes: every residual block of every stage
    CHECKPOINT_BLOCKS = ("layer*.*",)

    block: type[BasicBlock | Bottleneck]
    stage_depths: tuple[int, int, int, int]

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        stem: str = "auto",
        width: int = 64,
        activation: str = "relu",
        dropout: float = 0.0,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ResNet needs image input (C, H, W), got input_shape {input_shape}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got '{stem}'")
        in_channels, height, width_px = input_shape
        if stem == "auto":
            stem = "small" if min(height, width_px) <= _SMALL_STEM_MAX_SIDE_PX else "imagenet"
        self.stem = stem

        # Attribute order matches torchvision so state_dict keys come out in the same order too.
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = make_activation(activation)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        expansion, depths = self.block.expansion, self.stage_depths
        self.layer1 = self._make_stage(width, width, depths[0], 1, activation)
        self.layer2 = self._make_stage(width * expansion, width * 2, depths[1], 2, activation)
        self.layer3 = self._make_stage(width * 2 * expansion, width * 4, depths[2], 2, activation)
        self.layer4 = self._make_stage(width * 4 * expansion, width * 8, depths[3], 2, activation)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width * 8 * self.block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_stage(self, c_in: int, planes: int, depth: int, stride: int, act: str) -> nn.Sequential:
        c_out = planes * self.block.expansion
        downsample = None
        if stride != 1 or c_in != c_out:
            downsample = nn.Sequential(_conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))
        blocks = [self.block(c_in, planes, stride, downsample, act)]
        blocks += [self.block(c_out, planes, 1, None, act) for _ in range(depth - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # torchvision's init; fc keeps PyTorch's default Linear init, as torchvision does.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as the identity, which makes early training of deep nets
            # steadier (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
            for m in self.modules():
                if isinstance(m, BasicBlock | Bottleneck):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


class ResNet18(ResNet):
    block = BasicBlock
    stage_depths = (2, 2, 2, 2)


class ResNet34(ResNet):
    block = BasicBlock
    stage_depths = (3, 4, 6, 3)


class ResNet50(ResNet):
    block = Bottleneck
    stage_depths = (3, 4, 6, 3)
