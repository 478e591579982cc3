"""Module surgery: install LORS layers into a model, and put dense modules back.

:func:`install_layers` replaces the owners of one planned parameter in every stack member by LORS
layers that share one ``shared`` Parameter; :class:`ModuleSink` is the conversion loop's sink for
in-memory conversion (it installs each :class:`~lors_convert.fit.Fit` as it comes);
:func:`merge` turns every LORS layer back into a dense module of its original class.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .discover.plan import ConversionPlan, ParamPlan
from .errors import LorsError
from .fit import Fit
from .layers import LorsModule, layer_class


def install_layers(
    model: nn.Module,
    pp: ParamPlan,
    shared: torch.Tensor | None,
    factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Replace the owners of ``pp`` in every member with LORS layers sharing one ``shared`` Parameter.

    ``shared`` and ``factors`` are given in the storage dtype and device (``shared`` is ignored for a
    private-only plan, ``pp.has_shared=False``); with ``factors=None`` the layers are left with empty
    factors of the right shapes (a skeleton to load a state dict into). Members in
    ``pp.dense_members`` keep their dense module (their ``factors`` entry is None).
    """
    layer_cls = layer_class(pp.layer_kind)
    paths = owner_paths(pp)
    trains = [model.get_submodule(p).get_parameter(pp.param.attr).requires_grad for p in paths]
    shared_param = (
        nn.Parameter(shared, requires_grad=any(trains)) if pp.has_shared else None
    )  # frozen stays frozen
    for i, path in enumerate(paths):
        if i in pp.dense_members:
            continue
        dense = model.get_submodule(path)
        layer = layer_cls(
            dense, shared_param, total_rank=pp.ranks[i], rank=pp.rank, groups=pp.groups[i], **pp.extra
        )
        layer.lors_A.requires_grad_(trains[i])
        layer.lors_B.requires_grad_(trains[i])
        layer.lors_plan = pp  # what save() records (checkpoint.format.model_stacks)
        if factors is not None:
            B, A = factors[i]
            with torch.no_grad():
                layer.lors_B.copy_(B)
                layer.lors_A.copy_(A)
        model.set_submodule(path, layer)


def owner_paths(pp: ParamPlan) -> list[str]:
    """Module path of the owner of ``pp`` in every stack member."""
    rel = pp.param.owner_relpath
    return [f"{member}.{rel}" if rel else member for member in pp.stack.members]


class ModuleSink:
    """Installs each fitted parameter into ``model`` in the dtype and device of its dense weights."""

    def __init__(self, model: nn.Module):
        self.model = model

    def wants(self, pp: ParamPlan) -> bool:
        return True

    def put(self, pp: ParamPlan, fit: Fit) -> None:
        weight = self.model.get_parameter(pp.keys[0])
        dtype, where = weight.dtype, weight.device

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=where, dtype=dtype)

        if pp.kind == "adaptive":
            self._put_generators(pp, fit, cast)
            return
        install_layers(
            self.model,
            pp,
            cast(fit.shared) if pp.has_shared else None,
            [None if f is None else (cast(f[0]), cast(f[1])) for f in fit.factors],
        )

    def _put_generators(self, pp: ParamPlan, fit: Fit, cast) -> None:
        paper = fit.factors is None  # the layers keep their own from-scratch init
        weight = self.model.get_parameter(pp.keys[0])
        install_layers(
            self.model,
            pp,
            torch.empty(pp.matrix, dtype=weight.dtype, device=weight.device) if paper else cast(fit.shared),
        )
        for i, path in enumerate(owner_paths(pp)):
            layer = self.model.get_submodule(path)
            if paper:
                layer.reset_paper()
            else:
                layer.set_factors([(cast(B), cast(A), cast(C)) for B, A, C in fit.factors[i]])


def build_skeleton(model: nn.Module, plan: ConversionPlan) -> nn.Module:
    """Install empty LORS layers for ``plan`` in ``model`` (in place) and return it.

    The result has the structure :func:`lors_convert.convert` gives with the same settings (one shared
    Parameter per stacked matrix, factors of the planned ranks) but uninitialized values: load a
    converted model's ``state_dict()`` into it. ``plan`` comes from ``plan_conversion`` on this model.
    """
    for pp in plan.params:
        if pp.kind != "static":
            raise LorsError(f"build_skeleton handles static LORS only, not {pp.kind} ({pp.relname})")
        weight = model.get_parameter(pp.keys[0])
        install_layers(
            model,
            pp,
            torch.empty(pp.matrix, dtype=weight.dtype, device=weight.device) if pp.has_shared else None,
        )
    return model


def merge(model: nn.Module) -> nn.Module:
    """Replace every LORS module of ``model`` (in place) by a dense module of its original class.

    The result has the original module types and state-dict keys, shapes and dtypes.
    """
    if isinstance(model, LorsModule):
        return model.to_dense()
    for name, layer in list(lors_modules(model)):
        model.set_submodule(name, layer.to_dense())
    return model


def lors_modules(model: nn.Module) -> Iterator[tuple[str, LorsModule]]:
    for name, m in model.named_modules():
        if isinstance(m, LorsModule):
            yield name, m


__all__ = ["install_layers", "owner_paths", "ModuleSink", "build_skeleton", "merge", "lors_modules"]
