"""The common part of every static LORS layer: a shared weight plus private low-rank factors.

A LORS layer replaces one dense module of a stack. It holds

- ``shared``: the stack's shared matrix ``W_s`` (d, h), the *same* ``nn.Parameter`` object in every
  member, so optimizers and parameter counts see it once; ``None`` for a private-only stack (a rank
  budget found that the layers share too little for ``W_s`` to pay its ``d*h`` parameters), whose
  layers are ``W_i = B_i A_i``;
- ``lors_B`` (d, k) and ``lors_A`` (k, h): this layer's private factors, ``k = K * r``;
- the dense module's other parameters (bias) under their original names.

The dense module it replaced is kept as a meta-device template (no memory), which gives the
hyper-parameters for the forward pass and the class to merge back into.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..decompose.lorst import merge_weight


def meta_clone(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on the meta device (no memory)."""
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = (
            nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        )
    return copy.deepcopy(module, memo)


class LorsModule(nn.Module):
    """Marker base of every module lors swaps in (static and adaptive): it can merge back."""

    layer_kind: str = ""  # the name recorded in lors_config.json
    shared_names: tuple[str, ...] = ("shared",)  # state entries common to the stack, stored once

    def to_dense(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def merge_state(cls, state: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
        """Pure tensor merge used by ``lors merge`` without the architecture.

        ``state``: this module's tensors under their relative names (``shared``, ``lors_A``, ...);
        ``meta``: the parameter's entry of ``lors_config.json`` (``shape``, ``dtype``, ...).
        Returns the dense module's tensors under their original relative names.
        """
        raise NotImplementedError


class LorsLayer(LorsModule):
    """Static LORS base; subclasses implement ``forward`` without materializing ``W_s + B A``, except
    a private-only layer whose product costs more than the dense one (:meth:`materialize`)."""

    dense_types: tuple[type, ...] = ()
    materialized = False  # True: the forward multiplies by W_i = B_i A_i, formed once (formed_weight)
    _formed: tuple | None = None  # (W_i, the factors' versions and addresses it was formed from)

    @classmethod
    def replaces(cls) -> tuple[type, ...]:
        """The dense module classes this layer stands in for."""
        return cls.dense_types

    def __init__(
        self,
        dense: nn.Module,
        shared: nn.Parameter | None,
        total_rank: int,
        rank: int | None,
        groups: int,
        weight_name: str = "weight",
    ) -> None:
        super().__init__()
        weight = getattr(dense, weight_name)
        d, h = weight.shape[0], weight[0].numel()
        k = total_rank
        self.weight_shape = tuple(weight.shape)
        self.weight_dtype = weight.dtype
        self.weight_name = weight_name
        self.rank = rank  # r (None: full rank)
        self.groups = groups  # K
        self.register_parameter("shared", shared)  # (d, h), shared by the stack; or None
        like = weight if shared is None else shared
        factory = {"device": like.device, "dtype": like.dtype}
        self.lors_B = nn.Parameter(torch.zeros(d, k, **factory))  # (d, k)
        self.lors_A = nn.Parameter(torch.zeros(k, h, **factory))  # (k, h)
        for name, p in dense._parameters.items():  # includes bias=None, which forward reads
            if name != weight_name:
                self.register_parameter(name, p)
        object.__setattr__(self, "template", meta_clone(dense))  # not a submodule: holds no state

    @property
    def total_rank(self) -> int:
        return self.lors_A.shape[0]

    @classmethod
    def merge_state(cls, state: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
        weight_name = meta.get("weight_name", "weight")
        dtype = getattr(torch, meta["dtype"])
        dense = {
            weight_name: merge_weight(
                state.get("shared"), state["lors_B"], state["lors_A"], tuple(meta["shape"]), dtype
            )
        }
        dense.update({k: v for k, v in state.items() if k not in ("shared", "lors_A", "lors_B")})
        return dense

    def factored_costs_more(self) -> bool:
        """Whether ``(x A^T) B^T`` takes at least the multiply-adds of the dense product: a private-only
        layer with ``k (d + h) >= d h``. A layer with a shared part computes ``x W_s^T`` as well and
        keeps its fused forward."""
        d, h = self.lors_B.shape[0], self.lors_A.shape[1]
        return self.shared is None and self.total_rank * (d + h) >= d * h

    def materialize(self) -> None:
        """Run the forward through ``W_i = B_i A_i`` (formed now). The factors stay the parameters:
        training, saving and merging see no difference."""
        self.materialized = True
        self.formed_weight()

    def prepare_inference(self) -> bool:
        """Form ``W_i`` where the factored product costs at least the dense one (:meth:`materialize`),
        else lay ``B`` out for decoding (:meth:`relayout`); whether ``W_i`` was formed. What
        :func:`~lors_convert.checkpoint.load` and the ``--hf-code`` loader do to every layer."""
        if self.factored_costs_more():
            self.materialize()
            return True
        self.relayout()
        return False

    def relayout(self) -> None:
        """Store ``B`` (d, k) column-major, the same values under the same shape: a batch-1 product
        (decoding) then reads it as ``k`` rows of ``d`` values instead of ``d`` rows of ``k``, which
        the matrix-vector kernels stream about twice as fast (docs/benchmarks.md). ``A`` (k, h) is
        read along ``h`` already, and a product over many rows (prefill, training) does not care.
        Saving writes the same bytes (the writer stores tensors contiguous)."""
        B = self.lors_B
        if self.materialized or B.shape[0] <= B.shape[1] or B.stride(0) == 1:
            return
        self.lors_B = nn.Parameter(B.detach().T.contiguous().T, requires_grad=B.requires_grad)  # (d, k)

    def formed_weight(self) -> torch.Tensor:
        """``W_i = B_i A_i`` (d, h) in the storage dtype: kept while the factors are unchanged (their
        version counters and addresses), formed afresh and differentiable when autograd needs them."""
        B, A = self.lors_B, self.lors_A
        if torch.is_grad_enabled() and (B.requires_grad or A.requires_grad):
            return B @ A  # (d, k) (k, h) -> (d, h)
        key = (B._version, A._version, B.data_ptr(), A.data_ptr())
        if self._formed is None or self._formed[1] != key:
            with torch.no_grad():
                self._formed = (B @ A, key)  # (d, h)
        return self._formed[0]

    def delta_weight(self) -> torch.Tensor:
        """The private part ``B A`` as a matrix (d, h), float32."""
        return self.lors_B.float() @ self.lors_A.float()

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``W_s + B A`` for code that reads ``.weight`` directly (materializes it)."""
        return merge_weight(self.shared, self.lors_B, self.lors_A, self.weight_shape, self.lors_B.dtype)

    def to_dense(self) -> nn.Module:
        """A module of the original class with the merged weight, on this layer's device."""
        dense = copy.deepcopy(self.template)
        # the current storage dtype: equal to the source's unless the model was cast (.half()) after
        # conversion, and then the merged weight must follow its bias and the inputs
        merged = merge_weight(self.shared, self.lors_B, self.lors_A, self.weight_shape, self.lors_B.dtype)
        dense.to_empty(device=self.lors_B.device, recurse=True)
        trains = (self.lors_B if self.shared is None else self.shared).requires_grad
        setattr(dense, self.weight_name, nn.Parameter(merged.detach(), requires_grad=trains))
        for name, p in self.named_parameters(recurse=False):
            if name not in ("shared", "lors_A", "lors_B"):
                setattr(dense, name, p)
        for name, _b in self.template.named_buffers(recurse=False):  # none for Linear/Conv: defensive
            raise NotImplementedError(f"LORS layers do not carry buffers ({name})")
        return dense

    def extra_repr(self) -> str:
        return (
            f"shape={self.weight_shape}, rank={self.rank}, groups={self.groups}, "
            f"shared={None if self.shared is None else tuple(self.shared.shape)}"
        )
