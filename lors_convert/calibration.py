"""Calibration: run the source model on sample inputs and collect per-layer input Gram matrices.

For every dense owner of a stacked parameter (``nn.Linear``, HF ``Conv1D``, ``nn.Conv2d``) a
forward pre-hook adds ``X^T X`` of the inputs it sees to a float64 accumulator (each batch's product
in float32 for float32/16 models, ~3e-7 relative): streaming, no activation is stored. For ``nn.Conv2d`` the inputs are the unfolded patches ``(in*kh*kw)`` that the
kernel matrix ``(out, in*kh*kw)`` multiplies (grouped convolutions are skipped: they fall back to
the unweighted decomposition). Padding tokens are left out when the batch has an
``attention_mask`` of the same leading shape as the activations.

Inputs:

- a text file (one sample per line) for Hugging Face text models, tokenized with the model's
  tokenizer: :func:`read_texts`, :func:`text_batches`;
- a tensor file for anything else, ``.safetensors`` or ``.pt``/``.pth`` (read with
  ``weights_only=True``): :func:`tensor_batches`; a single tensor is split along dim 0, a dict of
  tensors becomes keyword batches (``input_ids``, ``attention_mask``, ...).

:func:`load_calibration` does both and splits off a held-out part for the quality report.
The Grams are keyed by the full state-dict key of the weight (``encoder.layer.0.attention.self.query.weight``),
which is what :func:`lors_convert.convert` takes as ``calibration=``.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .discovery import find_stacks
from .errors import LorsError, LorsUsageError

Batch = torch.Tensor | dict[str, torch.Tensor]

TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


OBJECTIVES = ("output", "layer")


@dataclass
class Calibration:
    """Per-weight input Gram matrices (float64, averaged over the tokens/positions seen) and, for the
    ``"output"`` objective, output-side Grams (:mod:`sensitivity`)."""

    grams: dict[str, torch.Tensor] = field(default_factory=dict)  # weight key -> (n, n)
    counts: dict[str, int] = field(default_factory=dict)  # weight key -> rows accumulated
    skipped: dict[str, str] = field(default_factory=dict)  # weight key -> why no Gram
    samples: int = 0
    out_grams: dict[str, torch.Tensor] = field(default_factory=dict)  # weight key -> (out, out)

    @property
    def objective(self) -> str:
        return "output" if self.out_grams else "layer"

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.grams[key]

    def get(self, key: str, default=None):
        return self.grams.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.grams

    def summary(self) -> dict:
        return {"samples": self.samples, "grams": len(self.grams), "objective": self.objective,
                "rows": max(self.counts.values(), default=0), "skipped": dict(self.skipped)}


def gram_owners(model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
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


def _conv1d_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return ()
    return (Conv1D,)


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """An activation ``(..., n)`` as rows ``(positions, n)``; with a ``(B, T)`` mask matching its
    leading dimensions, the real tokens only."""
    n = x.shape[-1]
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)].reshape(-1, n)
    return x.reshape(-1, n)


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
        conv1d = _conv1d_types()
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
                        for k, dil in zip(reversed(module.kernel_size), reversed(module.dilation)):
                            total = dil * (k - 1)
                            pads += [total // 2, total - total // 2]
                else:
                    pads = [padding[1], padding[1], padding[0], padding[0]]
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                x = F.pad(x, pads, mode=mode)
                padding = 0
            cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                            stride=module.stride)  # (B, in*kh*kw, L)
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
            if (memo is not None and not isinstance(module, nn.Conv2d) and memo[0] is x
                    and memo[1] == x._version and memo[2] is self.mask):
                gram, nrows = memo[3], memo[4]
            else:
                rows = self._rows(module, x.detach())
                dev = self.device or rows.device
                # the batch product in float32 (2x faster than float64 on CPU, ~3e-7 relative: below
                # the whitening floor of 1e-6), accumulated over batches in float64
                work = torch.float64 if rows.dtype == torch.float64 else torch.float32
                rows = rows.to(device=dev, dtype=work)
                gram, nrows = (rows.T @ rows).to(torch.float64), rows.shape[0]  # (n, n)
                self._memo = None if isinstance(module, nn.Conv2d) else (x, x._version, self.mask, gram, nrows)
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

    def __enter__(self) -> "GramCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def result(self, samples: int = 0) -> Calibration:
        """The mean Grams; consumes the sums (each is divided in place: no second copy at the peak)."""
        grams: dict[str, torch.Tensor] = {}
        distinct: dict[tuple, list[torch.Tensor]] = {}  # cheap fingerprint -> Grams with it
        for k in list(self.sums):
            g = self.sums.pop(k).div_(max(self.counts[k], 1)).cpu()
            # q/k/v projections see the same input: one tensor object, so one eigendecomposition later
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
        return Calibration(grams=grams, counts=dict(self.counts), skipped=skipped, samples=samples)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def run_model(model: nn.Module, batch: Batch):
    """Call ``model`` on a batch: a tensor positionally, a dict as keyword arguments."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def batch_mask(batch: Batch) -> torch.Tensor | None:
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].bool()
    return None


def batch_size(batch: Batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    return 1


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
) -> Calibration:
    """Run ``model`` (eval mode) on ``batches`` and return the stacked weights' Grams.

    ``objective="output"`` (default) also collects the output-side Grams (a second pass with
    ``probes`` backward passes per batch, :func:`lors_convert.sensitivity.collect_output_grams`), so the
    conversion minimizes the model output's error; ``"layer"``: input Grams only, each layer's own
    output error. ``device``: where the float64 accumulators live (default: the activations'
    device). ``progress(n)`` is called after each batch with the number of samples seen so far.
    """
    if objective not in OBJECTIVES:
        raise LorsUsageError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    owners = gram_owners(model, include, exclude)
    if not owners:
        raise LorsError("no stacked weights to calibrate")
    batches = list(batches)
    calibration = _input_grams(model, owners, batches, device, progress)
    if objective == "output":
        from .sensitivity import DEFAULT_PROBES, collect_output_grams

        calibration.out_grams = collect_output_grams(
            model, owners, batches, probes=DEFAULT_PROBES if probes is None else probes, seed=seed,
            device=device)
    return calibration


@torch.no_grad()
def _input_grams(model, owners, batches, device, progress) -> Calibration:
    was_training = model.training
    model.eval()
    where = model_device(model)
    samples = 0
    try:
        with GramCollector(owners, device=device) as collector:
            for batch in batches:
                batch = to_device(batch, where)
                collector.mask = batch_mask(batch)
                run_model(model, batch)
                samples += batch_size(batch)
                if progress is not None:
                    progress(samples)
            collector.mask = None
            if samples == 0:
                raise LorsUsageError("the calibration data has no samples")
            return collector.result(samples)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- input helpers

def read_texts(path: str | Path) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file (``#`` starts no comment: text is text)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise LorsUsageError(f"{path}: no text lines")
    return texts


def text_batches(tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """Tokenize ``texts`` into padded keyword batches (``input_ids``, ``attention_mask``, ...)."""
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batches.append(dict(enc))
    return batches


def read_tensors(path: str | Path) -> torch.Tensor | dict[str, torch.Tensor]:
    """Inputs from ``.safetensors`` or a ``.pt`` file (``weights_only=True``): a tensor or a dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
    else:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickles of code objects etc.
            raise LorsUsageError(f"{path}: cannot read inputs with weights_only=True ({e}); save plain "
                                 "tensors or a dict of tensors") from e
    if isinstance(data, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in data):
        data = torch.cat([t if t.dim() else t[None] for t in data]) if len({tuple(t.shape[1:]) for t in data}) == 1 \
            else {str(i): t for i, t in enumerate(data)}
    if isinstance(data, Mapping):
        data = dict(data)
        if len(data) == 1 and next(iter(data)) in ("input", "inputs", "x"):
            data = next(iter(data.values()))
        elif not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise LorsUsageError(f"{path}: expected a tensor or a dict of tensors")
    elif not isinstance(data, torch.Tensor):
        raise LorsUsageError(f"{path}: expected a tensor or a dict of tensors, got {type(data).__name__}")
    return data


def n_samples(data: torch.Tensor | dict[str, torch.Tensor]) -> int:
    if isinstance(data, torch.Tensor):
        return int(data.shape[0])
    sizes = {int(v.shape[0]) for v in data.values()}
    if len(sizes) != 1:
        raise LorsUsageError(f"input tensors disagree on the number of samples: {sorted(sizes)}")
    return sizes.pop()


def tensor_batches(data: torch.Tensor | dict[str, torch.Tensor], batch_size: int = 16,
                   index: Sequence[int] | None = None) -> list[Batch]:
    """Split samples (dim 0) into batches; ``index`` selects and orders the samples."""
    n = n_samples(data)
    index = list(range(n)) if index is None else list(index)
    out: list[Batch] = []
    for start in range(0, len(index), batch_size):
        sel = torch.tensor(index[start:start + batch_size], dtype=torch.long)
        if isinstance(data, torch.Tensor):
            out.append(data[sel])
        else:
            out.append({k: v[sel] for k, v in data.items()})
    return out


def split_heldout(n: int, heldout: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic disjoint split of ``range(n)`` into (calibration, held-out) indices."""
    if not 0.0 <= heldout < 1.0:
        raise LorsUsageError(f"held-out fraction must be in [0, 1), got {heldout}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_held = int(round(n * heldout))
    if heldout > 0 and n >= 2:
        n_held = min(max(n_held, 1), n - 1)
    held = sorted(order[:n_held])
    calib = sorted(order[n_held:])
    return calib, held


@dataclass
class CalibrationData:
    """Batches to calibrate on and disjoint batches to measure fidelity on."""

    calibration: list[Batch]
    heldout: list[Batch]
    kind: str  # "text" or "tensor"
    source: str = ""
    n_calibration: int = 0
    n_heldout: int = 0


def load_calibration(
    path: str | Path,
    tokenizer=None,
    batch_size: int = 16,
    max_length: int = 128,
    heldout: float = 0.2,
    heldout_path: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> CalibrationData:
    """Read calibration inputs and split off a held-out part (or read it from ``heldout_path``).

    Tensor files (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) are taken as model inputs; anything
    else as text, one sample per line, which needs the model's ``tokenizer``. ``limit`` caps the
    number of calibration samples (after the split).
    """
    path = Path(path)
    if not path.exists():
        raise LorsUsageError(f"calibration data {str(path)!r} does not exist")
    is_tensor = path.suffix in TENSOR_SUFFIXES
    if is_tensor:
        data = read_tensors(path)
        n = n_samples(data)
        if heldout_path is not None:
            held_data = read_tensors(heldout_path)
            calib_idx = list(range(n))[:limit]
            return CalibrationData(tensor_batches(data, batch_size, calib_idx),
                                   tensor_batches(held_data, batch_size), "tensor", str(path),
                                   len(calib_idx), n_samples(held_data))
        calib_idx, held_idx = split_heldout(n, heldout, seed)
        calib_idx = calib_idx[:limit]
        return CalibrationData(tensor_batches(data, batch_size, calib_idx),
                               tensor_batches(data, batch_size, held_idx), "tensor", str(path),
                               len(calib_idx), len(held_idx))
    if tokenizer is None:
        raise LorsUsageError(f"{path}: text calibration data needs a tokenizer (a Hugging Face text model); "
                             "for other models give a tensor file (.safetensors or .pt) of inputs")
    texts = read_texts(path)
    if heldout_path is not None:
        held_texts = read_texts(heldout_path)
        calib_texts = texts[:limit]
    else:
        calib_idx, held_idx = split_heldout(len(texts), heldout, seed)
        calib_texts = [texts[i] for i in calib_idx][:limit]
        held_texts = [texts[i] for i in held_idx]
    overlap = set(calib_texts) & set(held_texts)
    if overlap:
        held_texts = [t for t in held_texts if t not in overlap]
    return CalibrationData(text_batches(tokenizer, calib_texts, batch_size, max_length),
                           text_batches(tokenizer, held_texts, batch_size, max_length) if held_texts else [],
                           "text", str(path), len(calib_texts), len(held_texts))


__all__ = ["Calibration", "CalibrationData", "GramCollector", "collect_grams", "gram_owners", "read_texts",
           "text_batches", "read_tensors", "tensor_batches", "split_heldout", "load_calibration", "run_model",
           "calibrated_convert"]


def calibrated_convert(model: nn.Module, data: CalibrationData, *, refine: int = 0,
                       budget: float | None = None, rank: int | None = 8, progress=None,
                       objective: str = "output", probes: int | None = None, **convert_kwargs):
    """The whole ``lors convert --calibrate DATA`` path in one call.

    Collects the Grams on ``data.calibration`` (``objective``, ``probes``: see :func:`collect_grams`),
    records the source outputs on ``data.heldout``,
    converts ``model`` in place (``convert(..., calibration=, refine=, budget=)``; other keyword
    arguments go to :func:`lors_convert.convert`) and adds the held-out fidelity to
    ``report.quality`` (``heldout_cosine`` for text encoders, ``heldout_rel_error`` always).
    Returns ``(lors_model, report)``.
    """
    from .convert import convert
    from .quality import fidelity, reference_outputs

    include, exclude = convert_kwargs.get("include"), convert_kwargs.get("exclude")
    calibration = collect_grams(model, data.calibration, include=include, exclude=exclude,
                                objective=objective, probes=probes)
    reference = reference_outputs(model, data.heldout) if data.heldout else None
    model, report = convert(model, rank=rank, calibration=calibration, refine=refine, budget=budget,
                            progress=progress, **convert_kwargs)
    report.quality["calibration_data"] = data.source
    report.quality["calibration_kind"] = data.kind
    report.quality["calibration_samples"] = data.n_calibration
    report.quality["objective"] = calibration.objective
    if reference is not None:
        report.quality.update(fidelity(model, reference))
    for key, why in sorted(calibration.skipped.items())[:5]:
        report.warnings.append(f"{key}: no calibration Gram ({why}); converted with the unweighted fit")
    return model, report
