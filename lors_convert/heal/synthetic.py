"""Synthetic token inputs for healing: a bigram chain over the calibration tokens.

Distilling on a few hundred calibration sentences overfits them: on all-MiniLM-L6-v2 the student
reaches 0.99 embedding cosine on the calibration text while held-out text of another kind stays near
0.52. Inputs drawn from a bigram Markov chain fitted on the calibration token ids (with random jumps to
any calibration token or any vocabulary id) cover far more of the input space at no cost; the
teacher labels them like any other input.

A synthetic batch copies the layout of one calibration batch (its shape, ``attention_mask`` and
every other key) and replaces each row's real tokens by a walk of the same length. Token ids that
open every calibration row (``[CLS]``, ``<s>``) or close every row (``[SEP]``) stay in place, so no
tokenizer is needed. Batches are a pure function of ``(seed, index)``: a resumed heal sees the same
inputs as an uninterrupted one.

    chain = BigramChain.fit(calibration_batches)
    batch = chain.batch(template=calibration_batches[3], seed=0, index=17)
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..calibrate.packing import unpad
from ..errors import LorsUsageError

JUMP = 0.1  # probability that a step leaves the chain: a random calibration token (or vocabulary id)
VOCAB_JUMP = 0.3  # share of the jumps that go to any id in the span of the seen ones (unseen words)


def is_token_batch(batch) -> bool:
    """Keyword batches of integer ``input_ids`` with a matching ``attention_mask``."""
    if not isinstance(batch, Mapping):
        return False
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    return (
        isinstance(ids, torch.Tensor)
        and isinstance(mask, torch.Tensor)
        and ids.dim() == 2
        and not ids.is_floating_point()
        and tuple(ids.shape) == tuple(mask.shape)
    )


@dataclass
class BigramChain:
    """Successor lists of the calibration token ids, and the ids that frame every row."""

    successors: dict[int, list[int]]
    tokens: list[int]  # every inner token occurrence (unigram sampling)
    head: int | None  # id that opens every row, kept in place
    tail: int | None  # id that closes every row, kept in place
    low: int  # jumps to "any id" draw from [low, high): the span of the inner ids seen
    high: int

    @classmethod
    def fit(cls, batches: Sequence[Mapping]) -> BigramChain:
        if not batches or not all(is_token_batch(b) for b in batches):
            raise LorsUsageError("synthetic inputs need token batches (input_ids + attention_mask)")
        rows = unpad(batches)  # equal shapes: checked by is_token_batch
        if not rows:
            raise LorsUsageError("synthetic inputs need calibration rows with at least one real token")
        heads, tails = {r[0] for r in rows}, {r[-1] for r in rows}
        framed = all(len(r) > 1 for r in rows)  # a one-token row is neither opened nor closed
        head = heads.pop() if framed and len(heads) == 1 else None
        tail = tails.pop() if framed and len(tails) == 1 else None
        successors: dict[int, list[int]] = {}
        tokens: list[int] = []
        for r in rows:
            inner = r[(head is not None) : len(r) - (tail is not None)]
            tokens.extend(inner)
            for a, b in zip(inner, inner[1:], strict=False):
                successors.setdefault(a, []).append(b)
        if not tokens:
            raise LorsUsageError(
                "synthetic inputs need calibration rows with tokens besides the framing ones"
            )
        return cls(successors, tokens, head, tail, min(tokens), max(tokens) + 1)

    def walk(self, length: int, rng: random.Random) -> list[int]:
        """``length`` ids: follow the chain, jumping away with probability :data:`JUMP`."""
        out = [rng.choice(self.tokens)]
        while len(out) < length:
            nxt = self.successors.get(out[-1])
            if nxt and rng.random() >= JUMP:
                out.append(rng.choice(nxt))
            elif rng.random() < VOCAB_JUMP:
                out.append(rng.randrange(self.low, self.high))
            else:
                out.append(rng.choice(self.tokens))
        return out[:length]

    def batch(self, template: Mapping, seed: int, index: int) -> dict:
        """A batch laid out like ``template`` with every row's inner tokens replaced by a walk."""
        rng = random.Random(seed * 1_000_003 + index)
        ids = template["input_ids"].clone()  # (B, T)
        mask = template["attention_mask"].bool()
        for i in range(ids.shape[0]):
            where = mask[i].nonzero().flatten().tolist()
            inner = where[(self.head is not None) : len(where) - (self.tail is not None)]
            if inner:
                ids[i, inner] = torch.tensor(self.walk(len(inner), rng), dtype=ids.dtype)
        out = dict(template)
        out["input_ids"] = ids
        return out


__all__ = ["BigramChain", "is_token_batch", "JUMP", "VOCAB_JUMP"]
