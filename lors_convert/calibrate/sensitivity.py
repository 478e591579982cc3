"""Output sensitivity: per-weight output-gradient Gram matrices, the left factor of a K-FAC weighting.

Input Grams (:mod:`lors_convert.calibrate.grams`) weight a layer's error by the inputs it sees,
``||(W - What) X||^2``: every matrix's error counts in its own units, so the error of a query
projection and the error of an FFN matrix are not comparable, and a direction of a layer's output
that the rest of the network ignores costs as much as one it amplifies. The model output's error
to first order is ``sum_x ||J (W - What) x||^2`` with ``J`` the Jacobian of the model output with
respect to that layer's output. With the Kronecker (K-FAC) approximation, ``E[(J^T J) (x x^T)] ~
E[J^T J] E[x x^T]``, it is

    tr(G D C D^T),   D = W - What,   G = E[J^T J] (out, out),   C = E[x x^T] (in, in).

``G`` is estimated with random probes: for ``u ~ N(0, I)`` over the model output ``y``,
``g = d<y, u>/d(layer output) = J^T u`` has ``E[g g^T] = J^T J``. When ``y`` is the output of a
linear head outside the stacks, ``y = x H^T + b`` (a causal LM's logits, ``H`` (V, h)), the probe
starts at the head's input instead: ``v = z R^T`` with ``z ~ N(0, I_h)`` and ``R R^T = H^T H`` has
the law of ``u H``, so the estimate is the same in distribution and the backward skips the head
(a ``V x h`` product, large for a wide vocabulary). One forward pass per chunk of
a batch (at most ``CHUNK_ELEMENTS`` stacked-layer outputs, as many tokens or pixels as that allows:
the autograd graph of a whole batch through a whole model is several times the model; a narrow, shallow
model gets longer chunks and larger, faster products), ``probes`` backward passes through it
(``torch.autograd.grad`` with respect to the hooked layer outputs only; no parameter takes part in
the graph, which starts at the stacked layers' inputs, so it holds only what activation gradients
need). Rows are the positions of the layer output (tokens,
or pixels of a conv feature map); padding tokens are left out like for the input Grams.

Units. The input Grams are means per row; ``G`` is summed over a sample's rows and averaged over
samples x probes. ``tr(G D C D^T)`` is then the model output's squared error per sample (to first
order, cross terms between positions dropped) for every weight alike, also for conv layers at
different resolutions, so a global rank budget compares all weights directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .accumulate import add_gram, completed, stored_bytes
from .batches import (
    Batch,
    batch_mask,
    batch_size,
    model_device,
    positions,
    primary_output,
    run_model,
    split_batch,
    to_device,
    token_rows,
)

DEFAULT_PROBES = 4
# stacked-layer output elements per backward graph: it bounds the graph's memory (SmolLM2-135M, 155,520
# per token: 128 tokens; all-MiniLM-L6-v2, 20,736 per token: 964)
CHUNK_ELEMENTS = 20_000_000


def _output_rows(module: nn.Module, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer output (or its gradient) as rows ``(positions, out)``."""
    if isinstance(module, nn.Conv2d):
        if y.dim() == 3:
            y = y.unsqueeze(0)
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])  # (B*H*W, out)
    return token_rows(y, mask)


def _probe(y: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    u = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(device=y.device, dtype=y.dtype)
    if mask is not None and y.dim() >= 2 and tuple(y.shape[:2]) == tuple(mask.shape):
        u.mul_(mask.to(device=y.device, dtype=y.dtype).view(*mask.shape, *([1] * (y.dim() - 2))))
    return u


def collect_output_grams(
    model: nn.Module,
    owners: Mapping[str, nn.Module],
    batches: Iterable[Batch],
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
    float64: bool = True,
    max_bytes: int | None = None,
    finished: Callable[[Iterator[tuple[str, torch.Tensor]]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Weight key -> output-gradient Gram ``(out, out)`` (float64, CPU; ``float64=False``: the
    accumulators' dtype), for the given owners.

    ``owners``: weight key -> the module that applies it (``calibration.gram_owners``). Modules
    called more than once per forward pass add up all their calls. ``device``: where the
    accumulators (float32 for float32/16 models) live (default: the model's). Deterministic for a
    given ``seed``.

    ``max_bytes``: hold at most this much of accumulators at once: the modules are split into
    consecutive groups, one pass over ``batches`` each (every pass draws the same probes, so the
    Grams are those of a single pass), and each group's Grams go to ``finished`` as soon as its pass
    ends, as an iterator of ``(key, Gram)`` that makes each matrix when it is reached (then the
    returned dict is empty). A group pass runs the whole forward but differentiates
    only from the model output down to its own modules.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    groups = module_groups(model, owners, max_bytes)
    if len(groups) > 1 and finished is None:
        raise ValueError(
            "max_bytes splits the modules into groups: pass finished= to take each group's Grams"
        )
    result: dict[str, torch.Tensor] = {}
    batches = list(batches)
    chunk = chunk_positions(owners)  # the same for every group: each pass draws the same probes
    for group in groups:
        sums, scale = _group_pass(
            model,
            {k: m for k, m in owners.items() if id(m) in group},
            batches,
            probes,
            seed,
            device,
            progress if group is groups[-1] else None,
            chunk,
        )
        grams = _completed(sums, scale, float64)
        if finished is not None:
            finished(grams)
        else:
            result = dict(grams)
    return result


def _completed(sums: dict, scale: float, float64: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, Gram)`` one at a time, each accumulator consumed as its matrix is made (a group's full
    matrices are about twice its accumulators)."""
    for key in list(sums):
        g = completed(sums.pop(key)).mul_(scale).cpu()
        yield key, (g.to(torch.float64) if float64 else g)


def chunk_positions(owners: Mapping[str, nn.Module]) -> int:
    """Positions (tokens, pixels) per backward graph: ``CHUNK_ELEMENTS`` over the stacked layers'
    output elements per position (each module once)."""
    modules = {id(m): m for m in owners.values()}
    return max(1, CHUNK_ELEMENTS // max(1, sum(_out_width(m) for m in modules.values())))


def _out_width(module: nn.Module) -> int:
    for attr in ("out_features", "out_channels", "nf"):  # Linear, Conv2d, HF Conv1D
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return 0


def in_width(module: nn.Module) -> int:
    """The side of a module's input Gram: ``in_features``, a conv's unfolded patch, HF Conv1D's rows."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(getattr(module, "in_features", None), int):
        return module.in_features
    weight = getattr(module, "weight", None)
    return (
        weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0
    )  # Conv1D (in, out)


def module_groups(
    model: nn.Module,
    owners: Mapping[str, nn.Module],
    max_bytes: int | None,
    width: Callable[[nn.Module], int] = _out_width,
) -> list[set[int]]:
    """The owners' modules (ids) in model order, cut into as few groups of about equal accumulator
    size (one float32 accumulator of side ``width(module)`` per key) as keep each within ``max_bytes``."""
    keys_per_module: dict[int, int] = {}
    for module in owners.values():
        keys_per_module[id(module)] = keys_per_module.get(id(module), 0) + 1
    ordered = [m for m in model.modules() if id(m) in keys_per_module]
    sizes = [keys_per_module[id(m)] * stored_bytes(width(m)) for m in ordered]  # float32 accumulators
    total = sum(sizes)
    count = 1 if max_bytes is None else max(1, math.ceil(total / max_bytes))
    groups: list[set[int]] = [set()]
    used = 0
    for m, size in zip(ordered, sizes, strict=False):
        if groups[-1] and len(groups) < count and used + size / 2 > total * len(groups) / count:
            groups.append(set())  # past this group's share of the total (a module goes where most of it fits)
        groups[-1].add(id(m))
        used += size
    return groups


def _group_pass(model, owners, batches, probes, seed, device, progress, chunk) -> tuple[dict, float]:
    """One pass over ``batches`` accumulating the output Grams of ``owners``, ``chunk`` positions per
    backward graph: the sums (upper blocks, :mod:`.accumulate`) and the scale that makes them means."""
    by_module: dict[int, list[str]] = {}
    for key, module in owners.items():
        by_module.setdefault(id(module), []).append(key)
    modules = {id(m): m for m in owners.values()}
    captured: list[tuple[int, torch.Tensor]] = []

    def hook(mod, args, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            captured.append((id(mod), out))

    def track(mod, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
            return (x.detach().requires_grad_(),) + tuple(args[1:])  # the graph starts at these modules
        return None

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    handles += [m.register_forward_pre_hook(track) for m in modules.values()]
    head = _Head(model, modules)
    handles += head.handles
    # no parameter takes part in the graph: autograd then keeps only what the gradients with respect
    # to activations need, not every matmul's input (weight gradients are never asked for)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    where = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    samples = 0
    try:
        with torch.enable_grad():
            for whole in batches:
                for batch in split_batch(whole, max(1, chunk // positions(whole))):
                    _backward_grams(
                        model,
                        to_device(batch, where),
                        probes,
                        generator,
                        captured,
                        modules,
                        by_module,
                        sums,
                        device,
                        head,
                    )
                samples += batch_size(whole)
                if progress is not None:
                    progress(samples)
    finally:
        captured.clear()
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    return sums, 1.0 / max(samples * probes, 1)


class _Head:
    """Finds the linear head whose output is the model output (see the module docstring): forward
    hooks on the ``nn.Linear`` modules outside the stacks keep their last call."""

    def __init__(self, model: nn.Module, owners: Mapping[int, nn.Module]):
        inside = {id(m) for o in owners.values() for m in o.modules()}
        self.calls: dict[int, tuple[nn.Linear, torch.Tensor]] = {}  # id(output) -> (module, input)
        self.roots: dict[int, torch.Tensor] = {}  # id(module) -> R with R R^T = H^T H
        self.handles = [
            m.register_forward_hook(self._hook)
            for m in model.modules()
            if isinstance(m, nn.Linear) and id(m) not in inside
        ]

    def _hook(self, mod, args, out):
        if args and isinstance(out, torch.Tensor) and isinstance(args[0], torch.Tensor):
            self.calls[id(out)] = (mod, args[0])

    def start(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where the probes start: ``(head input, R)`` when ``y`` is a head's output, else ``(y, None)``;
        forgets this pass's calls."""
        call = self.calls.get(id(y))
        self.calls.clear()
        if call is None or call[0].out_features <= call[0].in_features or not call[1].requires_grad:
            return y, None  # no head, or no narrower place to start
        mod, x = call
        if id(mod) not in self.roots:
            H = mod.weight.detach().float()  # (V, h)
            lam, Q = torch.linalg.eigh((H.T @ H).double())  # (h,), (h, h)
            self.roots[id(mod)] = (Q * lam.clamp_min(0).sqrt()).to(x.dtype)  # (h, h): R R^T = H^T H
        return x, self.roots[id(mod)]


def _backward_grams(
    model, batch, probes, generator, captured, modules, by_module, sums, device, head
) -> None:
    """One forward pass of ``batch`` and ``probes`` backward passes, added into ``sums``."""
    mask = batch_mask(batch)
    captured.clear()
    y = primary_output(run_model(model, batch))
    if not captured or not y.requires_grad:
        head.calls.clear()
        return  # no stacked layer ran, or the output does not depend on any
    y, root = head.start(y)
    outs = [o for _, o in captured]
    for p in range(probes):
        u = _probe(y, mask, generator)  # (..., out) over the output, (..., h) over the head's input
        if root is not None:
            u = u @ root.mT  # (..., h): the law of (a probe over the head's output) H
        grads = torch.autograd.grad(y, outs, grad_outputs=u, retain_graph=p < probes - 1, allow_unused=True)
        for (mid, _), g in zip(captured, grads, strict=False):
            if g is None:
                continue
            r = _output_rows(modules[mid], g, mask)  # (positions, out)
            work = torch.float64 if r.dtype == torch.float64 else torch.float32
            r = r.to(device=device or r.device, dtype=work)
            for key in by_module[mid]:
                sums[key] = add_gram(sums.get(key), r)  # (out, out), upper blocks
    captured.clear()


__all__ = ["collect_output_grams", "module_groups", "in_width", "DEFAULT_PROBES"]
