"""Generator detection with torch.fx: which Linears of a stack member are parameter generators.

:func:`detect_generators` traces the stack's first member with ``torch.fx`` and follows each
Linear's output through ``reshape``/``view``/``split``/``chunk``/``unflatten``/``flatten``/
``transpose``/``getitem`` into an operand of ``matmul``/``@``/``bmm``/``einsum``/``F.linear``;
several matrices side by side are found as one layout. Members that do not trace (data-dependent
Python control flow, asserts on shapes) give nothing: a spec names their generators instead.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import nn

from ..layers.adaptive import Layout

_PASS_METHODS = {"contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as"}
_RESHAPE = {"reshape", "view"}
_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm, torch.einsum, torch.mm}
_MATRIX_ARG = {
    torch.nn.functional.linear: [(1, "weight")],
    torch.baddbmm: [(1, "batch1"), (2, "batch2")],
    torch.addmm: [(1, "mat1"), (2, "mat2")],
    torch.addbmm: [(1, "batch1"), (2, "batch2")],
}
_MATMUL_METHODS = {"matmul", "bmm", "mm", "__matmul__", "__rmatmul__"}


@dataclass
class _Feat:
    """A tensor derived from a generator output: ``nb`` unknown batch dims, then ``idx.shape``
    feature dims; ``idx`` holds the generator output index of every feature element."""

    nb: int
    idx: torch.Tensor


def _feature_dim(v: _Feat, dim: int) -> int | None:
    nd = v.nb + v.idx.dim()
    dim = dim + nd if dim < 0 else dim
    fd = dim - v.nb
    return fd if 0 <= fd < v.idx.dim() else None


def _shape_args(args) -> list | None:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    return list(args)


def _reshape(v: _Feat, shape: list) -> _Feat | None:
    """Track ``reshape(*shape)``: the trailing integer args are feature dims; anything before them
    (traced sizes, a leading -1) is batch, possibly absorbing leading feature dims."""
    suffix: list[int] = []
    for a in reversed(shape):
        if isinstance(a, int) and not isinstance(a, bool):
            suffix.append(a)
        else:
            break
    suffix.reverse()
    prefix = shape[: len(shape) - len(suffix)]
    if not prefix and len(suffix) > 1 and suffix[0] == -1:
        prefix, suffix = [-1], suffix[1:]
    if not prefix:
        return None  # all-constant shape: cannot tell batch from features
    F = v.idx.numel()
    if suffix.count(-1) > 1:
        return None
    known = math.prod(s for s in suffix if s != -1)
    if known == 0 or F % known:
        return None
    if -1 in suffix:
        suffix = [F // known if s == -1 else s for s in suffix]  # -1 resolves within the features
    nb = len(prefix)
    if math.prod(suffix) == F:
        return _Feat(nb=nb, idx=v.idx.reshape(suffix))
    # leading feature dims are absorbed into the last batch dim: keep them as idx's leading dim
    return _Feat(nb=nb - 1, idx=v.idx.reshape(-1, *suffix))


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _multiplies_features(user, src) -> bool:
    """A generated matrix multiplies activations: a product with a parameter (``get_attr``) is a
    per-token feature tensor meeting a weight (multi-head projections), not a generated matrix."""
    others = [
        a
        for a in list(user.args) + list(user.kwargs.values())
        if isinstance(a, torch.fx.Node) and a is not src
    ]
    return bool(others) and not any(a.op == "get_attr" for a in others)


def _follow(linear_node, out_features: int) -> list[torch.Tensor]:
    """Matrix index maps ``(..., R, C)`` reached from a traced Linear call, feeding a matmul."""
    values: dict = {linear_node: _Feat(nb=0, idx=torch.arange(out_features))}
    # the Linear output is (*batch, out): batch count is unknown but irrelevant; treat as >= 1
    values[linear_node].nb = 1
    found: list[torch.Tensor] = []
    queue = [linear_node]
    while queue:
        node = queue.pop(0)
        v = values[node]
        for user in list(node.users):
            new = _step(user, node, v, found)
            if new is not None and user not in values:
                values[user] = new
                queue.append(user)
    return found


def _step(user, src, v, found):  # noqa: C901 - one case per supported op
    op, target = user.op, user.target
    name = target if op == "call_method" else getattr(target, "__name__", None)
    if isinstance(v, tuple):
        if op == "call_function" and target is operator.getitem and isinstance(user.args[1], int):
            item = v[user.args[1]]
            return item
        return None
    self_arg = user.args[0] if user.args else None
    if op == "call_method" and self_arg is not src:
        if name in _MATMUL_METHODS and v.idx.dim() >= 2 and _multiplies_features(user, src):
            found.append(v.idx)
        return None
    is_method = op == "call_method"
    is_func = op == "call_function"
    if is_func and target in _MATRIX_ARG:  # only some arguments are matrices (weight of F.linear)
        if (
            v.idx.dim() >= 2
            and any(_arg(user, i, kw) is src for i, kw in _MATRIX_ARG[target])
            and _multiplies_features(user, src)
        ):
            found.append(v.idx)
        return None
    if (is_func and target in _MATMUL_FUNCS) or (is_method and name in _MATMUL_METHODS):
        if v.idx.dim() >= 2 and _multiplies_features(user, src):
            found.append(v.idx)
        return None
    if not (
        is_method
        or (
            is_func
            and target
            in (torch.reshape, torch.split, torch.chunk, torch.flatten, torch.transpose, torch.unflatten)
        )
    ):
        return None
    if is_func and self_arg is not src:
        return None
    rest = list(user.args[1:])
    if name in _PASS_METHODS:
        return v
    if name in _RESHAPE:
        shape = _shape_args(rest) if rest else _shape_args([user.kwargs.get("shape", ())])
        return _reshape(v, shape) if shape else None
    if name in ("split", "chunk"):
        dim = _arg(user, 2, "dim", 0)
        fd = _feature_dim(v, dim)
        if fd is None:
            return None
        arg = rest[0] if rest else user.kwargs.get("split_size_or_sections", user.kwargs.get("chunks"))
        if name == "chunk":
            pieces = v.idx.chunk(arg, dim=fd)
        else:
            if not (isinstance(arg, int) or all(isinstance(a, int) for a in arg)):
                return None
            pieces = v.idx.split(arg, dim=fd)
        return tuple(_Feat(nb=v.nb, idx=p) for p in pieces)
    if name == "unflatten":
        fd = _feature_dim(v, _arg(user, 1, "dim"))
        sizes = _arg(user, 2, "sizes")
        if fd is None or not all(isinstance(s, int) for s in sizes):
            return None
        shape = list(v.idx.shape)
        return _Feat(nb=v.nb, idx=v.idx.reshape(*shape[:fd], *sizes, *shape[fd + 1 :]))
    if name == "flatten":
        start, end = _arg(user, 1, "start_dim", 0), _arg(user, 2, "end_dim", -1)
        fs, fe = _feature_dim(v, start), _feature_dim(v, end)
        if fs is None or fe is None:
            return None
        return _Feat(nb=v.nb, idx=v.idx.flatten(fs, fe))
    if name == "transpose":
        a, b = _feature_dim(v, _arg(user, 1, "dim0")), _feature_dim(v, _arg(user, 2, "dim1"))
        if a is None or b is None:
            return None
        return _Feat(nb=v.nb, idx=v.idx.transpose(a, b))
    return None


def _layout_from_maps(maps: list[torch.Tensor], out_features: int) -> Layout | None:
    """The layout whose row-major blocks are exactly the found matrices, or None."""
    blocks = []
    for idx in maps:
        for mat in idx.reshape(-1, *idx.shape[-2:]):
            r, c = mat.shape
            start = int(mat.min())
            if torch.equal(mat, start + torch.arange(r * c).view(r, c)):
                blocks.append((start, r, c))
            elif torch.equal(mat.T, start + torch.arange(r * c).view(c, r)):
                blocks.append((start, c, r))  # used transposed: LORSA factorizes the stored layout
            else:
                return None
    blocks = sorted(set(blocks))
    pos = 0
    for start, r, c in blocks:
        if start != pos:
            return None
        pos += r * c
    if pos != out_features:
        return None
    shapes = [(r, c) for _, r, c in blocks]
    n = len(shapes)
    for period in range(1, n + 1):
        if n % period == 0 and shapes == shapes[:period] * (n // period):
            return Layout(groups=n // period, entries=tuple(shapes[:period]))
    return None  # pragma: no cover - period n always matches


def detect_generators(module: nn.Module) -> dict[str, Layout]:
    """Generator Linears of ``module`` found by ``torch.fx`` tracing: relative module path -> layout.

    Returns ``{}`` when the module does not trace. Only Linears called directly by the traced
    code count (leaf modules such as ``nn.MultiheadAttention`` are not looked into).
    """
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception:  # noqa: BLE001 - any tracing failure means "use a spec"
        return {}
    modules = dict(module.named_modules())
    found: dict[str, Layout | None] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        lin = modules.get(node.target)
        if not isinstance(lin, nn.Linear):
            continue
        maps = _follow(node, lin.out_features)
        layout = _layout_from_maps(maps, lin.out_features) if maps else None
        if node.target in found and found[node.target] != layout:
            layout = None  # called twice, used differently
        found[node.target] = layout
    return {k: v for k, v in found.items() if v is not None}


__all__ = ["detect_generators"]
