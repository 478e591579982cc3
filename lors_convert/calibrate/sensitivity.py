"""Output sensitivity: per-weight output-gradient Gram matrices, the left factor of a K-FAC weighting.

Input Grams (:mod:`calibration`) weight a layer's error by the inputs it sees,
``||(W - What) X||^2``: every matrix's error counts in its own units, so the error of a query
projection and the error of an FFN matrix are not comparable, and a direction of a layer's output
that the rest of the network ignores costs as much as one it amplifies. The model output's error
to first order is ``sum_x ||J (W - What) x||^2`` with ``J`` the Jacobian of the model output with
respect to that layer's output. With the Kronecker (K-FAC) approximation, ``E[(J^T J) (x x^T)] ~
E[J^T J] E[x x^T]``, it is

    tr(G D C D^T),   D = W - What,   G = E[J^T J] (out, out),   C = E[x x^T] (in, in).

``G`` is estimated with random probes: for ``u ~ N(0, I)`` over the model output ``y``,
``g = d<y, u>/d(layer output) = J^T u`` has ``E[g g^T] = J^T J``. One forward pass per batch,
``probes`` backward passes through it (``torch.autograd.grad`` with respect to the hooked layer
outputs only: no parameter gradient is computed). Rows are the positions of the layer output (tokens,
or pixels of a conv feature map); padding tokens are left out like for the input Grams.

Units. The input Grams are means per row; ``G`` is summed over a sample's rows and averaged over
samples x probes. ``tr(G D C D^T)`` is then the model output's squared error per sample (to first
order, cross terms between positions dropped) for every weight alike, also for conv layers at
different resolutions, so a global rank budget compares all weights directly.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .batches import Batch, batch_mask, batch_size, model_device, primary_output, run_model, to_device, token_rows

DEFAULT_PROBES = 4


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
        u = u * mask.to(device=y.device, dtype=y.dtype).view(*mask.shape, *([1] * (y.dim() - 2)))
    return u


def collect_output_grams(
    model: nn.Module,
    owners: Mapping[str, nn.Module],
    batches: Iterable[Batch],
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Weight key -> output-gradient Gram ``(out, out)`` (float64, CPU), for the given owners.

    ``owners``: weight key -> the module that applies it (``calibration.gram_owners``). Modules
    called more than once per forward pass add up all their calls. ``device``: where the float64
    accumulators live (default: the model's). Deterministic for a given ``seed``.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    by_module: dict[int, list[str]] = {}
    for key, module in owners.items():
        by_module.setdefault(id(module), []).append(key)
    modules = {id(m): m for m in owners.values()}
    captured: list[tuple[int, torch.Tensor]] = []

    def hook(mod, args, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            captured.append((id(mod), out))

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)  # a graph to differentiate through; only layer outputs get gradients
    was_training = model.training
    model.eval()
    where = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    samples = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                batch = to_device(batch, where)
                mask = batch_mask(batch)
                captured.clear()
                y = primary_output(run_model(model, batch))
                if not captured or not y.requires_grad:
                    continue  # no stacked layer ran, or the output does not depend on any
                outs = [o for _, o in captured]
                for p in range(probes):
                    u = _probe(y, mask, generator)
                    grads = torch.autograd.grad(y, outs, grad_outputs=u, retain_graph=p < probes - 1,
                                                allow_unused=True)
                    for (mid, _), g in zip(captured, grads):
                        if g is None:
                            continue
                        r = _output_rows(modules[mid], g, mask)
                        work = torch.float64 if r.dtype == torch.float64 else torch.float32
                        r = r.to(device=device or r.device, dtype=work)
                        G = (r.T @ r).to(torch.float64)  # (out, out)
                        for key in by_module[mid]:
                            if key in sums:
                                sums[key] += G
                            else:
                                sums[key] = G.clone()
                samples += batch_size(batch)
                captured.clear()
                if progress is not None:
                    progress(samples)
    finally:
        captured.clear()
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    scale = 1.0 / max(samples * probes, 1)
    return {key: sums.pop(key).mul_(scale).cpu() for key in list(sums)}  # in place: no second copy


__all__ = ["collect_output_grams", "DEFAULT_PROBES"]
