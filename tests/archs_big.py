"""A model big enough (~100 MB) that ``lors convert`` can be killed while writing it (test_bad_inputs)."""

from __future__ import annotations

import torch
from torch import nn

from tests.archs import StackedMLP


class BigEmbedMLP(StackedMLP):
    """A StackedMLP with a large untouched embedding table."""

    def __init__(self, rows: int = 200_000):
        super().__init__()
        self.table = nn.Embedding(
            rows, 128, _weight=torch.empty(rows, 128)
        )  # no init: the state dict fills it


def big_embed_mlp() -> BigEmbedMLP:
    return BigEmbedMLP()
