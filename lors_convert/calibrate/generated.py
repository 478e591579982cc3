"""Text a causal language model writes itself: the default calibration text of a causal LM, and the
data of data-free healing.

Each sequence starts from a first token drawn uniformly from the vocabulary's word-like tokens (ids
whose text starts with a letter, optionally after a space), continues greedily for ``greedy``
tokens, then samples from the model's full next-token distribution (LLM-QAT's recipe). Sampling
inverts the distribution's cumulative sum where the model runs, at uniforms drawn from a CPU
generator (``idx_b = min{j : sum_{i<=j} p_bi > u_b sum_i p_bi}``): each token is drawn with its
probability, the draws are the same on any device up to rounding, and no ``(n, V)`` distribution
is copied off a GPU for a CPU multinomial at every token. Sequences
are made in chunks of :data:`CHUNK` rows; chunk ``c`` is a pure function of ``(seed, c)`` and the
model, so ``n`` sequences are the first ``n`` of any larger request with the same seed.

The token ids are cached in a JSON file in ``cache_dir`` whose name digests the model's identity
(``model_key``), the recipe and the seed; a later call reads what is there and generates only the
missing chunks::

    windows = generate_corpus(model, tokenizer, n_sequences=64, seq_len=256, seed=0, cache_dir=out.parent)
    texts = [tokenizer.decode(w) for w in windows]

A calibrated conversion of a causal LM given no ``--calibrate`` calibrates on
:data:`CALIBRATION_SEQUENCES` generated sequences of :data:`CALIBRATION_LEN` tokens
(:func:`calibration_batches`), with :data:`CALIBRATION_PROBES` output-gradient probes per batch: they
cover what the model writes, not one genre of text (measured against lors's shipped prose, and the
amount of text, in docs/calibration.md).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import LorsError
from .batches import model_device
from .packing import window_batches

CHUNK = 64  # sequences generated together (one KV cache)
GREEDY = 3  # tokens after the first chosen greedily, before sampling
RECIPE = 2  # bumped when the recipe changes: a cache of another recipe is not reused
CALIBRATION_SEQUENCES = 2 * CHUNK  # generated sequences a calibrated conversion fits on (16,384 tokens)
CALIBRATION_LEN = 128  # tokens per sequence: the length text calibration truncates lines to
CALIBRATION_PROBES = 2  # output-gradient probes per batch on them: 4's gradient rows over 8,192 tokens


def word_like_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids below ``vocab_size`` whose text is a word start: a letter, or a space then a letter."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = []
    for i in range(vocab_size):
        if i in special:
            continue
        text = tokenizer.decode([i])
        word = text[1:] if text.startswith(" ") else text
        if word[:1].isalpha() and text.isprintable():
            ids.append(i)
    if not ids:
        raise LorsError("the tokenizer has no word-like tokens to start generated text from")
    return ids


def _vocab_size(model: nn.Module, tokenizer) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = head.weight.shape[0] if head is not None else len(tokenizer)
    return min(n, len(tokenizer))


@torch.no_grad()
def generate_chunk(
    model: nn.Module, starts: list[int], seq_len: int, generator: torch.Generator, greedy: int = GREEDY
) -> torch.Tensor:
    """``len(starts)`` sequences of ``seq_len`` tokens ``(n, seq_len)``: each start token, ``greedy``
    greedy tokens, then tokens sampled from the model's distribution (KV cache, one token a step)."""
    where = model_device(model)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor(starts, dtype=torch.long, device=where)[:, None]  # (n, 1)
    out = model(input_ids=ids, use_cache=True)
    for t in range(1, seq_len):
        logits = out.logits[:, -1].float()  # (n, V)
        if t <= greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = sample(logits, torch.rand(len(starts), 1, generator=generator, dtype=torch.float64))
        ids = torch.cat([ids, nxt[:, None]], dim=1)  # (n, t + 1)
        if t + 1 < seq_len:
            out = model(input_ids=nxt[:, None], use_cache=True, **{key: out[key]})
    return ids.cpu()


def sample(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` ``(n, V)``, drawn from their softmax by inverting its cumulative
    sum at the uniforms ``u`` ``(n, 1)`` in [0, 1); on the logits' device. A token of probability 0 is
    never drawn (the first cumulative sum that exceeds the point is taken)."""
    probs = torch.softmax(logits.double(), -1)  # (n, V)
    cdf = probs.cumsum(-1)  # (n, V)
    point = u.to(cdf.device) * cdf[:, -1:]  # (n, 1)
    return torch.searchsorted(cdf, point, right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)  # (n,)


def cache_file(cache_dir: Path, model_key: str, seq_len: int, seed: int) -> Path:
    tag = hashlib.sha256(repr((RECIPE, model_key, seq_len, seed, CHUNK, GREEDY)).encode()).hexdigest()[:16]
    return Path(cache_dir) / f".lors-generated-{tag}.json"


def _read_cache(path: Path) -> list[list[int]]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        return [list(map(int, row)) for row in data["sequences"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # a broken cache is regenerated, never trusted


def _write_cache(path: Path, rows: list[list[int]], seq_len: int, seed: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps({"recipe": RECIPE, "seq_len": seq_len, "seed": seed, "sequences": rows}))
        os.replace(tmp, path)
    except OSError as e:
        raise LorsError(f"{path}: cannot write the generated-text cache ({e.strerror or e})") from None


def generate_corpus(
    model: nn.Module,
    tokenizer,
    n_sequences: int,
    seq_len: int,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    model_key: str = "",
    progress=None,
) -> list[list[int]]:
    """``n_sequences`` token windows of ``seq_len`` ids written by ``model`` (see the module docstring),
    deterministic under ``seed``; cached in ``cache_dir`` (keyed by ``model_key``, e.g. the source's
    sha256) when given. ``progress(done, total)`` is called after each chunk."""
    path = cache_file(Path(cache_dir), model_key, seq_len, seed) if cache_dir is not None else None
    rows = _read_cache(path) if path is not None else []
    rows = [r for r in rows if len(r) == seq_len]
    rows = rows[: len(rows) - len(rows) % CHUNK]  # whole chunks only
    if len(rows) >= n_sequences:
        return rows[:n_sequences]
    was_training = model.training
    model.eval()
    starts = word_like_ids(tokenizer, _vocab_size(model, tokenizer))
    try:
        while len(rows) < n_sequences:
            chunk = len(rows) // CHUNK
            gen = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
            first = [starts[int(i)] for i in torch.randint(len(starts), (CHUNK,), generator=gen)]
            rows += generate_chunk(model, first, seq_len, gen).tolist()
            if path is not None:
                _write_cache(path, rows, seq_len, seed)
            if progress is not None:
                progress(min(len(rows), n_sequences), n_sequences)
    finally:
        model.train(was_training)
    return rows[:n_sequences]


def calibration_batches(model: nn.Module, tokenizer, batch_size: int = 16) -> list[dict]:
    """Calibration batches of generated text: ``{"input_ids", "attention_mask"}`` of ``(batch_size,
    CALIBRATION_LEN)`` windows, seed 0 (not cached: a conversion writes nothing but its output)."""
    rows = generate_corpus(model, tokenizer, CALIBRATION_SEQUENCES, CALIBRATION_LEN, seed=0)
    return window_batches(torch.tensor(rows, dtype=torch.long), batch_size * CALIBRATION_LEN)


__all__ = ["generate_corpus", "generate_chunk", "calibration_batches", "word_like_ids", "cache_file"]
__all__ += ["CHUNK", "GREEDY", "CALIBRATION_SEQUENCES", "CALIBRATION_LEN", "CALIBRATION_PROBES"]
