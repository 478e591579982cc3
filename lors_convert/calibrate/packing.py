"""Token-packed training windows: token sequences laid end to end and cut into fixed windows.

No padding: every window holds ``seq_len`` real tokens, and a batch is ``batch_tokens // seq_len``
windows, so a step trains on a known number of tokens. Every token of the input is in exactly one
window, in order; the tail that does not fill a last window is dropped and counted (``dropped``).
Padded sentence batches (what :func:`lors_convert.calibrate.data.text_batches` makes) are unpadded
first by their ``attention_mask``.

    windows = pack(sequences, seq_len=256, separator=eos_id)   # (n, 256)
    batches = window_batches(windows, batch_tokens=2048)       # [{"input_ids", "attention_mask"}, ...]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import LorsUsageError


@dataclass
class Packed:
    windows: torch.Tensor  # (n, seq_len) int64
    dropped: int  # tokens of the tail that filled no window

    @property
    def tokens(self) -> int:
        return int(self.windows.numel())


def pack(sequences: Sequence[Sequence[int]], seq_len: int, separator: int | None = None) -> Packed:
    """The token ids of ``sequences``, concatenated (``separator`` between two sequences when given),
    cut into windows of ``seq_len``."""
    if seq_len < 2:
        raise LorsUsageError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    flat: list[int] = []
    for seq in sequences:
        if flat and separator is not None:
            flat.append(int(separator))
        flat.extend(int(t) for t in seq)
    n = len(flat) // seq_len
    windows = torch.tensor(flat[: n * seq_len], dtype=torch.long).reshape(n, seq_len)  # (n, seq_len)
    return Packed(windows, len(flat) - n * seq_len)


def unpad(batches: Sequence[dict]) -> list[list[int]]:
    """The real token ids of every row of padded ``{"input_ids", "attention_mask"}`` batches."""
    rows = []
    for b in batches:
        for ids, mask in zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), strict=True):
            row = [t for t, m in zip(ids, mask, strict=True) if m]
            if row:
                rows.append(row)
    return rows


def window_batches(windows: torch.Tensor, batch_tokens: int) -> list[dict]:
    """Consecutive windows grouped into batches of ``max(1, batch_tokens // seq_len)`` windows (the
    last may be smaller), each with an all-ones ``attention_mask``."""
    per = max(1, batch_tokens // windows.shape[1])
    return [
        {"input_ids": w, "attention_mask": torch.ones_like(w)}  # (b, seq_len)
        for w in windows.split(per)
    ]


__all__ = ["Packed", "pack", "unpad", "window_batches"]
