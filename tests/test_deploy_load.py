"""The converted model as a transformers model: ``lors.load`` runs ``generate`` and pipelines as the
in-memory conversion does, with the tokenizer saved beside it; ``save_pretrained`` and ``lors.save``
write LORS checkpoints that load back to the same tensors, byte for byte."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lors_convert
from lors_convert.checkpoint import Checkpoint
from lors_convert.errors import LorsError
from lors_convert.io.sources import load_source
from lors_convert.layers import LorsConv1D, LorsLayer, LorsLinear
from tests.clirun import run_ok
from tests.conftest import distinct_numel
from tests.models import bert, gpt2, llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORDS = [f"w{i}" for i in range(5, 100)]
PROMPTS = ["w5 w17 w42 w8", "w60 w61"]
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


def tokenizer():
    """A word-level tokenizer over the tiny models' 100 ids, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        eos_token="[PAD]",
    )


def hf_dir(tmp_path: Path, build, tokenizer_files: bool = True) -> Path:
    torch.manual_seed(0)
    model = build().eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    if tokenizer_files:
        tokenizer().save_pretrained(src)
    return src


def converted(src: Path):
    """The in-memory conversion (the reference every saved and loaded copy must match)."""
    model, _ = load_source(src)
    lors_model, _ = lors_convert.convert(model, rank=4)
    return lors_model.eval()


def tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {k: ckpt.get(k) for k in ckpt.keys()}


def weight_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.glob("*.safetensors"))}


def greedy(model, tok, prompt: str) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    return out[0].tolist()


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
def test_causal_lm_generates_and_pipelines_like_the_in_memory_conversion(tmp_path, build):
    from transformers import AutoTokenizer, pipeline

    src = hf_dir(tmp_path, build)
    ref = converted(src)
    run_ok("convert", src, "--rank", "4", "-o", tmp_path / "cli.lors", "-q", "--no-fidelity")
    ref.save_pretrained(tmp_path / "saved.lors")
    assert TOKENIZER_FILES <= set(os.listdir(tmp_path / "cli.lors"))  # convert copies the tokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "cli.lors")
    assert tok("w5 w17").input_ids == tokenizer()("w5 w17").input_ids
    want = [greedy(ref, tok, p) for p in PROMPTS]
    want_text = pipeline("text-generation", model=ref, tokenizer=tok)(
        PROMPTS[0], max_new_tokens=5, do_sample=False
    )
    for ckpt in ("cli.lors", "saved.lors"):
        model = lors_convert.load(tmp_path / ckpt)
        assert type(model) is type(ref)
        assert model.config.model_type == ref.config.model_type
        assert model.config.num_hidden_layers == 4
        assert [greedy(model, tok, p) for p in PROMPTS] == want, ckpt
        got_text = pipeline("text-generation", model=model, tokenizer=tok)(
            PROMPTS[0], max_new_tokens=5, do_sample=False
        )
        assert got_text == want_text, ckpt


def bert_with_pooler():
    from transformers import BertModel

    return BertModel(bert().config)  # as from_pretrained builds it from config.json


def test_bert_feature_extraction_like_the_in_memory_conversion(tmp_path):
    from transformers import AutoTokenizer, pipeline

    src = hf_dir(tmp_path, bert_with_pooler)
    ref = converted(src)
    run_ok("convert", src, "--rank", "4", "-o", tmp_path / "cli.lors", "-q", "--no-fidelity")
    tok = AutoTokenizer.from_pretrained(tmp_path / "cli.lors")
    want = torch.tensor(pipeline("feature-extraction", model=ref, tokenizer=tok)(PROMPTS[0]))
    model = lors_convert.load(tmp_path / "cli.lors")
    got = torch.tensor(pipeline("feature-extraction", model=model, tokenizer=tok)(PROMPTS[0]))
    assert got.shape == want.shape == (1, 4, 32)  # 4 words
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_gguf_conversion_carries_a_tokenizer_transformers_loads(tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer, pipeline

    from tests import gguf_models as gm

    src = gm.write(tmp_path / "tiny.gguf", gm.llama(tied=True), "F32")
    run_ok("convert", src, "--rank", "4", "-o", tmp_path / "g.lors", "-q", "--no-fidelity")
    tok = AutoTokenizer.from_pretrained(tmp_path / "g.lors")
    model = lors_convert.load(tmp_path / "g.lors")
    out = pipeline("text-generation", model=model, tokenizer=tok)("hello", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("hello")


def test_save_pretrained_round_trips_byte_for_byte_and_holds_each_tensor_once(tmp_path):
    src = hf_dir(tmp_path, gpt2)
    run_ok("convert", src, "--rank", "4", "-o", tmp_path / "a.lors", "-q", "--no-fidelity")
    model = lors_convert.load(tmp_path / "a.lors")
    layers = [m for m in model.modules() if isinstance(m, LorsLayer)]
    assert len(layers) == 4 * 4 and len({id(m.shared) for m in layers}) == 4  # one W_s per matrix
    ckpt_numel = sum(t.numel() for t in tensors(tmp_path / "a.lors").values())
    assert distinct_numel(model) + sum(b.numel() for b in model.buffers()) == ckpt_numel  # no dense copy
    model.save_pretrained(tmp_path / "b.lors")
    assert weight_bytes(tmp_path / "b.lors") == weight_bytes(tmp_path / "a.lors")
    assert sorted(os.listdir(tmp_path / "b.lors")) == sorted(os.listdir(tmp_path / "a.lors"))
    again = lors_convert.load(tmp_path / "b.lors")
    a, b = tensors(tmp_path / "a.lors"), tensors(tmp_path / "b.lors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.lors_materialized == []  # every layer here saves multiply-adds


def test_a_fine_tuned_model_saves_and_loads_to_identical_tensors(tmp_path):
    src = hf_dir(tmp_path, llama)
    run_ok("convert", src, "--rank", "4", "-o", tmp_path / "a.lors", "-q", "--no-fidelity")
    model = lors_convert.load(tmp_path / "a.lors").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(5, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    lors_convert.save(model, tmp_path / "tuned.lors")
    saved = tensors(tmp_path / "tuned.lors")
    state = model.state_dict()
    before = tensors(tmp_path / "a.lors")
    assert any(not torch.equal(saved[k], before[k]) for k in saved if k.endswith("lors_A"))  # it trained
    for key, t in saved.items():
        assert torch.equal(t, state[key] if key in state else before[key]), key  # buffers: as loaded
    again = lors_convert.load(tmp_path / "tuned.lors")
    for key, t in again.state_dict().items():
        assert torch.equal(t, model.state_dict()[key]), key
    assert TOKENIZER_FILES <= set(os.listdir(tmp_path / "tuned.lors"))  # side files come along
    assert Checkpoint(tmp_path / "tuned.lors").source == Checkpoint(tmp_path / "a.lors").source


def test_save_pretrained_keeps_other_files_and_refuses_a_foreign_state(tmp_path):
    src = hf_dir(tmp_path, llama)
    run_ok("convert", src, "--rank", "4", "-o", tmp_path / "a.lors", "-q", "--no-fidelity")
    model = lors_convert.load(tmp_path / "a.lors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors").write_bytes(b"stale dense weights")
    model.save_pretrained(out)
    assert (out / "notes.txt").read_text() == "mine"
    assert weight_bytes(out) == weight_bytes(tmp_path / "a.lors")
    dense = lors_convert.merge(lors_convert.load(tmp_path / "a.lors")).state_dict()
    with pytest.raises(LorsError, match="only the model's own state"):
        model.save_pretrained(tmp_path / "dense", state_dict=dense)
    assert not (tmp_path / "dense").exists()
    model.save_pretrained(tmp_path / "own", state_dict=model.state_dict())  # what Trainer passes
    assert weight_bytes(tmp_path / "own") == weight_bytes(tmp_path / "a.lors")


def test_materialize_auto_forms_w_only_where_the_factors_cost_more(tmp_path):
    torch.manual_seed(0)
    dense = torch.nn.Linear(12, 10)
    cheap = LorsLinear(dense, None, total_rank=2, rank=2, groups=1)  # 2 * 22 < 120
    costly = LorsLinear(dense, None, total_rank=6, rank=6, groups=1)  # 6 * 22 >= 120
    assert not cheap.factored_costs_more() and costly.factored_costs_more()
    for p in costly.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 12)
    with torch.no_grad():
        factored = costly(x)
        costly.materialize()
        formed = costly(x)
        assert (formed - factored).abs().max() <= 1e-5 * factored.abs().max()
        costly.lors_A.mul_(2)  # an optimizer step: the formed W_i follows the factors
        assert torch.allclose(costly(x), 2 * (factored - costly.bias) + costly.bias, atol=1e-5)
    costly(x).sum().backward()  # autograd reaches the factors through W_i = B_i A_i
    assert costly.lors_A.grad is not None and costly.lors_B.grad is not None


@pytest.mark.parametrize("kind", ["linear", "conv1d", "linear-shared"])
def test_relayout_keeps_outputs_gradients_and_saved_bytes(kind):
    """``B`` stored column-major: the same forward (1e-6) and gradients (1e-5), a trainable
    Parameter of the same shape, and the same bytes in a state dict made contiguous."""
    torch.manual_seed(0)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        dense, layer_cls = Conv1D(40, 24), LorsConv1D  # weight (24, 40): d = 24 > k
    else:
        dense, layer_cls = torch.nn.Linear(24, 40), LorsLinear  # weight (40, 24)
    d, h = dense.weight.shape
    shared = torch.nn.Parameter(torch.randn(d, h)) if kind == "linear-shared" else None
    twins = [layer_cls(dense, shared, total_rank=5, rank=5, groups=1) for _ in range(2)]
    for p in twins[0].parameters():
        torch.nn.init.normal_(p)
    twins[1].load_state_dict(twins[0].state_dict())
    twins[1].relayout()
    B = twins[1].lors_B
    assert isinstance(B, torch.nn.Parameter) and B.shape == (d, 5) and B.stride() == (1, d)
    assert torch.equal(B, twins[0].lors_B) and torch.equal(B.contiguous(), twins[0].lors_B)
    x = torch.randn(2, 3, 24)  # decoding rows and a prefill-like batch
    outs = [layer(x) for layer in twins]
    assert (outs[1] - outs[0]).abs().max() <= 1e-6 * outs[0].abs().max()
    for out in outs:
        out.square().sum().backward()
    for name in ("lors_A", "lors_B"):
        g0, g1 = getattr(twins[0], name).grad, getattr(twins[1], name).grad
        assert (g1 - g0).abs().max() <= 1e-5 * g0.abs().max(), name


def test_load_lays_out_b_for_decoding(tmp_path):
    """Every factored layer of a loaded model holds ``B`` column-major; a materialized one keeps it."""
    torch.manual_seed(0)
    model, _ = lors_convert.convert(llama(), rank=4)
    model.save_pretrained(tmp_path / "a.lors")
    loaded = lors_convert.load(tmp_path / "a.lors")
    layers = [m for m in loaded.modules() if isinstance(m, LorsLinear)]
    assert layers
    for layer in layers:
        d, k = layer.lors_B.shape
        assert layer.lors_B.stride() == ((1, d) if k < d and not layer.materialized else (k, 1))
