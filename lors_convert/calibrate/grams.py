"""Calibration: run the source model on sample inputs and collect per-layer input Gram matrices.

For every dense owner of a stacked parameter (``nn.Linear``, HF ``Conv1D``, ``nn.Conv2d``) a
forward pre-hook adds ``X^T X`` of the inputs it sees to an accumulator (float32 for float32/16
models, float64 for float64 ones; the fits floor and damp eigenvalues far above float32's rounding):
streaming, no activation is stored. For ``nn.Conv2d`` the inputs are the unfolded patches ``(in*kh*kw)`` that the
kernel matrix ``(out, in*kh*kw)`` multiplies (grouped convolutions are skipped: they fall back to
the unweighted decomposition). Padding tokens are left out when the batch has an
``attention_mask`` of the same leading shape as the activations.

The inputs come from :mod:`.data`; with ``objective="output"`` a second pass collects the
output-gradient Grams (:mod:`.sensitivity`). The Grams are keyed by the full state-dict key of the weight (``encoder.layer.0.attention.self.query.weight``),
which is what :func:`lors_convert.convert` takes as ``calibration=``. Given a
:class:`~lors_convert.io.spill.Spill`, finished Grams go to disk in float32 (:mod:`.spilled`)
instead of staying in memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..discover.stacks import find_stacks
from ..errors import LorsError, LorsUsageError
from ..io.memory import available_bytes
from ..io.spill import Spill
from ..layers import hf_conv1d_types
from ..options import OBJECTIVES
from .accumulate import UpperBlocks, add_gram, all_finite_sum, completed
from .batches import (
    Batch,
    batch_mask,
    batch_size,
    body_holding,
    model_device,
    run_model,
    to_device,
    token_rows,
)
from .sensitivity import DEFAULT_PROBES, collect_output_grams, in_width, module_groups
from .spilled import SpilledGrams, spill_grams


@dataclass
class Calibration:
    """Per-weight input Gram matrices (float64, averaged over the tokens/positions seen) and, for the
    ``"output"`` objective, output-side Grams (:mod:`sensitivity`); in memory, or on disk
    (:class:`~.spilled.SpilledGrams`, whose :meth:`load` the fits read)."""

    grams: Mapping[str, torch.Tensor] = field(default_factory=dict)  # weight key -> (n, n)
    counts: dict[str, int] = field(default_factory=dict)  # weight key -> rows accumulated
    skipped: dict[str, str] = field(default_factory=dict)  # weight key -> why no Gram
    samples: int = 0
    out_grams: Mapping[str, torch.Tensor] = field(default_factory=dict)  # weight key -> (out, out)

    @property
    def objective(self) -> str:
        return "output" if self.out_grams else "layer"

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.grams[key]

    def get(self, key: str, default=None):
        return self.grams.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.grams

    def stored(self, key: str, output: bool = False) -> tuple[int, Callable] | None:
        """For a spilled Gram, its side ``n``, a function reading it from disk (float32) and one
        reading its Cholesky factor given the ridge's ``damp`` (:meth:`SpilledGrams.factor`); None when
        the Grams are in memory."""
        grams = self.out_grams if output else self.grams
        if not (isinstance(grams, SpilledGrams) and key in grams):
            return None
        return grams.size(key), functools.partial(grams.load, key), functools.partial(grams.factor, key)

    def summary(self) -> dict:
        return {
            "samples": self.samples,
            "grams": len(self.grams),
            "objective": self.objective,
            "rows": max(self.counts.values(), default=0),
            "skipped": dict(self.skipped),
        }


def gram_owners(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> dict[str, nn.Module]:
    """Weight key -> owning module, for every >= 2-D stacked weight whose owner we can hook."""
    owners: dict[str, nn.Module] = {}
    for stack in find_stacks(model, include, exclude):
        for sp in stack.params:
            if sp.attr != "weight":
                continue
            for member in stack.members:
                path = f"{member}.{sp.owner_relpath}" if sp.owner_relpath else member
                owners[f"{member}.{sp.relname}"] = model.get_submodule(path)
    return owners


class GramCollector:
    """Forward pre-hooks that accumulate ``X^T X`` per owner; use as a context manager."""

    def __init__(self, owners: Mapping[str, nn.Module], device: torch.device | str | None = None) -> None:
        self.owners = dict(owners)
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.skipped: dict[str, str] = {}
        self.mask: torch.Tensor | None = None  # (B, T) bool of real tokens for the current batch
        self._handles = []
        self._memo: tuple | None = None  # (input, its version, mask, Gram, rows) of the last Linear input
        conv1d = hf_conv1d_types()
        for key, module in self.owners.items():
            if isinstance(module, nn.Conv2d):
                if module.groups != 1:
                    self.skipped[key] = f"grouped Conv2d (groups={module.groups}): no single input Gram"
                    continue
            elif not isinstance(module, (nn.Linear,) + conv1d):
                self.skipped[key] = f"{type(module).__name__} inputs are not collected"
                continue
            self._handles.append(module.register_forward_pre_hook(self._hook(key, module)))

    def _rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.Conv2d):
            if x.dim() == 3:
                x = x.unsqueeze(0)
            padding = module.padding
            if module.padding_mode != "zeros" or isinstance(padding, str):
                if isinstance(padding, str):  # "same"/"valid": reproduce with explicit padding
                    if padding == "valid":
                        pads = [0, 0, 0, 0]
                    else:
                        pads = []
                        for k, dil in zip(
                            reversed(module.kernel_size), reversed(module.dilation), strict=False
                        ):
                            total = dil * (k - 1)
                            pads += [total // 2, total - total // 2]
                else:
                    pads = [padding[1], padding[1], padding[0], padding[0]]
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                x = F.pad(x, pads, mode=mode)
                padding = 0
            cols = F.unfold(
                x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
            )  # (B, in*kh*kw, L)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return token_rows(x, self.mask)

    def _hook(self, key: str, module: nn.Module):
        def hook(mod, args, kwargs=None):
            if not args:
                return None
            x = args[0]
            if not isinstance(x, torch.Tensor):
                return None
            # q/k/v projections are called on the same tensor: its Gram is computed once per batch
            memo = self._memo
            if (
                memo is not None
                and not isinstance(module, nn.Conv2d)
                and memo[0] is x
                and memo[1] == x._version
                and memo[2] is self.mask
            ):
                gram, nrows = memo[3], memo[4]
            else:
                rows = self._rows(module, x.detach())
                dev = self.device or rows.device
                # float32 for float32/16 models: faster than float64, and its rounding lies far below
                # the whitening floor (docs/calibration.md, measurements behind the constants)
                work = torch.float64 if rows.dtype == torch.float64 else torch.float32
                rows = rows.to(device=dev, dtype=work)
                gram, nrows = add_gram(None, rows), rows.shape[0]  # (n, n), upper blocks: see result()
                self._memo = (
                    None if isinstance(module, nn.Conv2d) else (x, x._version, self.mask, gram, nrows)
                )
            if key in self.sums:
                self.sums[key] += gram
            else:
                self.sums[key] = gram.clone()  # the memo's gram may be added to another key's sum
            self.counts[key] = self.counts.get(key, 0) + nrows
            return None

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._memo = None  # drop the last activation

    def __enter__(self) -> GramCollector:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def result(
        self, samples: int = 0, spill: Spill | None = None, into: SpilledGrams | None = None
    ) -> Calibration:
        """The mean Grams (float64 in memory, or on ``spill``, added to ``into`` when given); consumes
        the sums."""
        grams: dict[str, torch.Tensor] = {}
        distinct: dict[tuple, list[torch.Tensor]] = {}  # cheap fingerprint -> Grams with it
        for k in list(self.sums):
            g = completed(self.sums.pop(k)).div_(max(self.counts[k], 1)).cpu()
            if spill is None:
                g = g.to(torch.float64)
            # q/k/v projections see the same input: one tensor object, so one square root later
            fingerprint = (tuple(g.shape), float(g.sum()), float(g.diagonal().sum()))
            bucket = distinct.setdefault(fingerprint, [])
            same = next((d for d in bucket if torch.equal(d, g)), None)
            if same is None:
                bucket.append(g)
            grams[k] = g if same is None else same
        skipped = dict(self.skipped)
        for key in self.owners:
            if key not in grams and key not in skipped:
                skipped[key] = "never reached by the calibration inputs"
        stored = spill_grams(grams, spill, "input", into=into) if spill is not None else grams
        return Calibration(grams=stored, counts=dict(self.counts), skipped=skipped, samples=samples)


def collect_grams(
    model: nn.Module,
    batches: Iterable[Batch],
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
    objective: str = "output",
    probes: int | None = None,
    seed: int = 0,
    spill: Spill | None = None,
) -> Calibration:
    """Run ``model`` (eval mode) on ``batches`` and return the stacked weights' Grams.

    ``objective="output"`` (default) also collects the output-side Grams (a second pass with
    ``probes`` backward passes per batch, :func:`lors_convert.calibrate.sensitivity.collect_output_grams`), so the
    conversion minimizes the model output's error; ``"layer"``: input Grams only, each layer's own
    output error. ``device``: where the accumulators live (default: the activations' device).
    ``progress(n)`` is called after each batch with the number of samples seen so far.
    ``spill``: keep the finished Grams on disk there (:mod:`.spilled`), not in memory; the
    output-gradient pass then holds at most the model's size of accumulators (more passes when the
    model's output Grams are larger, see :func:`~.sensitivity.collect_output_grams`).
    """
    if objective not in OBJECTIVES:
        raise LorsUsageError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    owners = gram_owners(model, include, exclude)
    if not owners:
        raise LorsError("no stacked weights to calibrate")
    batches = list(batches)
    budget = accumulator_budget(model) if spill is not None else None
    calibration = _input_grams(model, owners, batches, device, progress, spill, budget)
    if objective == "output":
        probes = DEFAULT_PROBES if probes is None else probes
        if spill is None:
            out_grams = collect_output_grams(model, owners, batches, probes=probes, seed=seed, device=device)
            _check_finite(out_grams, "output-gradient")
            calibration.out_grams = out_grams
        else:  # at most the accumulator budget at once, each group spilled when its pass ends
            stored = SpilledGrams(spill, "output")

            def finished(grams: Iterator[tuple[str, torch.Tensor]]) -> None:
                def checked():
                    for key, g in grams:
                        _check_finite({key: g}, "output-gradient")
                        yield key, g

                spill_grams(checked(), spill, "output", into=stored)

            collect_output_grams(
                model,
                owners,
                batches,
                probes=probes,
                seed=seed,
                device=device,
                float64=False,
                max_bytes=budget,
                finished=finished,
            )
            calibration.out_grams = stored
    return calibration


def accumulator_budget(model: nn.Module) -> int:
    """Bytes of Gram accumulators a spilled collection holds at once: the model's own size, and no
    more than a third of the memory still available (a model that fills most of the machine
    collects its Grams in more passes instead of running out; completing a sum into its matrix and
    decomposing it take about as much again)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    free = available_bytes()
    return max(1, size if free is None else min(size, free // 3))


def _check_finite(grams: Mapping[str, torch.Tensor | UpperBlocks], kind: str) -> None:
    bad = next((key for key, g in grams.items() if not all_finite_sum(g)), None)
    if bad is not None:  # the activations overflowed: a fit would write NaN factors
        raise LorsError(
            f"the {kind} Gram of {bad!r} is not finite: the model overflows on the calibration inputs"
        )


@torch.no_grad()
def _input_grams(model, owners, batches, device, progress, spill, max_bytes) -> Calibration:
    """The input Grams: one pass over ``batches``, or, when ``max_bytes`` of accumulators cannot hold
    every owner's (spilled collections only), one pass per group of owners in model order, each
    group's Grams spilled as its pass ends."""
    groups = module_groups(model, owners, max_bytes, width=in_width) if spill is not None else [None]
    was_training = model.training
    model.eval()
    where = model_device(model)
    result = Calibration()
    try:
        for group in groups:
            part = owners if group is None else {k: m for k, m in owners.items() if id(m) in group}
            samples = 0
            with GramCollector(part, device=device) as collector:
                for batch in batches:
                    batch = to_device(batch, where)
                    collector.mask = batch_mask(batch)
                    run_model(body_holding(model, part.values(), batch), batch)  # no head needed
                    samples += batch_size(batch)
                    if progress is not None and group is groups[-1]:
                        progress(samples)
                collector.mask = None
                if samples == 0:
                    raise LorsUsageError("the calibration data has no samples")
                _check_finite(collector.sums, "input")
                into = result.grams if isinstance(result.grams, SpilledGrams) else None
                done = collector.result(samples, spill, into=into)
            result.grams = done.grams
            result.counts.update(done.counts)
            result.skipped.update(done.skipped)
            result.samples = samples
        return result
    finally:
        model.train(was_training)


__all__ = ["Calibration", "GramCollector", "collect_grams", "gram_owners", "OBJECTIVES"]
