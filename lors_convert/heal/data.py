"""What ``lors heal`` trains on, and the held-out inputs that choose its best state.

- causal LMs: text the source model writes (:func:`lors_convert.calibrate.generated.generate_corpus`,
  cached next to the output), plus the ``--data`` text unless generation is off, packed into windows
  of ``seq_len`` tokens and batches of ``batch_tokens`` (:mod:`lors_convert.calibrate.packing`); the best
  state is chosen on further generated windows (with generation off, on the last windows of the
  ``--data`` text, up to a fifth of it), never trained on, never on the probe text;
- other models: the ``--data`` inputs (text encoders: lors's shipped calibration text when none is
  given) as padded batches, a share of them held out to choose the best state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..calibrate.batches import Batch
from ..calibrate.data import CalibrationData, read_calibration, read_texts
from ..calibrate.generated import CHUNK, generate_corpus
from ..calibrate.packing import pack, window_batches
from ..calibrate.probes import CALIBRATION_TEXT
from ..errors import LorsUsageError

HELDOUT_TOKENS = 1024  # generated tokens held out to choose the best state (whole windows, at least one)


@dataclass
class HealData:
    batches: list[Batch]
    heldout: list[Batch]  # chooses the best state
    sources: list[str] = field(default_factory=list)  # what the batches were made of, for the report
    tokens: int = 0  # tokens in the batches (one epoch)
    generated_tokens: int = 0
    data_file: str | None = None
    samples: int = 0  # windows (causal LMs) or samples (other models) in the batches


@dataclass(frozen=True)
class DataRequest:
    data: Path | None = None  # --data
    generate: bool = True  # causal LMs: train on text the source writes (with --data: as well)
    generated_tokens: int = 32_768  # about 5 epochs in 30 minutes on 2 cores (docs/healing.md)
    seq_len: int = 64  # shorter windows: more text seen from its start (docs/healing.md)
    batch_tokens: int = 512
    seed: int = 0
    heldout_fraction: float | None = None  # of --data, for models that do not generate


def lm_data(teacher, tokenizer, req: DataRequest, cache_dir: Path, model_key: str, log=None) -> HealData:
    """Generated windows (and ``--data`` text) for a causal LM, packed; held-out generated windows."""
    if not req.generate and req.data is None:
        raise LorsUsageError("--no-generate needs --data: there would be nothing to train on")
    rows: list[list[int]] = []
    sources = []
    n_held = heldout_windows(req.seq_len)
    n_gen = -(-req.generated_tokens // req.seq_len) if req.generate else 0
    if n_gen:  # whole chunks of generated sequences, the nearest to the tokens asked for
        n_gen = max(1, round((n_gen + n_held) / CHUNK)) * CHUNK - n_held
    heldout_rows: list[list[int]] = []
    if req.generate:
        done = _announce(log, "generating text with the source model")
        written = generate_corpus(
            teacher, tokenizer, n_gen + n_held, req.seq_len, req.seed, cache_dir, model_key, done
        )
        rows, heldout_rows = written[:n_gen], written[n_gen:]  # the last windows are held out
        sources.append(f"{n_gen * req.seq_len} tokens written by the source model (seed {req.seed})")
    if req.data is not None:
        texts = read_texts(req.data)
        sep = getattr(tokenizer, "eos_token_id", None)
        rows += [tokenizer(t)["input_ids"] + ([sep] if sep is not None else []) for t in texts]
        sources.append(f"{req.data} ({len(texts)} lines)")
    windows = pack(rows, req.seq_len).windows
    if req.generate:
        held = pack(heldout_rows, req.seq_len).windows
    else:  # nothing generated: the last windows of --data choose the best state
        n = windows.shape[0]
        n_held = 0 if n < 2 else max(1, min(n_held, n // 5))  # at most a fifth
        windows, held = windows[: n - n_held], windows[n - n_held :]
    if not windows.shape[0] or not held.shape[0]:
        need = "one window" if req.generate else "two windows (one is held out to choose the best state)"
        raise LorsUsageError(f"{req.data}: too little text for {need} of --seq-len {req.seq_len} tokens")
    tokens = int(windows.numel())
    return HealData(
        window_batches(windows, req.batch_tokens),
        window_batches(held, req.batch_tokens),
        sources,
        tokens,
        n_gen * req.seq_len,
        str(req.data) if req.data else None,
        int(windows.shape[0]),
    )


def heldout_windows(seq_len: int) -> int:
    """Windows of ``seq_len`` tokens that hold out about ``HELDOUT_TOKENS`` tokens (at most half a
    chunk of generated sequences, so that one chunk always leaves windows to train on)."""
    return max(1, min(CHUNK // 2, HELDOUT_TOKENS // seq_len))


def input_data(req: DataRequest, tokenizer_dir: Path, text_model: bool) -> HealData:
    """``--data`` inputs for a model that does not generate (text encoders: the shipped text by default).

    The best state is chosen on a share of these inputs, never on the report's held-out inputs
    (``--heldout``): the fidelity reported after healing is measured on inputs nothing was chosen by."""
    data = req.data
    if data is None:
        if not text_model:
            raise LorsUsageError("healing this model needs --data: its inputs, as a .safetensors/.pt file")
        data = CALIBRATION_TEXT
    got: CalibrationData = read_calibration(data, tokenizer_dir, text_model, None, req.heldout_fraction)
    summary = got.summary()
    sources = [f"{summary['calibration_data']} ({summary['calibration_samples']} samples)"]
    return HealData(got.calibration, got.heldout, sources, 0, 0, str(data), got.n_calibration)


def _announce(log, what: str):
    if log is None:
        return None

    def done(n: int, total: int) -> None:
        log(f"{what}: {n}/{total} sequences")

    return done


__all__ = ["HealData", "DataRequest", "lm_data", "input_data", "heldout_windows", "HELDOUT_TOKENS"]
