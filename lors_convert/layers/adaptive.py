"""Adaptive LORS (LORSA) layer: a drop-in replacement for a parameter-generator ``nn.Linear``.

A generator Linear ``q (dq) -> (out,)`` produces, per query, the entries of one or more matrices
laid out side by side in its output. The layout is ``G x [R1xC1, R2xC2, ...]``: ``G`` repetitions
(AdaMixer's sampling groups) of a block holding the listed matrices in order, each row-major
(AdaMixer: ``G x [e x e, P_out x P_in]`` = channel-mixing ``M`` then spatial-mixing ``S``)::

    out index of matrix m, repetition g, entry (a, b) = g * sum_m(R_m C_m) + sum_{m'<m} R_m' C_m' + a * C_m + b

Every generated matrix ``(g, m)`` of every layer has its own generator tensor ``T (R_m, C_m, dq+1)``
(bias as the last input column). LORSA replaces it by a shared part plus K private groups::

    M(q) = T_s(q) + sum_k B_k E_k(q) A_k,     E_k = Linear(dq -> r1*r2) reshaped (r1, r2)

The module keeps the generator's interface: same input, same output vector, so the surrounding
code (reshape, split, matmul) does not change.

Tensors (names are what a checkpoint stores, relative to the module):

- ``shared``: ``(out, dq+1)`` (``(out, dq)`` for a bias-free generator): the stack's mean generator,
  weight with the bias as its last column, the *same* Parameter in every member of the stack;
- ``lors_B.{m}``: ``(G, R_m, K*r1)``, column block k is group k's ``B_k``;
- ``lors_A.{m}``: ``(G, K*r2, C_m)``, row block k is group k's ``A_k``;
- ``lors_E.{m}.weight`` ``(G*K*r1*r2, dq)`` and ``lors_E.{m}.bias`` ``(G*K*r1*r2,)``: all ``E_k`` of
  layout entry m as one Linear, output ordered ``(g, k, j, l)``.

``r1 = min(r, R_m)``, ``r2 = min(r, C_m)``; ``rank=None`` is the exact full-rank form (K=1,
``r1 = R_m``, ``r2 = C_m``).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorsUsageError
from .base import LorsModule, meta_clone

_DIM = r"(\d+)\s*[x*]\s*(\d+)"


@dataclass(frozen=True)
class Layout:
    """How a generator's output vector is cut into matrices: ``groups x [R1xC1, R2xC2, ...]``."""

    groups: int
    entries: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, text: str | Layout) -> Layout:
        """Parse ``"4 x [64x64, 128x32]"``, ``"[256x256]"`` or ``"64x64"`` (``*`` works for ``x``)."""
        if isinstance(text, Layout):
            return text
        s = str(text).strip()
        m = re.fullmatch(r"(?:(\d+)\s*[x*]\s*)?\[(.*)\]", s)
        if m is None:
            groups, body = 1, s
        else:
            groups, body = int(m.group(1) or 1), m.group(2)
        entries = []
        for part in body.split(","):
            dm = re.fullmatch(_DIM, part.strip())
            if dm is None:
                raise LorsUsageError(
                    f"bad generator layout {text!r}: expected e.g. '4 x [64x64, 128x32]' "
                    f"(G repetitions of row-major R x C matrices), could not read {part.strip()!r}"
                )
            entries.append((int(dm.group(1)), int(dm.group(2))))
        if groups < 1 or not entries or any(r < 1 or c < 1 for r, c in entries):
            raise LorsUsageError(f"bad generator layout {text!r}: sizes must be positive")
        return cls(groups=groups, entries=tuple(entries))

    def __str__(self) -> str:
        return f"{self.groups} x [" + ", ".join(f"{r}x{c}" for r, c in self.entries) + "]"

    @property
    def per_group(self) -> int:
        return sum(r * c for r, c in self.entries)

    @property
    def out_features(self) -> int:
        return self.groups * self.per_group

    def split(self, T: torch.Tensor) -> list[torch.Tensor]:
        """``T (out, m)`` (generator weight, bias column appended) -> per entry ``(G, R, C, m)``."""
        blocks = T.reshape(self.groups, self.per_group, *T.shape[1:])  # (G, per_group, m)
        out, start = [], 0
        for r, c in self.entries:
            out.append(blocks[:, start : start + r * c].reshape(self.groups, r, c, *T.shape[1:]))
            start += r * c
        return out

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split`: per entry ``(G, R, C, *rest)`` -> ``(out, *rest)``."""
        rest = parts[0].shape[3:]
        flat = [p.reshape(self.groups, -1, *rest) for p in parts]  # (G, R*C, *rest)
        return torch.cat(flat, dim=1).reshape(self.out_features, *rest)


def group_ranks(layout: Layout, rank: int | None, groups: int) -> list[tuple[int, int, int]]:
    """Per layout entry ``(K, r1, r2)``: ``rank=None`` is full rank with one group."""
    if rank is None:
        return [(1, r, c) for r, c in layout.entries]
    return [(groups, min(rank, r), min(rank, c)) for r, c in layout.entries]


def private_param_count(layout: Layout, dq: int, rank: int | None, groups: int, has_bias: bool = True) -> int:
    """Parameters of one layer's private part: ``G * K * (R r1 + r2 C + r1 r2 (dq+1))`` per entry."""
    m = dq + (1 if has_bias else 0)
    total = 0
    for (K, r1, r2), (r, c) in zip(group_ranks(layout, rank, groups), layout.entries, strict=False):
        total += layout.groups * K * (r * r1 + r2 * c + r1 * r2 * m)
    return total


def _merge(shared: torch.Tensor, Bs, As, Es, layout: Layout, has_bias: bool) -> torch.Tensor:
    """Dense augmented generator ``(out, m)`` from shared ``(out, m)`` and per-entry factors (float32+)."""
    cdtype = torch.float64 if shared.dtype == torch.float64 else torch.float32
    G = layout.groups
    parts = []
    for (B, A, (W, b)), T_s in zip(
        zip(Bs, As, Es, strict=False), layout.split(shared.to(cdtype)), strict=False
    ):
        core = W.to(cdtype) if b is None else torch.cat([W.to(cdtype), b.to(cdtype)[:, None]], dim=1)
        KR1, KR2 = B.shape[2], A.shape[1]
        K = KR1 * KR2 * G // core.shape[0]
        r1, r2 = KR1 // K, KR2 // K
        core = core.reshape(G, K, r1, r2, -1)  # (G, K, r1, r2, m)
        Bk = B.to(cdtype).reshape(G, B.shape[1], K, r1)  # (G, R, K, r1)
        Ak = A.to(cdtype).reshape(G, K, r2, A.shape[2])  # (G, K, r2, C)
        t = torch.einsum("gklb,gkjlm->gkjbm", Ak, core)  # (G, K, r1, C, m)
        delta = torch.einsum("gakj,gkjbm->gabm", Bk, t)  # (G, R, C, m)
        parts.append(T_s + delta)
    return layout.join(parts)


class LorsaLinear(LorsModule):
    """LORSA stand-in for a generator ``nn.Linear`` (see the module docstring for the tensors)."""

    layer_kind = "generator"

    def __init__(
        self,
        dense: nn.Linear,
        shared: nn.Parameter,
        total_rank: int | None = None,
        rank: int | None = None,
        groups: int = 1,
        layout: str | Layout = "",
        has_bias: bool | None = None,
        **_: object,
    ) -> None:
        super().__init__()
        self.layout = Layout.parse(layout)
        self.in_features = dense.in_features
        self.out_features = dense.out_features
        self.has_bias = dense.bias is not None if has_bias is None else bool(has_bias)
        if self.layout.out_features != self.out_features:
            raise LorsUsageError(
                f"generator layout {self.layout} gives {self.layout.out_features} outputs, "
                f"the Linear has {self.out_features}"
            )
        self.weight_dtype = dense.weight.dtype
        self.rank = rank
        self.groups = 1 if rank is None else groups
        m = self.in_features + (1 if self.has_bias else 0)
        if tuple(shared.shape) != (self.out_features, m):
            raise ValueError(f"shared generator must be {(self.out_features, m)}, got {tuple(shared.shape)}")
        self.shared = shared  # (out, dq+1), shared by the stack
        factory = {"device": shared.device, "dtype": shared.dtype}
        G = self.layout.groups
        self.ranks = group_ranks(self.layout, rank, self.groups)  # per entry (K, r1, r2)
        self.lors_B = nn.ParameterList()
        self.lors_A = nn.ParameterList()
        self.lors_E = nn.ModuleList()
        for (K, r1, r2), (r, c) in zip(self.ranks, self.layout.entries, strict=False):
            self.lors_B.append(nn.Parameter(torch.zeros(G, r, K * r1, **factory)))  # (G, R, K*r1)
            self.lors_A.append(nn.Parameter(torch.zeros(G, K * r2, c, **factory)))  # (G, K*r2, C)
            E = nn.Linear(self.in_features, G * K * r1 * r2, bias=self.has_bias, **factory)
            with torch.no_grad():
                E.weight.zero_()
                if E.bias is not None:
                    E.bias.zero_()
            self.lors_E.append(E)
        object.__setattr__(self, "template", meta_clone(dense))  # not a submodule: holds no state

    # -- factors -------------------------------------------------------------------------------
    def set_factors(self, entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Load per layout entry ``(B (G, R, K*r1), A (G, K*r2, C), cores (G, K, r1, r2, m))``."""
        with torch.no_grad():
            for i, (B, A, core) in enumerate(entries):
                self.lors_B[i].copy_(B)
                self.lors_A[i].copy_(A)
                core = core.reshape(-1, core.shape[-1])  # (G*K*r1*r2, m)
                E = self.lors_E[i]
                E.weight.copy_(core[:, : self.in_features])
                if E.bias is not None:
                    E.bias.copy_(core[:, self.in_features])

    def reset_paper(self, generator: torch.Generator | None = None) -> None:
        """The LORSA paper's from-scratch init: Kaiming-uniform shared, B and A; zero E."""

        def kaiming_(t: torch.Tensor, fan_in: int) -> None:
            bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0  # kaiming_uniform_(a=sqrt(5)), as nn.Linear
            t.uniform_(-bound, bound, generator=generator)

        with torch.no_grad():
            kaiming_(self.shared, self.in_features)
            for B, A, E in zip(self.lors_B, self.lors_A, self.lors_E, strict=False):
                kaiming_(B, B.shape[-1])
                kaiming_(A, A.shape[-1])
                E.weight.zero_()
                if E.bias is not None:
                    E.bias.zero_()

    # -- forward / merge -----------------------------------------------------------------------
    def private_matrices(self, q: torch.Tensor) -> list[torch.Tensor]:
        """Per layout entry the private part ``sum_k B_k E_k(q) A_k``: ``(..., G, R, C)``."""
        G = self.layout.groups
        out = []
        for (K, r1, r2), (r, c), B, A, E in zip(
            self.ranks, self.layout.entries, self.lors_B, self.lors_A, self.lors_E, strict=False
        ):
            e = E(q).unflatten(-1, (G, K, r1, r2))  # (..., G, K, r1, r2)
            t = torch.einsum("...gkjl,gklc->...gkjc", e, A.view(G, K, r2, c))  # (..., G, K, r1, C)
            out.append(torch.einsum("gakj,...gkjc->...gac", B.view(G, r, K, r1), t))  # (..., G, R, C)
        return out

    def forward(self, q: torch.Tensor) -> torch.Tensor:  # (..., dq) -> (..., out)
        weight = self.shared[:, : self.in_features]  # (out, dq)
        bias = self.shared[:, self.in_features] if self.has_bias else None  # (out,)
        y = F.linear(q, weight, bias)  # (..., out)
        parts = [p.flatten(-2) for p in self.private_matrices(q)]  # (..., G, R*C) each
        delta = torch.cat(parts, dim=-1).flatten(-2)  # (..., G*per_group) = (..., out)
        return y + delta

    @property
    def weight(self) -> torch.Tensor:
        """The merged dense weight ``(out, dq)`` for code that reads ``.weight`` (materializes it)."""
        return self.merged_augmented()[:, : self.in_features].to(self.shared.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        """The merged dense bias ``(out,)`` (materializes the generator), or None."""
        return self.merged_augmented()[:, self.in_features].to(self.shared.dtype) if self.has_bias else None

    def merged_augmented(self) -> torch.Tensor:
        """The dense generator ``(out, dq+1)`` (float32), bias as the last column."""
        Es = [(E.weight, E.bias) for E in self.lors_E]
        return _merge(self.shared, list(self.lors_B), list(self.lors_A), Es, self.layout, self.has_bias)

    @classmethod
    def merge_state(cls, state: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
        """Pure merge: ``shared``, ``lors_B.{m}``, ``lors_A.{m}``, ``lors_E.{m}.weight|bias`` ->
        ``weight`` (out, dq) and ``bias`` (out,). ``meta`` needs ``layout`` (top level or in
        ``extra``) and ``dtype``; ranks and groups are read off the tensor shapes."""
        extra = meta.get("extra", {}) or {}
        layout = Layout.parse(extra.get("layout", meta.get("layout")))
        has_bias = extra.get("has_bias", meta.get("has_bias", True))
        dtype = meta.get("dtype", "float32")
        dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).replace("torch.", ""))
        n = len(layout.entries)
        Bs = [state[f"lors_B.{i}"] for i in range(n)]
        As = [state[f"lors_A.{i}"] for i in range(n)]
        Es = [(state[f"lors_E.{i}.weight"], state.get(f"lors_E.{i}.bias")) for i in range(n)]
        T = _merge(state["shared"], Bs, As, Es, layout, has_bias)  # (out, m)
        dq = Es[0][0].shape[1]
        dense = {"weight": T[:, :dq].to(dtype)}
        if has_bias:
            dense["bias"] = T[:, dq].to(dtype)
        return dense

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` (the original class) holding the merged generator."""
        dense = copy.deepcopy(self.template)
        T = self.merged_augmented()
        dense.to_empty(device=self.shared.device, recurse=True)
        rg = self.shared.requires_grad
        dense.weight = nn.Parameter(T[:, : self.in_features].to(self.weight_dtype).detach(), requires_grad=rg)
        if self.has_bias:
            dense.bias = nn.Parameter(T[:, self.in_features].to(self.weight_dtype).detach(), requires_grad=rg)
        return dense

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, layout={self.layout}, rank={self.rank}, groups={self.groups}, "
            f"shared={tuple(self.shared.shape)}"
        )


__all__ = ["Layout", "LorsaLinear", "group_ranks", "private_param_count"]
