"""Static LORS math (LORST): shared mean plus truncated SVD of each layer's residual. Pure functions.

For layer weights ``W_1..W_N`` viewed as matrices ``(d, h)``::

    W_s = mean_i W_i,   R_i = W_i - W_s = U S V^T
    B_i = U_k S_k^{1/2}  (d, k),   A_i = S_k^{1/2} V_k^T  (k, h),   k = K_i * r

By Eckart-Young ``||R_i - B_i A_i||_F^2`` is at least the energy of the discarded singular values,
equal with the exact top-k subspace (``topk.py`` finds it exactly or randomized, by cost);
:class:`LayerFactors` reports the error the factors have (:func:`_discarded_energy`). All arithmetic is float32 (or float64 when given float64),
whatever the storage dtype; casting back to the source dtype is the caller's job.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..finite import first_non_finite
from .topk import serial, top_singular

MEASURE_BELOW = 0.01  # below this error energy (of ||R||^2) the error is measured on R - B A
CHUNK_ELEMENTS = 1 << 21  # residual elements solved together (8 MB of float32), see _chunks


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """View a weight as the matrix LORS factorizes: first dim by the rest.

    Linear ``(out, in)`` as is, conv ``(out, in/groups, kh, kw)`` as ``(out, in/groups*kh*kw)``,
    HF ``Conv1D`` as stored ``(in, out)``.
    """
    return weight.reshape(weight.shape[0], -1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lors_param_count(d: int, h: int, ranks: list[int], shared: bool = True) -> int:
    """Parameters of one shared matrix and its private factors: ``d*h + sum_i k_i*(d+h)``
    (without the ``d*h`` for a private-only stack, ``shared=False``)."""
    return d * h * bool(shared) + sum(ranks) * (d + h)


def dense_param_count(d: int, h: int, n_layers: int) -> int:
    return n_layers * d * h


def resolve_ranks(rank: int | None, groups: list[int], d: int, h: int) -> tuple[list[int], bool]:
    """Total private rank per layer, ``K_i * r``, clamped to ``min(d, h)``.

    ``rank=None`` means full rank. Returns the ranks and whether any was clamped.
    """
    full = min(d, h)
    if rank is None:
        return [full] * len(groups), False
    wanted = [k * rank for k in groups]
    return [min(w, full) for w in wanted], any(w > full for w in wanted)


def saves_parameters(d: int, h: int, ranks: list[int]) -> bool:
    return lors_param_count(d, h, ranks) < dense_param_count(d, h, len(ranks))


@dataclass
class LayerFactors:
    """Private factors of one layer and the spectrum bookkeeping the report needs."""

    B: torch.Tensor  # (d, k)
    A: torch.Tensor  # (k, h)
    residual_energy: float  # ||R_i||_F^2
    discarded_energy: float  # ||R_i - B_i A_i||_F^2 = sum of discarded sigma^2
    weight_norm: float  # ||W_i||_F

    @property
    def relative_error(self) -> float:
        return math.sqrt(max(self.discarded_energy, 0.0)) / self.weight_norm if self.weight_norm else 0.0

    @property
    def retained_energy(self) -> float:
        if self.residual_energy <= 0.0:
            return 1.0
        return 1.0 - max(self.discarded_energy, 0.0) / self.residual_energy


@dataclass
class StackFactors:
    shared: torch.Tensor  # (d, h)
    layers: list[LayerFactors]


def truncated_svd(
    R: torch.Tensor, k: int, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets ``U (d, k), S (k,), Vh (k, h)`` of ``R`` (or of a batch
    ``(..., d, h)``), by the route :func:`.topk.route` picks for ``method`` ("auto", "exact" or
    "randomized"); ``U S Vh`` is always the projection of ``R`` onto the subspace found."""
    d, h = R.shape[-2:]
    if k == 0:
        return (
            R.new_zeros(*R.shape[:-2], d, 0),
            R.new_zeros(*R.shape[:-2], 0),
            R.new_zeros(*R.shape[:-2], 0, h),
        )
    return top_singular(R, k, method)


def row_energy(M: torch.Tensor):
    """``||M||_F^2`` summed in float64 over float32 row norms: float32's precision, without a
    float64 copy of the matrix. A batch ``(..., d, h)`` gives a list."""
    return (torch.linalg.vector_norm(M, dim=-1).double() ** 2).sum(-1).tolist()


def split_balanced(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = U S^{1/2}``, ``A = S^{1/2} V^T``: both factors carry half the spectrum."""
    root = S.clamp_min(0).sqrt()  # (..., k)
    return U * root.unsqueeze(-2), root.unsqueeze(-1) * Vh  # (..., d, k), (..., k, h)


def rebalance(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank unit so that ``B[:, j]`` and ``A[j]`` have equal norms; ``B @ A`` is unchanged.

    Factors mapped back from a whitened space (``M^-T U``, ``V^T L^-1``) carry the Grams' scale
    unevenly; training them with Adam (one step size for all) needs both on the same footing.
    """
    nb = torch.linalg.vector_norm(B, dim=0)  # (k,)
    na = torch.linalg.vector_norm(A, dim=1)  # (k,)
    ok = (nb > 0) & (na > 0)
    scale = torch.where(ok, (na / torch.where(ok, nb, torch.ones_like(nb))).sqrt(), torch.ones_like(nb))
    return B * scale, A / scale[:, None]  # (d, k), (k, h)


def stack_matrices(weights, device=None, names: list[str] | None = None) -> torch.Tensor:
    """Copy N layer weights into one fresh float32 (or float64) tensor ``(N, d, h)``, one at a time.

    ``weights`` may be a lazy sequence (each item read on access), so only one source tensor is in
    memory besides the result. With ``names``, a non-finite layer raises ``ValueError`` naming it.
    """
    first = weights[0]
    dtype = compute_dtype(first.dtype)
    device = torch.device(device) if device is not None else first.device
    d, h = as_matrix(first).shape
    W = torch.empty(len(weights), d, h, dtype=dtype, device=device)  # (N, d, h)
    for i in range(len(weights)):
        w = first if i == 0 else weights[i]
        with serial():  # a memory-bound copy: threads only add a barrier (topk.py)
            W[i].copy_(as_matrix(w))
        del w
    bad = first_non_finite(W, names) if names is not None else None
    if bad is not None:
        raise ValueError(f"tensor {bad!r} contains NaN or Inf values; refusing to convert it")
    return W


def decompose_stack(
    weights,
    ranks: list[int],
    method: str = "auto",
    device: torch.device | str | None = None,
    shared: torch.Tensor | None = None,
) -> StackFactors:
    """LORST factors of one stacked parameter.

    ``weights``: the N layers' tensors (any shape, any float dtype), or an already stacked float
    ``(N, d, h)`` tensor from :func:`stack_matrices`, which is then overwritten with the residuals
    (saves a copy of the group when streaming). ``ranks``: total private rank ``K_i * r`` per layer.
    ``shared`` overrides the mean (calibrated or refined shared parts). Returns float32 (float64
    for float64 input) factors on ``device`` (default: the weights' device).
    """
    W_s, layers = decompose_lazily(weights, ranks, method, device, shared)
    return StackFactors(shared=W_s, layers=list(layers))


def decompose_lazily(
    weights,
    ranks: list[int],
    method: str = "auto",
    device: torch.device | str | None = None,
    shared: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Iterator[LayerFactors]]:
    """:func:`decompose_stack` as ``(W_s, layers)``: the shared part now, each layer's factors as the
    iterator reaches it, one chunk (:func:`_chunks`) solved at a time. A consumer that stores each
    layer's factors as they come (a checkpoint writer) holds the residuals and one chunk's work, not
    every layer's factors; the residuals are released when the iterator ends."""
    if (
        isinstance(weights, torch.Tensor)
        and weights.dim() == 3
        and weights.dtype in (torch.float32, torch.float64)
    ):
        W = weights if device is None else weights.to(device)  # (N, d, h), consumed
    else:
        W = stack_matrices(weights, device)  # (N, d, h)
    weight_norms = torch.linalg.matrix_norm(W).tolist()
    W_s = W.mean(dim=0) if shared is None else shared.to(device=W.device, dtype=W.dtype)  # (d, h)
    R = W.sub_(W_s)  # (N, d, h) residuals, in place
    del W
    return W_s, _layer_factors(R, ranks, method, weight_norms)


def _layer_factors(
    R: torch.Tensor, ranks: list[int], method: str, weight_norms: list[float]
) -> Iterator[LayerFactors]:
    """The factors of each residual ``R[i]`` (N, d, h), chunk by chunk; ``R`` is overwritten."""
    for start, stop in _chunks(ranks, R.shape[-2:]):
        k = ranks[start]
        chunk = R[start:stop]  # (c, d, h), a view
        residual = row_energy(chunk)
        U, S, Vh = truncated_svd(chunk, k, method)  # (c, d, k), (c, k), (c, k, h)
        B, A = split_balanced(U, S, Vh)  # (c, d, k), (c, k, h)
        del U, Vh
        discarded = _discarded_energy(chunk, B, A, S, residual)
        del chunk
        for j, i in enumerate(range(start, stop)):
            with serial():  # small copies: threads only add a barrier (topk.py)
                own = B[j].clone(), A[j].clone()  # not views of the chunk
            yield LayerFactors(
                B=own[0],
                A=own[1],
                residual_energy=residual[j],
                discarded_energy=discarded[j],
                weight_norm=weight_norms[i],
            )
            del own
        del B, A


def _discarded_energy(
    R: torch.Tensor, B: torch.Tensor, A: torch.Tensor, S: torch.Tensor, residual: list[float]
) -> list[float]:
    """``||R_i - B_i A_i||_F^2`` per layer of a chunk, the error the factors have (not a spectrum's).

    ``B A`` is the projection of ``R`` onto the basis found (``topk.py``), whose rows' norms are ``S``,
    so ``<R, B A> = sum S^2`` and ``||R - B A||^2 = ||R||^2 - 2 sum S^2 + <B^T B, A A^T>``: k x k work,
    no pass over ``R``. Where that difference would cancel (error energy below
    ``MEASURE_BELOW`` of ``||R||^2``, near full rank) ``R`` is overwritten with ``R - B A`` and measured.
    """
    kept = (S.double() ** 2).sum(-1).tolist()  # (c,)
    fit = ((B.mT @ B).double() * (A @ A.mT).double()).sum((-2, -1)).tolist()  # (c,) ||B A||^2
    out = [r - 2 * s + f for r, s, f in zip(residual, kept, fit, strict=False)]
    for j, (e, r) in enumerate(zip(out, residual, strict=False)):
        if e < MEASURE_BELOW * r:
            out[j] = row_energy(R[j].addmm_(B[j], A[j], alpha=-1))  # (d, h), consumed
    return [max(e, 0.0) for e in out]


def _chunks(ranks: list[int], shape) -> list[tuple[int, int]]:
    """Runs of consecutive equal ranks, cut to at most ``CHUNK_ELEMENTS`` of residuals each (at least
    one layer): batching saves per-call overhead on small layers, while the range finder's passes
    over a large layer are memory-bound and faster one layer at a time. A run's workspace (Gram,
    panels) is then at most about three times its residuals."""
    d, h = shape
    size = max(1, CHUNK_ELEMENTS // (d * h))
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(ranks) + 1):
        if i == len(ranks) or ranks[i] != ranks[start]:
            out.extend((a, min(a + size, i)) for a in range(start, i, size))
            start = i
    return out


def merge_weight(shared: torch.Tensor | None, B: torch.Tensor, A: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Dense weight ``W_s + B A`` (``B A`` without a shared part) in float32, reshaped to ``shape``
    and cast to ``dtype``."""
    cdtype = compute_dtype(dtype)
    W = B.to(cdtype) @ A.to(cdtype)  # (d, h)
    if shared is not None:
        W = shared.to(cdtype) + W
    return W.reshape(shape).to(dtype)
