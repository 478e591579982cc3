"""A tiny Hugging Face causal LM directory (Llama, 4 layers, hidden 48) with a word-level tokenizer,
for the heal tests: it generates, converts and heals in seconds."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "the a of to and in is it that was for on with as by at from this be or an are not have had one "
    "all can will more time year people way day man thing woman life child world school state family "
    "student group country problem hand part place case week company system program question work"
).split()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def llama(layers: int = 4, hidden: int = 48, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=2 + len(WORDS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: layers that matter, errors that show
        for name, p in model.named_parameters():
            if p.dim() == 2 and "layers" in name:
                p.normal_(0, 0.3 / p.shape[1] ** 0.5 * 4)
    return model


def llama_dir(directory: Path, layers: int = 4, hidden: int = 48) -> Path:
    directory = Path(directory)
    llama(layers, hidden).save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory
