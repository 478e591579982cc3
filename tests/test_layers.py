"""The LORS layers one by one: grouped/strided Conv2d, HF Conv1D, ties, paper init, half precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import max_rel_diff, reference_errors, snapshot
from torch import nn

from lors_convert import convert, find_stacks, merge
from lors_convert.layers import LorsConv1D, LorsConv2d, LorsLayer, LorsLinear
from tests.models import CASES, run


class Stack(nn.Module):
    """``n`` copies of one module in a ModuleList, applied in sequence."""

    def __init__(self, make, n: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(make() for _ in range(n))

    def forward(self, x):
        return [layer(x) for layer in self.layers]


def _layers(model, cls=LorsLayer):
    return [m for m in model.modules() if isinstance(m, cls)]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=16, out_channels=32, kernel_size=3, padding=1, groups=4),
        dict(
            in_channels=16,
            out_channels=16,
            kernel_size=(3, 5),
            stride=2,
            padding=(2, 1),
            dilation=2,
            groups=8,
        ),
        dict(in_channels=16, out_channels=24, kernel_size=1, groups=2, bias=False),
        dict(
            in_channels=12, out_channels=12, kernel_size=3, padding=1, groups=12
        ),  # depthwise: matrix (12, 9)
    ],
    ids=["g4", "g8-strided-dilated", "1x1-g2-nobias", "depthwise"],
)
def test_grouped_conv2d_matches_dense_grouped_conv(kwargs):
    """LorsConv2d (tiled A + grouped 1x1 B) == F.conv2d with the merged grouped kernel, to 1e-5."""
    torch.manual_seed(0)
    model = Stack(lambda: nn.Conv2d(**kwargs))
    source = snapshot(model)
    g = kwargs["groups"]
    model, report = convert(model, rank=2, require_savings=False)
    layers = _layers(model, LorsConv2d)
    assert len(layers) == 4
    out, in_g, kh, kw = source["layers.0.weight"].shape
    assert in_g == kwargs["in_channels"] // g
    assert layers[0].shared.shape == (out, in_g * kh * kw)  # factorized per group structure
    x = torch.randn(2, kwargs["in_channels"], 11, 9)
    ys = model(x)
    for i, (layer, y) in enumerate(zip(layers, ys, strict=False)):
        w = layer.shared + layer.lors_B @ layer.lors_A  # (out, in/g*kh*kw)
        ref = F.conv2d(
            x,
            w.reshape(out, in_g, kh, kw),
            source.get(f"layers.{i}.bias"),
            stride=layer.template.stride,
            padding=layer.template.padding,
            dilation=layer.template.dilation,
            groups=g,
        )
        assert y.shape == ref.shape
        assert max_rel_diff(y, ref) <= 1e-5
    merge(model)
    ref_err = reference_errors(
        [source[f"layers.{i}.weight"] for i in range(4)], report.stacks[0].matrices[0].ranks
    )
    for i in range(4):
        W, Wm = source[f"layers.{i}.weight"], model.layers[i].weight.detach()
        err = float(torch.linalg.norm((Wm - W).double()) / torch.linalg.norm(W.double()))
        assert abs(err - ref_err[i]) <= 1e-4 and model.layers[i].groups == g
    ys_dense = model(x)
    for y, yd in zip(ys, ys_dense, strict=False):
        assert max_rel_diff(y, yd) <= 1e-4


def test_hf_conv1d_is_factorized_as_stored_in_by_out():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = Stack(lambda: Conv1D(48, 32))  # nf=48 outputs, nx=32 inputs: weight (32, 48)
    for layer in model.layers:
        nn.init.normal_(layer.bias)
    source = snapshot(model)
    model, report = convert(model, rank=4)
    layers = _layers(model, LorsConv1D)
    assert len(layers) == 4 and report.stacks[0].matrices[0].matrix == [32, 48]
    assert (
        layers[0].shared.shape == (32, 48)
        and layers[0].lors_B.shape == (32, 4)
        and layers[0].lors_A.shape == (4, 48)
    )
    x = torch.randn(3, 5, 32)
    ys = model(x)
    for i, (layer, y) in enumerate(zip(layers, ys, strict=False)):
        assert y.shape == (3, 5, 48)
        ref = x @ (layer.shared + layer.lors_B @ layer.lors_A) + source[f"layers.{i}.bias"]
        assert max_rel_diff(y, ref) <= 1e-5
    merge(model)
    assert all(type(layer) is Conv1D for layer in model.layers)
    for y, yd in zip(ys, model(x), strict=False):
        assert max_rel_diff(y, yd) <= 1e-4
    ref_err = reference_errors([source[f"layers.{i}.weight"] for i in range(4)], [4] * 4)
    assert (
        max(abs(a - b) for a, b in zip(report.stacks[0].matrices[0].relative_error, ref_err, strict=False))
        <= 1e-4
    )


def test_gpt2_tied_embedding_stays_tied_and_unconverted():
    case = CASES["gpt2"]
    model = case.build()
    assert model.lm_head.weight is model.transformer.wte.weight
    wte = model.transformer.wte.weight.detach().clone()
    model, report = convert(model, rank=8)
    converted = {f"{m}.{x.name}" for s in report.stacks for m in s.members for x in s.matrices}
    assert converted and not any("wte" in k or "lm_head" in k for k in converted)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, wte)
    assert all(isinstance(model.get_submodule(k.rpartition(".")[0]), LorsConv1D) for k in converted)
    merge(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in dict(model.named_parameters())  # still deduplicated as a tie


class TiedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        return self.out(self.proj(self.fc(x)))


class TiedModel(nn.Module):
    """Stack members whose weights are tied: to an outside module, across members, by storage."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(16, 16)
        self.blocks = nn.ModuleList(TiedBlock() for _ in range(3))
        self.blocks[1].fc.weight = self.extra.weight  # same Parameter as a non-member
        self.blocks[2].proj.weight = self.blocks[0].proj.weight  # same Parameter across members
        self.blocks[1].out.weight = nn.Parameter(
            self.extra.bias.new_empty(0).set_(self.extra.weight.untyped_storage(), 0, (16, 16))
        )  # another Parameter, same storage

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.extra(x)


def test_tied_stack_members_are_never_split_into_independent_layers():
    torch.manual_seed(0)
    model = TiedModel()
    [stack] = find_stacks(model)
    assert stack.members == ["blocks.0", "blocks.1", "blocks.2"]
    assert {p.relname for p in stack.params} == set()
    assert set(stack.excluded) == {"fc.weight", "proj.weight", "out.weight"}
    assert all("tied" in why for why in stack.excluded.values())
    # an untied stack of the same shape does convert: the exclusion is due to the ties alone
    torch.manual_seed(0)
    untied = nn.ModuleList(TiedBlock() for _ in range(3))
    assert {p.relname for p in find_stacks(untied)[0].params} == {"fc.weight", "proj.weight", "out.weight"}
    with pytest.raises(Exception, match="no parameter to convert"):
        convert(model, rank=2)
    assert model.blocks[1].fc.weight is model.extra.weight


def test_paper_init_has_zero_A_so_output_is_shared_only():
    case = CASES["mlp"]
    model, report = convert(case.build(), rank=4, init="paper")
    layers = _layers(model, LorsLinear)
    assert len(layers) == 8  # up and down of 4 blocks
    for layer in layers:
        assert torch.count_nonzero(layer.lors_A) == 0
        assert torch.count_nonzero(layer.lors_B) == layer.lors_B.numel()
        bound = 1 / layer.shared.shape[1] ** 0.5  # Kaiming-uniform(a=sqrt(5)) as nn.Linear
        assert float(layer.shared.detach().abs().max()) <= bound
    assert all(not m.relative_error for s in report.stacks for m in s.matrices)  # nothing was fitted
    y = case.forward(model)
    with torch.no_grad():
        for layer in layers:  # B does not matter while A is zero: only W_s acts
            layer.lors_B.normal_()
    assert torch.equal(case.forward(model), y)
    merge(model)
    for blk in model.blocks:  # merged weights are the shared matrices themselves
        assert torch.equal(blk.up.weight, layers[0].shared) and torch.equal(blk.down.weight, layers[1].shared)
    assert max_rel_diff(case.forward(model), y) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["mlp", "gpt2", "resnext"])
def test_half_precision_round_trip_within_dtype_precision(name, dtype):
    """Full-rank round trip in fp16/bf16: SVD in float32, factors and merge written back in ``dtype``.

    Storing W_s, B and A in ``dtype`` each rounds once, so the merged weight is within a few units of
    ``dtype`` epsilon of the source: tolerance 4 * eps * max|W|.
    """
    case = CASES[name]
    model = case.build().to(dtype)
    source = snapshot(model)
    model, report = convert(model, rank=None, require_savings=False)
    layers = _layers(model)
    assert layers and all(p.dtype == dtype for lay in layers for p in (lay.shared, lay.lors_A, lay.lors_B))
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.inputs().items()}
    with torch.no_grad():
        y = case.output(run(model, inputs))
    assert y.dtype == dtype and torch.isfinite(y).all()
    merged = snapshot(merge(model))
    assert list(merged) == list(source)
    eps = torch.finfo(dtype).eps
    worst = 0.0
    for k, w in source.items():
        assert merged[k].dtype == w.dtype and merged[k].shape == w.shape, k
        if w.is_floating_point():
            rel = float(
                (merged[k].double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30)
            )
            assert rel <= 4 * eps, f"{k}: {rel:.3g} > 4 * eps({dtype})"
            worst = max(worst, rel / eps)
    print(f"[{name} {dtype}] half round trip: max diff = {worst:.2f} eps * max|W|")


def test_cast_after_conversion_merges_in_the_new_dtype():
    """convert, then .to(bfloat16), then merge: the dense weight follows its bias and inputs."""
    case = CASES["mlp"]
    model, _ = convert(case.build(), rank=4)
    model.to(torch.bfloat16)
    layers = _layers(model, LorsLinear)
    assert layers[0].shared is layers[2].shared  # the cast keeps one Parameter per stack
    x = case.inputs()["x"].to(torch.bfloat16)
    with torch.no_grad():
        y = model(x)
    merge(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        assert max_rel_diff(model(x), y) <= 4 * torch.finfo(torch.bfloat16).eps * 8  # a few bf16 roundings


def test_converting_twice_is_refused_and_changes_nothing():
    case = CASES["mlp"]
    model, _ = convert(case.build(), rank=4)
    before = snapshot(model)
    with pytest.raises(Exception, match="no parameter to convert"):
        convert(model, rank=4)
    after = snapshot(model)
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def _forward_allocations(module: nn.Module, x: torch.Tensor) -> list[tuple[str, int, int]]:
    """(op, numel, storage) of every tensor the ops of one forward pass produce."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    records = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    records.append((str(func), t.numel(), t.untyped_storage().data_ptr()))
            return out

    with torch.no_grad(), Record():
        module(x)
    return records


@pytest.mark.parametrize(
    "make, x_shape",
    [
        (lambda: nn.Linear(32, 48), (7, 32)),
        (lambda: nn.Conv2d(16, 24, 3, padding=1, groups=2), (1, 16, 5, 5)),
        ("conv1d", (7, 32)),
    ],
    ids=["linear", "conv2d-grouped", "conv1d"],
)
def test_forward_never_materializes_the_dense_weight(make, x_shape):
    """No op of a LORS forward allocates a d*h tensor (views of the shared Parameter are fine)."""
    if make == "conv1d":
        from transformers.pytorch_utils import Conv1D

        make = lambda: Conv1D(48, 32)  # noqa: E731
    torch.manual_seed(0)
    model, _ = convert(Stack(make, n=3), rank=4)
    layer = model.layers[1]
    assert isinstance(layer, LorsLayer)
    d, h = layer.shared.shape
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    records = _forward_allocations(layer, torch.randn(*x_shape))
    assert records  # the recorder sees the forward's ops
    fresh = [(op, n) for op, n, ptr in records if n == d * h and ptr not in param_storages]
    assert not fresh, f"forward materialized a {d}x{h} weight: {fresh}"
    # and the recorder would have caught it: reading .weight does allocate one
    assert any(
        n == d * h and ptr not in param_storages
        for _, n, ptr in _forward_allocations(lambda _: layer.weight, torch.zeros(1))
    )


@pytest.mark.parametrize("name", ["conv", "gpt2"])
def test_merge_state_equals_to_dense(name):
    """The pure tensor merge used without the architecture gives the same tensors as to_dense()."""
    model, _ = convert(CASES[name].build(), rank=4)
    for layer in _layers(model):
        state = {k: v.detach() for k, v in layer.named_parameters(recurse=False)}
        meta = {"shape": list(layer.weight_shape), "dtype": str(layer.weight_dtype).removeprefix("torch.")}
        merged = type(layer).merge_state(state, meta)
        dense = layer.to_dense().state_dict()
        assert sorted(merged) == sorted(dense)
        for k in dense:
            assert merged[k].shape == dense[k].shape and merged[k].dtype == dense[k].dtype
            assert torch.equal(merged[k], dense[k]), k


def test_padding_mode_is_respected_by_both_conv_branches():
    torch.manual_seed(0)
    model = Stack(lambda: nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", groups=2), n=3)
    x = torch.randn(2, 8, 6, 7)
    with torch.no_grad():
        ys = model(x)
    model, _ = convert(model, rank=None, require_savings=False)
    assert all(isinstance(m, LorsConv2d) for m in model.layers)
    with torch.no_grad():
        for y, y_lors in zip(ys, model(x), strict=False):
            assert max_rel_diff(y_lors, y) <= 1e-5


def test_float64_sources_are_decomposed_in_float64():
    """A float64 model round-trips at float64 precision (1e-12 relative), not float32's ~1e-6."""
    case = CASES["mlp"]
    model = case.build().double()
    source = snapshot(model)
    model, _ = convert(model, rank=None, require_savings=False)
    assert all(lay.shared.dtype == torch.float64 for lay in _layers(model))
    merged = snapshot(merge(model))
    for k, w in source.items():
        assert merged[k].dtype == torch.float64
        assert (merged[k] - w).abs().max() <= 1e-12 * w.abs().max(), k


@pytest.mark.parametrize("kind", ["linear", "linear-nobias", "linear-private", "conv1d", "conv2d"])
def test_forward_and_gradients_equal_the_unfused_expression(kind):
    """The in-place accumulating forward gives the outputs and gradients (input, W_s, A, B, bias) of
    ``x W_s^T + (x A^T) B^T + b`` written plainly, before and after an optimizer step (no stale state)."""
    torch.manual_seed(0)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        make, x = (lambda: Conv1D(48, 32)), torch.randn(3, 5, 32)
    elif kind == "conv2d":
        make, x = (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=2)), torch.randn(2, 8, 6, 6)
    else:
        make, x = (lambda: nn.Linear(32, 48, bias=kind != "linear-nobias")), torch.randn(3, 5, 32)
    model, _ = convert(Stack(make, n=3), rank=4, require_savings=False)
    layer = model.layers[1]
    if kind == "linear-private":
        layer.shared = None
    with torch.no_grad():
        for p in (layer.lors_A, layer.lors_B):
            p.normal_()  # both factors non-trivial

    def unfused(params: dict, x: torch.Tensor) -> torch.Tensor:
        W = params["lors_B"] @ params["lors_A"]  # (d, h)
        if params.get("shared") is not None:
            W = params["shared"] + W
        b = params.get("bias")
        if kind == "conv1d":
            return x @ W + b
        if kind == "conv2d":
            t = layer.template
            return F.conv2d(x, W.view(layer.weight_shape), b, t.stride, t.padding, t.dilation, t.groups)
        return F.linear(x, W, b)

    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(2):
        params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn_like(unfused(params, x))
        y = layer(xa)
        y_ref = unfused(params, xb)
        assert max_rel_diff(y, y_ref) <= 1e-5
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        assert max_rel_diff(xa.grad, xb.grad) <= 1e-5
        for n, p in layer.named_parameters():
            assert max_rel_diff(p.grad, params[n].grad) <= 1e-5, (step, n)
        opt.step()  # in-place updates of W_s, A, B: the next forward must see them
        opt.zero_grad()
