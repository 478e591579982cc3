"""Choosing generators: the ``plan_conversion(adaptive=...)`` hook that claims the stacked Linear
weights a spec selects as LORSA parameter generators, with their layouts and ranks.

Each generator's stacked weight becomes a :class:`~lors_convert.layers.adaptive.LorsaLinear`:
shared mean generator plus per-layer ``B E(q) A`` groups from a truncated HOSVD
(:mod:`lors_convert.decompose.tucker`, fitted by :mod:`lors_convert.fit`; planned by
:func:`lors_convert.discover.plan.adaptive_plan`). Specs are :mod:`.specs`, layouts found by
tracing are :mod:`.tracing`. A spec that matches a parameter which is not a plain ``nn.Linear``
weight, or whose layout does not fit, is an error; so is an explicit spec that matches nothing.
``require_savings`` does not apply to generators: they were asked for explicitly.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

from ..errors import LorsUsageError
from ..layers.adaptive import Layout
from .specs import AdaptiveArg, GeneratorSpec, parse_specs
from .stacks import Stack, StackedParam
from .tracing import detect_generators


def _matches(spec: GeneratorSpec, stack: Stack, sp: StackedParam) -> bool:
    keys = stack.keys(sp.relname)
    owners = [k.rpartition(".")[0] for k in keys]
    return any(fnmatch.fnmatchcase(k, spec.pattern) for k in keys + owners)


def make_adaptive_hook(adaptive: AdaptiveArg, rank: int | None, groups) -> Callable | None:
    """The ``plan_conversion(adaptive=...)`` hook for ``convert(..., adaptive=...)`` (see module doc)."""
    specs = parse_specs(adaptive)
    if not specs:
        return None
    traced: dict[int, dict[str, Layout]] = {}
    used: set[int] = set()

    def hook(model: nn.Module, stack: Stack, sp: StackedParam) -> dict | None:
        for n, spec in enumerate(specs):
            if not _matches(spec, stack, sp):
                continue
            named = spec.pattern != "*"  # a spec naming parameters: failures are errors, not skips
            owner_path = f"{stack.members[0]}.{sp.owner_relpath}" if sp.owner_relpath else stack.members[0]
            owner = model.get_submodule(owner_path)
            plain_linear = isinstance(owner, nn.Linear) and type(owner).forward is nn.Linear.forward
            if sp.attr != "weight" or not plain_linear:
                if named:
                    raise LorsUsageError(
                        f"generator spec {spec.pattern!r} matches {owner_path}.{sp.attr}, "
                        f"which is not the weight of a plain nn.Linear (exclude it or narrow the pattern)"
                    )
                continue
            if spec.auto_layout:
                if id(stack) not in traced:
                    traced[id(stack)] = detect_generators(model.get_submodule(stack.members[0]))
                layout = traced[id(stack)].get(sp.owner_relpath)
                if layout is None:
                    if named:
                        raise LorsUsageError(
                            f"{owner_path} matches generator spec {spec.pattern!r} but torch.fx could not "
                            f"find how its output is cut into matrices (the stack member does not trace, or the "
                            f"output is not only reshaped into matmul operands); give the layout explicitly, "
                            f"e.g. '{spec.pattern}: G x [RxC, ...]'"
                        )
                    continue
            else:
                layout = Layout.parse(spec.layout)
                if layout.out_features != owner.out_features:
                    if not named:
                        continue
                    raise LorsUsageError(
                        f"generator layout {layout} of spec {spec.pattern!r} gives "
                        f"{layout.out_features} outputs but {owner_path} has {owner.out_features}"
                    )
            used.add(n)
            r = rank if spec.rank == "default" else spec.rank
            g = groups if (isinstance(spec.groups, str) and spec.groups == "default") else spec.groups
            return {
                "layout": layout,
                "rank": r,
                "groups": g,
                "sweeps": spec.sweeps,
                "has_bias": owner.bias is not None,
            }
        return None

    hook.specs = specs  # type: ignore[attr-defined]
    hook.used = used  # type: ignore[attr-defined]
    return hook


def check_specs_used(hook) -> None:
    """Raise when an explicit spec matched no generator (a no-op selection is an error)."""
    if hook is None:
        return
    for n, spec in enumerate(hook.specs):
        if n not in hook.used and spec.pattern != "*":
            raise LorsUsageError(
                f"generator spec {spec.pattern!r} matches no stacked Linear weight "
                "(patterns match full parameter or module names, e.g. "
                "'*.parameter_generator.0.weight'; the parameter must also pass include/exclude)"
            )


__all__ = ["make_adaptive_hook", "check_specs_used"]
