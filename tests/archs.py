"""Small importable architectures for ``--arch tests.archs:NAME`` in CLI tests."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class StackedMLP(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64, depth: int = 4):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def stacked_mlp() -> StackedMLP:
    return StackedMLP()


def no_stacks() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def stacked_mlp_wide() -> StackedMLP:
    return StackedMLP(dim=48, hidden=96, depth=6)
