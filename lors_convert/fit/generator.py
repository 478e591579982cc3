"""LORSA fits: a stack of parameter generators -> shared generator + per-layer ``B E(q) A`` factors.

Each layer's generator is the augmented tensor ``T_i = [W_i | b_i]`` cut by the plan's layout into
``(G, R, C, dq+1)`` blocks; every block's stack goes through the truncated HOSVD of
:func:`lors_convert.decompose.tucker.decompose_generators` (greedy per group, then HOOI sweeps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..decompose.tucker import decompose_generators
from ..discover.plan import AdaptivePlan
from ..errors import LorsError
from ..finite import all_finite
from ..layers.adaptive import Layout, group_ranks
from .result import Fit


def generator_tensors(weight: torch.Tensor, bias: torch.Tensor | None, layout: Layout) -> list[torch.Tensor]:
    """Generator tensors of one layer, per layout entry ``(G, R, C, dq+1)``."""
    T = weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)  # (out, dq+1)
    return layout.split(T)


def fit_generators(
    pp: AdaptivePlan,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None,
    init: str = "svd",
    device=None,
) -> Fit:
    """Shared generator ``(out, dq+1)`` and per layer one ``(B, A, C)`` per layout entry.

    ``init="paper"`` gives no factors (``Fit.shared`` and ``factors`` None): the layers keep their
    own paper initialization.
    """
    N = len(pp.keys)
    biases = list(biases) if biases is not None else [None] * N
    for key, w, b in zip(pp.keys, weights, biases, strict=False):
        if not all_finite(w) or (b is not None and not all_finite(b)):
            raise LorsError(f"tensor {key!r} contains NaN or Inf values; refusing to convert it")
    if init == "paper":
        return Fit(shared=None, factors=None)
    layout = pp.layout
    where = device or weights[0].device
    per_layer = [
        generator_tensors(w.detach().to(where), None if b is None else b.detach().to(where), layout)
        for w, b in zip(weights, biases, strict=False)
    ]
    m = pp.matrix[1]
    shared_parts = []
    entries_per_layer: list[list] = [[] for _ in range(N)]
    res, disc, norms = [0.0] * N, [0.0] * N, [0.0] * N
    for e in range(len(layout.entries)):
        Bs, As, Cs = [[] for _ in range(N)], [[] for _ in range(N)], [[] for _ in range(N)]
        shared_g = []
        for g in range(layout.groups):
            tensors = [per_layer[i][e][g] for i in range(N)]  # N x (R, C, m)
            ks = [group_ranks(layout, pp.rank, k)[e] for k in pp.groups]  # per layer (K, r1, r2)
            f = decompose_generators(
                tensors,
                [k[1] for k in ks],
                [k[2] for k in ks],
                [k[0] for k in ks],
                sweeps=pp.extra.get("sweeps"),
            )
            shared_g.append(f.shared)
            for i, tg in enumerate(f.layers):
                Bs[i].append(tg.B)
                As[i].append(tg.A)
                Cs[i].append(tg.cores)
                res[i] += f.residual_energy[i]
                disc[i] += f.discarded_energy[i]
                norms[i] += f.tensor_norm[i] ** 2
        shared_parts.append(torch.stack(shared_g))  # (G, R, C, m)
        for i in range(N):
            entries_per_layer[i].append((torch.stack(Bs[i]), torch.stack(As[i]), torch.stack(Cs[i])))
    shared = layout.join(shared_parts).reshape(pp.matrix[0], m)  # (out, m)
    return Fit(
        shared=shared,
        factors=entries_per_layer,
        relative_error=[math.sqrt(max(disc[i], 0.0) / norms[i]) if norms[i] else 0.0 for i in range(N)],
        retained_energy=[1.0 - disc[i] / res[i] if res[i] > 0 else 1.0 for i in range(N)],
    )
