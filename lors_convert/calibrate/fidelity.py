"""Function-level fidelity: how close a converted model's function stays to its source's on held-out inputs.

The source and the converted model run side by side on the same batches (nothing large is stored:
a causal LM's logits over its vocabulary would not fit). What is compared depends on the kind of
model, read off its output (:func:`output_kind`), in the metric its users judge by:

- ``causal_lm`` (``logits (B, T, V)`` of a model that generates, token batches): perplexity of
  source and converted on the batch's own next tokens, next-token top-1 agreement and mean
  ``KL(source || converted)`` per predicted token;
- ``encoder`` (a ``(B, T, H)`` output with an ``attention_mask``): cosine of mean-pooled embeddings
  (sentence-transformers pooling), mean and 5th percentile over samples;
- ``classifier`` (``(B, C)`` logits): top-1 agreement;
- every model: relative output error ``||y - y_src|| / ||y_src||`` per sample (real tokens only).

Use (conversion is in place, so the reference keeps a copy of the source, or, given a
:class:`~lors_convert.io.spill.Spill`, the source's outputs on disk)::

    ref = reference_outputs(model, heldout_batches)
    lors_model, report = convert(model, ...)
    report.quality.update(fidelity(lors_model, ref))
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..heap import trim
from ..io.memory import KeptResults
from ..io.spill import Spill
from .batches import (
    Batch,
    batch_mask,
    finite,
    mean_pool,
    model_device,
    positions,
    primary_output,
    run_model,
    split_batch,
    to_device,
)

POOR_SIMILARITY = 0.9  # cosine or top-1 agreement below this: warn
POOR_PPL_RATIO = 1.25  # converted perplexity above this multiple of the source's: warn
# how a model's outputs on a list of pieces are made: ``(i, output on pieces[i])`` in any order (one
# call per piece, or :func:`lors_convert.calibrate.streamed.lockstep` for a model streamed from disk)
Runner = Callable[[list[Batch]], Iterable[tuple[int, object]]]
LOGPROB_ELEMENTS = 1 << 20  # log-probabilities computed together (8 MB of float64)
PIECE_POSITIONS = 128  # tokens compared at once: a causal LM's logits over them (SmolLM2: 25 MB a copy)


@dataclass
class Reference:
    """The source model (or its recorded outputs) and the held-out batches to compare a converted
    model with."""

    source: nn.Module | None
    batches: list[Batch]
    label: str = "held-out inputs"  # where the batches came from, for the report
    synthetic: bool = False  # the batches are made up (no real data was given)
    recorded: Spill | None = None  # without a source: its outputs, one entry per piece (:func:`pieces`)
    kinds: dict[int, str] = field(default_factory=dict)  # the outputs' kinds, by piece
    # bytes of the source's outputs kept in memory for the next fidelity pass (0: the source reruns on
    # each pass); for callers that measure many models against one reference
    keep_bytes: int = 0
    kept: KeptResults = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.kept = KeptResults(self.keep_bytes)

    def output(self, i: int, batch: Batch) -> tuple[str, torch.Tensor]:
        """The kind and the compared output (float32, CPU) of the source on piece ``i``."""
        if self.source is None:
            return self.kinds[i], self.recorded.get(str(i))["y"]
        (y,) = self.kept.get(i if self.keep_bytes else None, lambda: [self._run(i, batch)])
        return self.kinds[i], y

    @torch.no_grad()
    def prime(self) -> None:
        """Run the source on every piece now, keeping its outputs while they fit, and check that they
        are finite: inputs it cannot take, or that overflow it, fail here, before any conversion work
        (:func:`check_inputs` for a reference that measures many models). Nothing to do without a source."""
        if self.source is None:
            return
        was_training = self.source.training
        self.source.eval()
        try:
            for i, batch in enumerate(pieces(self.batches)):
                finite(self.output(i, batch)[1])
        finally:
            self.source.train(was_training)

    def _run(self, i: int, batch: Batch) -> torch.Tensor:
        kind, y = compared_output(
            self.source, run_model(self.source, to_device(batch, model_device(self.source))), batch
        )
        self.kinds[i] = kind
        return y


def pieces(batches: Iterable[Batch]) -> Iterable[Batch]:
    """The batches cut to at most ``PIECE_POSITIONS`` tokens (pixels) each; every metric is a sum or
    a list over samples, so the pieces give the batches' figures."""
    for batch in batches:
        yield from split_batch(batch, max(1, PIECE_POSITIONS // positions(batch)))


def compared_output(model: nn.Module, out, batch: Batch) -> tuple[str, torch.Tensor]:
    """The kind of a model output and the tensor fidelity compares (float32, CPU): a causal LM's logits,
    else :func:`primary_output`."""
    kind = output_kind(model, out, batch)
    return kind, _compared(out, kind)


def _compared(out, kind: str) -> torch.Tensor:
    y = out.logits if kind == "causal_lm" else primary_output(out)
    return y.detach().float().cpu()


@torch.no_grad()
def reference_outputs(
    model: nn.Module,
    batches: Iterable[Batch],
    label: str = "held-out inputs",
    synthetic: bool = False,
    spill: Spill | None = None,
    run: Runner | None = None,
) -> Reference:
    """A reference for ``model`` as it is now, since conversion changes it in place: a frozen copy,
    or with ``spill`` its outputs on ``batches`` written there (the source need not stay in memory;
    inputs it cannot run on, or that overflow it, fail here). ``run``: how the model's outputs on
    the pieces are made (default: one call per piece; see :data:`Runner`)."""
    batches = list(batches)
    if spill is None:
        return Reference(copy.deepcopy(model).eval().requires_grad_(False), batches, label, synthetic)
    was_training = model.training
    model.eval()
    kinds = {}
    try:
        parts = list(pieces(batches))
        for i, out in (run or _one_by_one(model))(parts):
            kind, y = compared_output(model, out, parts[i])
            spill.put(str(i), {"y": finite(y)})
            kinds[i] = kind
            del out, y
            trim()
    finally:
        model.train(was_training)
    return Reference(None, batches, label, synthetic, recorded=spill, kinds=kinds)


def _one_by_one(model: nn.Module) -> Runner:
    where = model_device(model)
    return lambda parts: ((i, run_model(model, to_device(batch, where))) for i, batch in enumerate(parts))


@torch.no_grad()
def check_inputs(model: nn.Module, batches: Iterable[Batch]) -> None:
    """Run ``model`` once on every batch: inputs it cannot take, or that overflow it, fail here, before
    any conversion work, not after."""
    was_training = model.training
    model.eval()
    where = model_device(model)
    try:
        for batch in batches:
            out = run_model(model, to_device(batch, where))
            finite(
                getattr(out, "logits", None)
                if isinstance(getattr(out, "logits", None), torch.Tensor)
                else primary_output(out)
            )
    finally:
        model.train(was_training)


def is_causal_lm(model: nn.Module) -> bool:
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    return bool(
        callable(can_generate) and can_generate() and not getattr(config, "is_encoder_decoder", False)
    )


def output_kind(model: nn.Module, out, batch: Batch) -> str:
    """``causal_lm``, ``encoder``, ``classifier`` or ``other`` (see the module docstring)."""
    logits = getattr(out, "logits", None)
    if (
        isinstance(logits, torch.Tensor)
        and logits.dim() == 3
        and isinstance(batch, Mapping)
        and "input_ids" in batch
        and is_causal_lm(model)
    ):
        return "causal_lm"
    y = primary_output(out)
    mask = batch_mask(batch)
    if mask is not None and y.dim() == 3 and tuple(y.shape[:2]) == tuple(mask.shape):
        return "encoder"
    if y.dim() == 2 and y.shape[1] >= 2:
        return "classifier"
    return "other"


@dataclass
class _Sums:
    """Running sums over the held-out batches."""

    rel: list[torch.Tensor] = field(default_factory=list)  # per sample
    cosine: list[torch.Tensor] = field(default_factory=list)  # per sample (encoders)
    agree: float = 0.0  # top-1 agreements (tokens or samples)
    compared: int = 0  # how many top-1 decisions were compared
    nll_source: float = 0.0
    nll_converted: float = 0.0
    kl: float = 0.0
    tokens: int = 0  # predicted tokens (causal LMs)


def _rel_error(y: torch.Tensor, y_ref: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per sample ``||y - y_ref|| / ||y_ref||`` (B,), over real tokens when a mask fits; one sample's
    difference at a time (a batch's is as large as its logits)."""
    masked = mask is not None and y.dim() >= 3 and tuple(y.shape[:2]) == tuple(mask.shape)
    out = []
    for b in range(y.shape[0]):
        yb, rb = (y[b][mask[b].bool()], y_ref[b][mask[b].bool()]) if masked else (y[b], y_ref[b])  # (T, ...)
        num, den = torch.linalg.vector_norm(yb - rb), torch.linalg.vector_norm(rb)
        out.append(num / den.clamp_min(1e-15))
    return torch.stack(out) if out else y.new_zeros(0)


def _next_token(
    sums: _Sums, logits: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None
) -> None:
    """Causal-LM sums, a few positions at a time: float64 log-probabilities ``(n, V)`` of
    ``LOGPROB_ELEMENTS`` at most, not a sample's or a batch's."""
    rows = max(1, LOGPROB_ELEMENTS // logits.shape[-1])
    for b in range(ids.shape[0]):
        keep = torch.ones(ids.shape[1] - 1, dtype=torch.bool) if mask is None else mask[b, 1:] & mask[b, :-1]
        if not keep.any():
            continue
        targets, converted, source = ids[b, 1:][keep], logits[b, :-1][keep], ref[b, :-1][keep]  # (n,), (n, V)
        for start in range(0, targets.numel(), rows):
            target = targets[start : start + rows, None]  # (c, 1)
            lp_c = F.log_softmax(converted[start : start + rows].double(), dim=-1)  # (c, V)
            lp_s = F.log_softmax(source[start : start + rows].double(), dim=-1)
            sums.nll_converted -= float(lp_c.gather(1, target).sum())
            sums.nll_source -= float(lp_s.gather(1, target).sum())
            sums.kl += float((lp_s.exp() * (lp_s - lp_c)).sum())
            sums.agree += float((lp_c.argmax(-1) == lp_s.argmax(-1)).sum())
        sums.compared += int(targets.numel())
        sums.tokens += int(targets.numel())


@torch.no_grad()
def fidelity(
    model: nn.Module, reference: Reference, prefix: str = "heldout", run: Runner | None = None
) -> dict:
    """Compare ``model`` with the reference's source on its batches; a flat dict for ``report.quality``.

    Keys (``{prefix}_...``): ``kind``, ``probe``, ``synthetic``, ``samples``, ``rel_error`` (mean over
    samples); encoders ``cosine`` (mean), ``cosine_p05``, ``cosine_min``; classifiers and causal LMs
    ``top1``; causal LMs ``ppl_source``, ``ppl``, ``ppl_ratio``, ``kl``, ``tokens``. ``run``: how
    ``model``'s outputs on the pieces are made (:data:`Runner`; default one call per piece).
    """
    if not reference.batches:
        return {}
    modes = [(m, m.training) for m in (model, reference.source) if m is not None]
    for m, _ in modes:
        m.eval()
    sums, kind = _Sums(), "other"
    try:
        parts = list(pieces(reference.batches))
        for i, out in (run or _one_by_one(model))(parts):
            batch = parts[i]
            kind, y_ref = reference.output(i, batch)
            y_ref = finite(y_ref)
            y = _compared(out, kind)  # judged as the source's output is
            mask = batch_mask(batch)
            mask = mask.cpu() if mask is not None else None
            sums.rel.append(_rel_error(y, y_ref, mask))
            if kind == "causal_lm":
                _next_token(sums, y, y_ref, batch["input_ids"].cpu(), mask)
            elif kind == "encoder":
                sums.cosine.append(F.cosine_similarity(mean_pool(y, mask), mean_pool(y_ref, mask), dim=-1))
            elif kind == "classifier":
                sums.agree += float((y.argmax(-1) == y_ref.argmax(-1)).sum())
                sums.compared += int(y.shape[0])
            del out, y, y_ref
            trim()  # a piece's logits and work are freed: the next piece starts from the same RSS
    finally:
        for m, training in modes:
            m.train(training)
    return _summary(sums, kind, reference, prefix)


def _summary(sums: _Sums, kind: str, reference: Reference, prefix: str) -> dict:
    rel = torch.cat(sums.rel)
    result: dict = {
        "kind": kind,
        "probe": reference.label,
        "synthetic": reference.synthetic,
        "samples": int(rel.numel()),
        "rel_error": float(rel.mean()),
    }
    if sums.cosine:
        cos = torch.cat(sums.cosine).double()
        result.update(
            cosine=float(cos.mean()), cosine_p05=float(torch.quantile(cos, 0.05)), cosine_min=float(cos.min())
        )
    if sums.compared:
        result["top1"] = sums.agree / sums.compared
    if sums.tokens:
        ppl_source, ppl = math.exp(sums.nll_source / sums.tokens), math.exp(sums.nll_converted / sums.tokens)
        result.update(
            ppl_source=ppl_source,
            ppl=ppl,
            ppl_ratio=ppl / ppl_source,
            kl=sums.kl / sums.tokens,
            tokens=sums.tokens,
        )
    for k, v in result.items():
        if isinstance(v, float) and not math.isfinite(v):
            result[k] = None
    return {f"{prefix}_{k}": v for k, v in result.items()}


def fidelity_score(quality: dict, prefix: str = "heldout") -> float:
    """One number to keep the best of (higher is better): embedding cosine for encoders, minus the
    mean KL for causal LMs, else minus the relative output error."""
    kind = quality.get(f"{prefix}_kind")
    key, sign = {"encoder": ("cosine", 1.0), "causal_lm": ("kl", -1.0)}.get(kind, ("rel_error", -1.0))
    value = quality.get(f"{prefix}_{key}")
    return -math.inf if value is None else sign * value


def fidelity_problems(quality: dict, prefix: str = "heldout") -> list[str]:
    """What in a fidelity dict is poor enough that the model may not be usable (empty if nothing)."""
    problems = []
    for key, what in (("cosine", "embedding cosine"), ("top1", "top-1 agreement")):
        value = quality.get(f"{prefix}_{key}")
        if value is not None and value < POOR_SIMILARITY:
            problems.append(f"{what} {value:.3f} (< {POOR_SIMILARITY})")
    ratio = quality.get(f"{prefix}_ppl_ratio")
    if ratio is not None and ratio > POOR_PPL_RATIO:
        problems.append(f"perplexity {ratio:.3g}x the source's (> {POOR_PPL_RATIO}x)")
    if quality.get(f"{prefix}_samples") and any(quality.get(f"{prefix}_{k}") is None for k in ("rel_error",)):
        problems.append("outputs are not finite")
    return problems


__all__ = [
    "Reference",
    "reference_outputs",
    "compared_output",
    "check_inputs",
    "fidelity",
    "fidelity_problems",
    "fidelity_score",
    "output_kind",
    "is_causal_lm",
    "POOR_SIMILARITY",
    "POOR_PPL_RATIO",
]
