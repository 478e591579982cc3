"""Resident memory of a loaded LORS model: about the checkpoint's tensor bytes (each tensor held once,
no dense weight formed), measured in a fresh process around ``lors.load`` and a forward pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import lors_convert
from lors_convert.checkpoint import Checkpoint
from lors_convert.counting import count_parameters

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import torch
import lors_convert
from lors_convert.checkpoint import load
from transformers import LlamaConfig, LlamaForCausalLM

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
warm = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, vocab_size=50)).eval()
ids = torch.randint(0, 50, (1, 8))
with torch.no_grad():
    warm(input_ids=ids)  # kernels, thread pools and transformers' modules before the baseline
del warm
before = rss()
model = load(sys.argv[1])
after_load = rss()
with torch.no_grad():
    model(input_ids=ids)  # reads every weight: their pages are resident now
after_forward = rss()
print(json.dumps({"load": after_load - before, "forward": after_forward - before}))
"""


def big_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=6,
        vocab_size=8000,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def test_resident_memory_after_load_is_the_checkpoint_tensor_bytes(tmp_path):
    model = big_llama()
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    lors_model, _ = lors_convert.convert(model, rank=16)
    lors_model.save_pretrained(tmp_path / "big.lors")  # an in-memory conversion: config.json written too
    ckpt = Checkpoint(tmp_path / "big.lors")
    tensor_bytes = sum(t.numel() * t.element_size() for t in (ckpt.get(k) for k in ckpt.keys()))
    assert tensor_bytes == 4 * count_parameters(lors_model) + sum(  # float32, shared tensors once
        b.numel() * 4 for b in lors_model.buffers()
    )
    assert 30e6 < tensor_bytes < 0.75 * dense_bytes  # big enough to measure; a dense copy would not fit 1.2x
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "big.lors")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown = json.loads(proc.stdout.strip().splitlines()[-1])
    assert grown["load"] <= 1.2 * tensor_bytes, (grown, tensor_bytes)
    assert 0.8 * tensor_bytes <= grown["forward"] <= 1.2 * tensor_bytes, (grown, tensor_bytes)
