"""Shared test code: independent reference math (float64, no lors code), snapshots, and the small
converted checkpoints that the checkpoint, output and report tests start from."""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn

torch.set_num_threads(1)  # the CI box is small and shared; every model here is tiny


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict (the source tensors before an in-place conversion)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def distinct_numel(model: nn.Module) -> int:
    """Parameter elements with tied/shared tensors counted once (independent of lors.counting)."""
    seen: dict[tuple, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[(p.data_ptr(), tuple(p.shape))] = p.numel()
    return sum(seen.values())


def reference_errors(weights: list[torch.Tensor], ranks: list[int]) -> list[float]:
    """Eckart-Young: ||W_i - What_i||_F / ||W_i||_F = sqrt(sum_{j >= k_i} s_j(R_i)^2) / ||W_i||_F, float64."""
    W = torch.stack([w.detach().double().reshape(w.shape[0], -1) for w in weights])
    R = W - W.mean(dim=0)
    out = []
    for i, k in enumerate(ranks):
        s = torch.linalg.svdvals(R[i])
        out.append(math.sqrt(float((s[k:] ** 2).sum())) / float(torch.linalg.matrix_norm(W[i])))
    return out


def expected_ranks(rank: int | None, groups: list[int], shape: tuple[int, ...]) -> list[int]:
    d, h = shape[0], math.prod(shape[1:])
    if rank is None:
        return [min(d, h)] * len(groups)
    return [min(k * rank, d, h) for k in groups]


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    """The StackedMLP converted at rank 4 by the CLI (one weight file)."""
    from tests.badcase import ARCH, ok, write_weights

    d = tmp_path_factory.mktemp("ckpt")
    out = d / "mlp.lors"
    ok("convert", write_weights(d / "w.safetensors"), "--arch", ARCH, "--rank", "4", "-o", out, "-q")
    return out


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory) -> Path:
    """The StackedMLP converted at rank 4 by the CLI into shards of at most 20 KB."""
    from tests.badcase import ARCH, ok, write_weights

    d = tmp_path_factory.mktemp("sharded")
    out = d / "mlp.lors"
    src = write_weights(d / "w.safetensors")
    ok("convert", src, "--arch", ARCH, "--rank", "4", "-o", out, "-q", "--max-shard-size", "20KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out
