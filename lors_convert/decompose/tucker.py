"""Adaptive LORS math (LORSA): truncated HOSVD / HOOI of residual generator tensors. Pure functions.

A parameter generator ``q (dq) -> vec(M) (d*h)`` for one generated matrix ``M`` (d x h) is a 3-way
tensor ``T`` of shape ``(d, h, m)``, ``m = dq + 1`` (the Linear's bias is the last input column,
so ``M(q)[a, b] = sum_c T[a, b, c] [q, 1]_c``). Across a stack of N generators::

    T_s = mean_i T_i,   D_i = T_i - T_s                                    # (d, h, m)
    D_i ~ sum_k  C_ik x1 B_ik x2 A_ik^T                                     # K groups
    B_ik (d, r1) orthonormal columns, A_ik (r2, h) orthonormal rows, C_ik (r1, r2, m)

The core ``C_ik`` is the weight and bias of ``E_ik = Linear(dq -> r1*r2)`` so the private part of
the generated matrix is ``B_ik E_ik(q) A_ik``. Initialization is the truncated HOSVD: ``B`` spans the
top ``r1`` left singular vectors of the mode-1 unfolding ``(d, h*m)``, ``A^T`` the top ``r2`` of
the mode-2 unfolding ``(h, d*m)``, the core is the projection ``D x1 B^T x2 A``. For K groups the
DESIGN's consecutive component blocks are available (``init="blocks"``), but the default for K > 1
is greedy deflation (group k = HOSVD of what groups < k leave), see :func:`hosvd` for why. Block-HOOI
sweeps then refit each group to the residual the other groups leave (for K=1 this is plain HOOI);
every step is a least-squares update of one factor, so the error never increases.

Merge is exact and linear: ``G_i[a, b, :] = T_s[a, b, :] + sum_k sum_{j,l} B_ik[a, j] A_ik[l, b] C_ik[j, l, :]``.
All arithmetic is float32 (float64 when given float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TuckerGroups:
    """Block-term factors of one residual tensor ``D (d, h, m)``: K groups of ranks (r1, r2)."""

    B: torch.Tensor  # (d, K*r1); columns k*r1:(k+1)*r1 are group k
    A: torch.Tensor  # (K*r2, h); rows k*r2:(k+1)*r2 are group k
    cores: torch.Tensor  # (K, r1, r2, m)

    @property
    def groups(self) -> int:
        return self.cores.shape[0]

    def block(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r1, r2 = self.cores.shape[1:3]
        return self.B[:, k * r1 : (k + 1) * r1], self.A[k * r2 : (k + 1) * r2], self.cores[k]


def unfold(T: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding of a 3-way tensor ``(d, h, m)``: ``(d, h*m)``, ``(h, d*m)`` or ``(m, d*h)``."""
    return T.movedim(mode, 0).reshape(T.shape[mode], -1)


def leading_left_vectors(M: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` left singular vectors of ``M (n, p)`` as ``(n, k)``; zero columns past ``rank <= n``.

    Wide unfoldings (``p > 2n``, e.g. ``(128, 64*257)``) go through the float64 Gram matrix
    ``M M^T (n, n)`` and its eigenvectors: same subspace, several times faster than the SVD.
    """
    n, p = M.shape
    if p > 2 * n:
        gram = M.double() @ M.double().T  # (n, n)
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        U = evecs.flip(-1)[:, :k].to(M.dtype)
        rank = int((evals > evals.max().clamp_min(0) * n * torch.finfo(torch.float64).eps).sum())
        U = U[:, : min(k, rank)] if rank < k else U
    else:
        U = torch.linalg.svd(M, full_matrices=False)[0][:, :k]  # (n, min(n, p, k))
    if U.shape[1] < k:  # fewer components than asked for: pad with zeros (contributes nothing)
        U = torch.cat([U, U.new_zeros(n, k - U.shape[1])], dim=1)
    return U


def project_core(D: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``D x1 B^T x2 A``: ``D (d, h, m)``, ``B (d, r1)``, ``A (r2, h)`` -> core ``(r1, r2, m)``."""
    t = torch.einsum("ahm,aj->jhm", D, B)  # (r1, h, m): contract the big mode first
    return torch.einsum("jhm,lh->jlm", t, A)  # (r1, r2, m)


def tucker_to_tensor(B: torch.Tensor, A: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """``core x1 B x2 A^T``: ``B (d, r1)``, ``A (r2, h)``, ``core (r1, r2, m)`` -> ``(d, h, m)``."""
    t = torch.einsum("lb,jlm->jbm", A, core)  # (r1, h, m); never the (d, r1, r2, h) outer product
    return torch.einsum("aj,jbm->abm", B, t)  # (d, h, m)


def groups_to_tensor(f: TuckerGroups) -> torch.Tensor:
    """Sum of the K group terms, ``(d, h, m)``."""
    return sum(tucker_to_tensor(*f.block(k)) for k in range(f.groups))


DEFAULT_BLOCK_SWEEPS = 30  # block-HOOI sweeps used when K > 1 and none are asked for (see hosvd)
GREEDY_GROUP_SWEEPS = 3  # HOOI sweeps per group of the greedy init


def hosvd(
    D: torch.Tensor,
    r1: int,
    r2: int,
    groups: int = 1,
    sweeps: int | None = 0,
    tol: float = 1e-9,
    init: str = "auto",
) -> TuckerGroups:
    """Truncated HOSVD of ``D (d, h, m)`` in ``groups`` groups of ranks ``(r1, r2)``, then block-HOOI.

    ``r1`` (<= d) and ``r2`` (<= h) are the per-group mode ranks; components beyond the tensor's
    multilinear rank come out as zero columns.

    ``init="blocks"``: the groups are consecutive blocks of the rank-``(K r1, K r2)`` HOSVD
    components, cores projected (DESIGN section 4). ``init="greedy"``: group k is the truncated
    HOSVD (plus a few HOOI sweeps) of what groups ``< k`` leave. ``"auto"``: greedy for ``K > 1``
    (the same thing for ``K = 1``). Consecutive blocks keep only the diagonal blocks of the
    ``(K r1, K r2, m)`` core, so on a tensor that *is* a sum of K rank-(r, r) terms they leave far
    more error than greedy deflation, and block-HOOI reaches the noise floor from greedy (it can
    stall in a worse point from blocks; ``tests/test_lorsa.py``'s structured generators,
    docs/calibration.md).

    ``sweeps`` block-HOOI sweeps refine the result, stopping early once a sweep lowers the squared
    error by less than ``tol * ||D||^2``; ``None``: none for one group, :data:`DEFAULT_BLOCK_SWEEPS`
    for ``K > 1``.
    """
    d, h, m = D.shape
    K = groups
    if sweeps is None:
        sweeps = 0 if K == 1 else DEFAULT_BLOCK_SWEEPS
    if init == "auto":
        init = "blocks" if K == 1 else "greedy"
    if init == "greedy" and K > 1:
        Bs, As, Cs = [], [], []
        R = D
        for _ in range(K):
            g = hosvd(R, r1, r2, 1, sweeps=GREEDY_GROUP_SWEEPS, tol=tol, init="blocks")
            Bs.append(g.B)
            As.append(g.A)
            Cs.append(g.cores[0])
            R = R - groups_to_tensor(g)  # (d, h, m): left for the next group
        f = TuckerGroups(B=torch.cat(Bs, 1), A=torch.cat(As, 0), cores=torch.stack(Cs))
    elif init in ("blocks", "greedy"):
        B = leading_left_vectors(unfold(D, 0), K * r1)  # (d, K*r1)
        A = leading_left_vectors(unfold(D, 1), K * r2).T  # (K*r2, h)
        cores = torch.stack(
            [project_core(D, B[:, k * r1 : (k + 1) * r1], A[k * r2 : (k + 1) * r2]) for k in range(K)]
        )  # (K, r1, r2, m)
        f = TuckerGroups(B=B.contiguous(), A=A.contiguous(), cores=cores)
    else:
        raise ValueError(f"init must be auto, blocks or greedy, got {init!r}")
    if sweeps:
        scale = float((D * D).sum())
        prev = float(((D - groups_to_tensor(f)) ** 2).sum())
        for _ in range(sweeps):
            f, err = hooi_sweep(D, f)
            if prev - err <= tol * scale:
                break
            prev = err
    return f


def hooi_sweep(D: torch.Tensor, f: TuckerGroups) -> tuple[TuckerGroups, float]:
    """One block-HOOI sweep: each group in turn is refit to ``D`` minus the other groups' terms.
    Returns the new factors and the squared error ``||D - sum_k terms||_F^2``.

    For group k with residual ``R_k``: ``B_k`` = top-r1 left vectors of ``unfold1(R_k x2 A_k)``,
    ``A_k^T`` = top-r2 left vectors of ``unfold2(R_k x1 B_k^T)``, core = projection. Monotone.
    """
    K, r1, r2, _ = f.cores.shape
    B, A, cores = f.B.clone(), f.A.clone(), f.cores.clone()
    terms = [
        tucker_to_tensor(B[:, k * r1 : (k + 1) * r1], A[k * r2 : (k + 1) * r2], cores[k]) for k in range(K)
    ]
    total = sum(terms)
    for k in range(K):
        R = D - (total - terms[k])  # (d, h, m): what group k should explain
        A_k = A[k * r2 : (k + 1) * r2]  # (r2, h)
        B_k = leading_left_vectors(unfold(torch.einsum("ahm,lh->alm", R, A_k), 0), r1)  # (d, r1)
        A_k = leading_left_vectors(unfold(torch.einsum("ahm,aj->jhm", R, B_k), 1), r2).T  # (r2, h)
        core = project_core(R, B_k, A_k)  # (r1, r2, m)
        B[:, k * r1 : (k + 1) * r1], A[k * r2 : (k + 1) * r2], cores[k] = B_k, A_k, core
        new_term = tucker_to_tensor(B_k, A_k, core)
        total = total - terms[k] + new_term
        terms[k] = new_term
    return TuckerGroups(B=B, A=A, cores=cores), float(((D - total) ** 2).sum())


@dataclass
class GeneratorFactors:
    """LORSA factors of one stacked generator tensor: shared mean plus per-layer groups."""

    shared: torch.Tensor  # (d, h, m)
    layers: list[TuckerGroups]
    residual_energy: list[float]  # ||D_i||_F^2
    discarded_energy: list[float]  # ||D_i - What_i||_F^2
    tensor_norm: list[float]  # ||T_i||_F


def decompose_generators(
    tensors: list[torch.Tensor],
    r1: list[int],
    r2: list[int],
    groups: list[int],
    sweeps: int | None = None,
    shared: torch.Tensor | None = None,
) -> GeneratorFactors:
    """LORSA factors of N generator tensors ``(d, h, m)``: ``T_s = mean`` then HOSVD of each residual.

    ``r1``/``r2``/``groups``: per-layer mode ranks of one group and number of groups ``K_i``;
    ``sweeps``: block-HOOI sweeps (``None``: see :func:`hosvd`).
    """
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    T = torch.stack([t.to(dtype) for t in tensors])  # (N, d, h, m)
    T_s = T.mean(dim=0) if shared is None else shared.to(dtype)  # (d, h, m)
    layers, res, disc, norms = [], [], [], []
    for i in range(T.shape[0]):
        D = T[i] - T_s  # (d, h, m)
        f = hosvd(D, r1[i], r2[i], groups[i], sweeps)
        err = D - groups_to_tensor(f)
        layers.append(f)
        res.append(float((D * D).sum()))
        disc.append(float((err * err).sum()))
        norms.append(float(T[i].norm()))
    return GeneratorFactors(
        shared=T_s, layers=layers, residual_energy=res, discarded_energy=disc, tensor_norm=norms
    )


def merge_generator(shared: torch.Tensor, f: TuckerGroups) -> torch.Tensor:
    """Exact dense generator tensor ``G_i = T_s + sum_k C_k x1 B_k x2 A_k^T``, ``(d, h, m)``."""
    return shared + groups_to_tensor(f)


__all__ = [
    "TuckerGroups",
    "GeneratorFactors",
    "unfold",
    "leading_left_vectors",
    "project_core",
    "tucker_to_tensor",
    "groups_to_tensor",
    "hosvd",
    "hooi_sweep",
    "decompose_generators",
    "merge_generator",
    "DEFAULT_BLOCK_SWEEPS",
]
