"""Tiny GGUF files written the way llama.cpp's ``convert_hf_to_gguf.py`` writes a Llama, without lors.

The tensor names and the q/k row permutation are spelled out here (not taken from lors or from the
``gguf`` name map lors uses), so reading them back through lors checks its mapping independently.
``gguf`` must be importable (callers skip otherwise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 3
MERGES = ["h e", "l l", "Ġ t", "Ġ a", "Ġt he"]
SPECIAL = "<|endoftext|>"


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: the 256 base tokens of a byte-level BPE vocabulary."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=False))]


def vocab() -> list[str]:
    return byte_tokens() + [m.replace(" ", "") for m in MERGES] + [SPECIAL]


def llama(tied: bool = True, seed: int = 0, layers: int = LAYERS, ffn: int = FFN):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _init(LlamaForCausalLM(LlamaConfig(**_config(tied, layers, ffn))), seed)


def qwen(version: int, seed: int = 0):
    """A tied Qwen2 (q/k/v biases) or Qwen3 (q/k norms; head_dim 128, the one value transformers'
    GGUF config gives Qwen3, since it does not read llama.cpp's key_length)."""
    if version == 2:
        from transformers import Qwen2Config as Config
        from transformers import Qwen2ForCausalLM as Model

        return _init(Model(Config(**_config(True, LAYERS, FFN))), seed)
    from transformers import Qwen3Config as Config
    from transformers import Qwen3ForCausalLM as Model

    return _init(Model(Config(**_config(True, LAYERS, FFN), head_dim=128)), seed)


def _config(tied: bool, layers: int, ffn: int) -> dict:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=len(vocab()),
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=len(vocab()) - 1,
        eos_token_id=len(vocab()) - 1,
    )


def _init(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():  # every tensor random, norms and biases away from 1 and 0, so a mix-up shows
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (rows of each head interleaved for its rotary embedding)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# llama.cpp's names of a decoder layer's tensors (gguf's docs/gguf.md, "Standardized tensor names")
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_tensors(model, arch: str = "llama") -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names (q/k permuted for a Llama), float32, numpy order."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": sd.pop("model.embed_tokens.weight"),
        "output_norm.weight": sd.pop("model.norm.weight"),
    }
    lm_head = sd.pop("lm_head.weight")
    if not model.config.tie_word_embeddings:
        out["output.weight"] = lm_head
    c = model.config
    for key, w in sd.items():
        _, _, i, rest = key.split(".", 3)  # model.layers.<i>.<module>.<weight|bias>
        module, kind = rest.rsplit(".", 1)
        name = LAYER_NAMES[module]
        if arch == "llama" and name in ("attn_q", "attn_k"):
            w = permute(w, c.num_attention_heads if name == "attn_q" else c.num_key_value_heads)
        out[f"blk.{i}.{name}.{kind}"] = w
    return out


def write(
    path: Path,
    model,
    qtype: str = "F32",
    arch: str = "llama",
    block_count: int | None = None,
    ffn_length: int | None = None,
    drop: tuple[str, ...] = (),
    extra: dict[str, tuple[np.ndarray, str]] | None = None,
) -> Path:
    """Write ``model`` as a GGUF file: 2-D weights as ``qtype`` (F32, F16, Q8_0, Q4_1...), 1-D as F32.

    ``arch``, ``block_count`` and ``ffn_length`` override the metadata (bad inputs); ``drop`` leaves
    tensors out; ``extra`` adds tensors ``name -> (array, type)`` (raw bytes for a block type).
    """
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_uint32(f"{arch}.block_count", block_count if block_count is not None else c.num_hidden_layers)
    w.add_uint32(f"{arch}.context_length", c.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", c.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", ffn_length if ffn_length is not None else c.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", c.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", c.num_key_value_heads)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_uint32(f"{arch}.attention.value_length", head_dim)
    w.add_uint32(f"{arch}.vocab_size", c.vocab_size)
    w.add_uint32("general.file_type", {"F32": 0, "F16": 1, "Q4_1": 3, "Q8_0": 7}.get(qtype, 0))
    tokens = vocab()
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [1] * (len(tokens) - 1) + [3])
    w.add_array("tokenizer.ggml.merges", MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", len(tokens) - 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", len(tokens) - 1)
    w.add_uint32("tokenizer.ggml.padding_token_id", len(tokens) - 1)  # text calibration pads its batches
    w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kind = gguf.GGMLQuantizationType[qtype]
    for name, t in gguf_tensors(model, arch).items():
        if name in drop:
            continue
        if t.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, t.astype(np.float32))
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, t.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quantize(t, kind), raw_dtype=kind)
    for name, (t, type_name) in (extra or {}).items():
        raw = None if type_name in ("F32", "F16") else gguf.GGMLQuantizationType[type_name]
        w.add_tensor(name, t, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def contents(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Every tensor of a GGUF file dequantized to float32, and every key/value (the reader's GGUF.*
    header fields included), read with the gguf package alone."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {
        t.name: np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
            tuple(reversed(t.shape.tolist()))
        )
        for t in reader.tensors
    }
    return tensors, {name: f.contents() for name, f in reader.fields.items()}
