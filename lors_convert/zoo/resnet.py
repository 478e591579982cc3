"""A torchvision-style ResNet/ResNeXt with Bottleneck blocks (no torchvision dependency).

Module names and state-dict keys follow ``torchvision.models.resnet`` (``conv1``, ``bn1``,
``layer1.0.conv1.weight``, ``layer1.0.downsample.0.weight``, ``fc.weight``...), so
``resnet50().state_dict()`` has exactly torchvision ``resnet50``'s keys and shapes. Block 0 of each
stage carries the ``downsample`` branch, which is why stack discovery finds blocks ``1..n-1``.

``width`` scales the stem and every stage (64 in torchvision); ``groups``/``width_per_group`` give
ResNeXt (grouped 3x3 convs), e.g. ``resnet(groups=32, width_per_group=4)`` is ResNeXt-50 32x4d.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride, groups), 1x1 expand; BN after each; identity or downsample shortcut."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, inplanes, H, W) -> (N, 4*planes, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        width: int = 64,
        num_classes: int = 1000,
        groups: int = 1,
        width_per_group: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, n in enumerate(layers):
            stage = self._make_layer(width * 2**i, n, stride=1 if i == 0 else 2)
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 2 ** (len(layers) - 1) * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [
            Bottleneck(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
            for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, num_classes)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            stage = getattr(self, f"layer{i}", None)
            if stage is not None:
                x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(
    layers: Sequence[int] = (2, 3, 4, 2),
    width: int = 64,
    num_classes: int = 1000,
    groups: int = 1,
    width_per_group: int = 64,
    in_channels: int = 3,
) -> ResNet:
    """A Bottleneck ResNet with ``layers[i]`` blocks in stage ``i`` (1 to 4 stages)."""
    if not 1 <= len(layers) <= 4 or any(n < 1 for n in layers):
        raise ValueError(f"layers must be 1 to 4 positive block counts, got {tuple(layers)}")
    return ResNet(layers, width, num_classes, groups, width_per_group, in_channels)


def resnet50(num_classes: int = 1000) -> ResNet:
    """torchvision's ``resnet50`` architecture (same keys and shapes), randomly initialized."""
    return resnet((3, 4, 6, 3), num_classes=num_classes)


def resnext50_32x4d(num_classes: int = 1000) -> ResNet:
    """torchvision's ``resnext50_32x4d`` architecture, randomly initialized."""
    return resnet((3, 4, 6, 3), num_classes=num_classes, groups=32, width_per_group=4)


__all__ = ["Bottleneck", "ResNet", "resnet", "resnet50", "resnext50_32x4d"]
