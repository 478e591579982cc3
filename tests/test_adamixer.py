"""Reference AdaMixer decoder: official parameter counts, the paper's LORS count, fx generator detection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lors_convert import count_parameters, plan_conversion
from lors_convert.discover.generators import make_adaptive_hook
from lors_convert.discover.preset import paper_adamixer_settings
from lors_convert.discover.tracing import detect_generators
from lors_convert.layers.adaptive import Layout, LorsaLinear
from lors_convert.swap import install_layers
from lors_convert.zoo.adamixer import AdaMixerConfig, AdaMixerDecoder, AdaMixerDecoderStage, random_inputs

# per-stage breakdown of the official default (C=256, feat=256, G=4, e=64, P_in=32, P_out=128, FFN 2048)
DEFAULT_STAGE = {
    "attention": 3 * 256 * 256 + 3 * 256 + 256 * 256 + 256,  # in_proj + out_proj = 263,168
    "attention_norm": 512,
    "ffn": 256 * 2048 + 2048 + 2048 * 256 + 256,  # 1,050,880
    "ffn_norm": 512,
    "cls_fcs": 256 * 256 + 256 + 512,  # Linear + LN = 66,304
    "fc_cls": 256 * 80 + 80,  # sigmoid (focal) classification: 80 outputs
    "reg_fcs": 256 * 256 + 256 + 512,
    "fc_reg": 256 * 4 + 4,
    "sampling_n_mixing.sampling_offset_generator": 256 * 384 + 384,  # P_in*G*3 = 384
    "sampling_n_mixing.norm": 512,
    "sampling_n_mixing.adaptive_mixing.parameter_generator": 256 * 32768 + 32768,  # G*(e*e + P_in*P_out)
    "sampling_n_mixing.adaptive_mixing.out_proj": 32768 * 256 + 256,  # G*P_out*e -> C
    "iof_tau": 8,
}


def test_default_decoder_has_the_official_parameter_count():
    with torch.device("meta"):
        model = AdaMixerDecoder()
    assert count_parameters(model) == 110_272_296
    stage = model.bbox_head[0]
    for name, expected in DEFAULT_STAGE.items():
        got = (
            stage.get_parameter(name).numel()
            if name == "iof_tau"
            else count_parameters(stage.get_submodule(name))
        )
        assert got == expected, name
    assert sum(DEFAULT_STAGE.values()) * 6 == 110_272_296


def test_paper_lors_setting_has_the_papers_parameter_count():
    """G=2, P_in=64; LORSA r=16 K=[1,1,2,2,3,3] on the generator, LORST r=8 K=1 on out_proj."""
    with torch.device("meta"):
        model = AdaMixerDecoder(AdaMixerConfig.paper_lors())
    before = count_parameters(model)
    assert before == 135_536_424  # G=2, P_in=64 dense: generator 256 -> 2*(128*128 + 64*128)
    s = paper_adamixer_settings()
    hook = make_adaptive_hook(s["adaptive"], s["rank"], s["groups"])
    plan = plan_conversion(model, s["rank"], s["groups"], s["include"], None, True, adaptive=hook)
    kinds = {pp.relname: (pp.kind, pp.rank, pp.groups) for pp in plan.params}
    assert kinds == {
        "sampling_n_mixing.adaptive_mixing.parameter_generator.0.weight": (
            "adaptive",
            16,
            [1, 1, 2, 2, 3, 3],
        ),
        "sampling_n_mixing.adaptive_mixing.out_proj.weight": ("static", 8, [1] * 6),
    }
    for pp in plan.params:  # the LORS skeleton, as a checkpoint load builds it
        install_layers(model, pp, torch.empty(pp.matrix, device="meta"), None)
    assert count_parameters(model) == 35_348_264
    assert plan.report(before).params_after == 35_348_264
    # breakdown: untouched per-stage modules + LORST out_proj + LORSA generator
    untouched = 6 * (
        18_378_716
        - DEFAULT_STAGE["sampling_n_mixing.adaptive_mixing.parameter_generator"]
        - DEFAULT_STAGE["sampling_n_mixing.adaptive_mixing.out_proj"]
    )  # 9,410,856
    out_proj = 256 * 32768 + 6 * 8 * (256 + 32768) + 6 * 256  # shared W + B,A + per-stage bias = 9,975,296
    generator = 49152 * 257 + 12 * 2 * (
        (128 * 16 + 16 * 128 + 16 * 16 * 257)  # M: B, A, E (with bias)
        + (128 * 16 + 16 * 64 + 16 * 16 * 257)
    )  # S: 15,962,112
    assert untouched + out_proj + generator == 35_348_264
    gen = model.bbox_head[5].sampling_n_mixing.adaptive_mixing.parameter_generator[0]
    assert isinstance(gen, LorsaLinear) and str(gen.layout) == "2 x [128x128, 128x64]"


def test_stage_traces_and_its_generator_is_detected():
    cfg = AdaMixerConfig.tiny()
    stage = AdaMixerDecoderStage(cfg)
    found = detect_generators(stage)
    assert found == {
        "sampling_n_mixing.adaptive_mixing.parameter_generator.0": Layout.parse(cfg.generator_layout)
    }
    assert str(found["sampling_n_mixing.adaptive_mixing.parameter_generator.0"]) == "2 x [16x16, 8x4]"


def test_default_decoder_generator_layout_is_detected_on_meta():
    with torch.device("meta"):
        stage = AdaMixerDecoderStage(AdaMixerConfig())
    assert {str(v) for v in detect_generators(stage).values()} == {"4 x [64x64, 128x32]"}


def test_decoder_forward_shapes_and_offsets():
    cfg = AdaMixerConfig.tiny()
    torch.manual_seed(0)
    model = AdaMixerDecoder(cfg)
    model.init_weights()
    feats, xyzr, content = random_inputs(cfg, batch=2, queries=3)
    out = model(feats, xyzr, content)
    assert len(out["cls_score"]) == 6
    assert out["cls_score"][-1].shape == (2, 3, cfg.num_classes)
    assert out["xyzr"][-1].shape == (2, 3, 4) and out["query"][-1].shape == (2, 3, cfg.content_dim)
    _, _, _, offsets = model.bbox_head[0](feats, xyzr, content)
    assert offsets.shape == (2, 3, cfg.n_groups * cfg.in_points * 3)
    assert torch.isfinite(out["cls_score"][-1]).all()


# --- detection on other shapes of generator code ---------------------------------------------


class BmmMixer(nn.Module):
    """The official code's other branch: bmm over (B*N*G) with the kernel used transposed."""

    def __init__(self, dq=8, g=3, e=4, p=5):
        super().__init__()
        self.g, self.e, self.p = g, e, p
        self.gen = nn.Linear(dq, g * (e * e + p * p))
        self.mlp = nn.Linear(dq, dq)

    def forward(self, x, q):  # x (B, N, g, p, e), q (B, N, dq)
        B, N = x.shape[0], x.shape[1]
        params = self.gen(q).view(B, N, self.g, -1)
        M, S = torch.split(params, [self.e * self.e, self.p * self.p], dim=-1)
        M = M.reshape(B * N * self.g, self.e, self.e).transpose(1, 2)
        S = S.reshape(B * N * self.g, self.p, self.p)
        out = torch.bmm(x.reshape(B * N * self.g, self.p, self.e), M)
        out = S @ out
        return self.mlp(q) + out.sum()


class Attention(nn.Module):
    def __init__(self, d=8, h=2):
        super().__init__()
        self.h = h
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):  # (B, N, d)
        B, N = x.shape[0], x.shape[1]
        q = self.q(x).view(B, N, self.h, -1).transpose(1, 2)
        k = self.k(x).view(B, N, self.h, -1).transpose(1, 2)
        return q @ k.transpose(-1, -2)


class Untraceable(nn.Module):
    def __init__(self, dq=8, e=4):
        super().__init__()
        self.e = e
        self.gen = nn.Linear(dq, e * e)

    def forward(self, x, q):
        if x.shape[-1] != self.e:  # data-dependent Python control flow: fx cannot trace this
            raise ValueError("bad shape")
        return x @ self.gen(q).reshape(x.shape[0], self.e, self.e)


def test_detection_follows_split_bmm_and_transposed_use():
    found = detect_generators(BmmMixer())
    assert found == {"gen": Layout(groups=3, entries=((4, 4), (5, 5)))}


def test_plain_linears_and_attention_projections_are_not_generators():
    assert detect_generators(Attention()) == {}
    assert "mlp" not in detect_generators(BmmMixer())


def test_untraceable_module_detects_nothing():
    assert detect_generators(Untraceable()) == {}
    # yet it runs
    m = Untraceable()
    assert m(torch.randn(2, 3, 4), torch.randn(2, 8)).shape == (2, 3, 4)


@pytest.mark.parametrize(
    "text,groups,entries",
    [
        ("4 x [64x64, 128x32]", 4, ((64, 64), (128, 32))),
        ("4*[64*64,128*32]", 4, ((64, 64), (128, 32))),
        ("[256x256]", 1, ((256, 256),)),
        ("16 x 8", 1, ((16, 8),)),
    ],
)
def test_layout_parse(text, groups, entries):
    lay = Layout.parse(text)
    assert (lay.groups, lay.entries) == (groups, entries)
    assert Layout.parse(str(lay)) == lay


def test_layout_split_join_roundtrip():
    lay = Layout.parse("2 x [3x4, 5x2]")
    T = torch.randn(lay.out_features, 7)
    parts = lay.split(T)
    assert [p.shape for p in parts] == [(2, 3, 4, 7), (2, 5, 2, 7)]
    assert torch.equal(
        parts[1][1, 4, 1], T[22 + 12 + 9]
    )  # group 1 (22 per group), entry 1 (after 12), row 4, col 1
    assert torch.equal(lay.join(parts), T)


@pytest.mark.parametrize("bad", ["4 x [64, 32]", "x[1x1]", "[0x3]", ""])
def test_bad_layout_is_a_usage_error(bad):
    from lors_convert.errors import LorsUsageError

    with pytest.raises(LorsUsageError):
        Layout.parse(bad)


def test_official_checkpoint_keys_load_into_the_reference_decoder():
    from lors_convert.zoo.adamixer import build, decoder_state_dict

    kw = dict(
        num_stages=2,
        content_dim=32,
        feat_channels=32,
        num_heads=4,
        feedforward_channels=64,
        in_points=4,
        out_points=8,
        n_groups=2,
    )
    src = build(**kw)
    detector = {f"roi_head.{k}": v for k, v in src.state_dict().items()}
    detector["backbone.conv1.weight"] = torch.zeros(1)
    assert "roi_head.bbox_head.1.sampling_n_mixing.adaptive_mixing.parameter_generator.0.weight" in detector
    assert "roi_head.bbox_head.0.ffn.layers.0.0.weight" in detector
    assert "roi_head.bbox_head.0.attention.attn.in_proj_weight" in detector
    dst = build(**kw)
    dst.load_state_dict(decoder_state_dict(detector))  # strict: every key matches


class PerHeadProjection(nn.Module):
    """Per-token feature tensors meeting a weight are not generated matrices."""

    def __init__(self, d=8, h=2):
        super().__init__()
        self.h = h
        self.lin = nn.Linear(d, d)
        self.w = nn.Parameter(torch.randn(d // h, d // h))

    def forward(self, x):  # (B, d)
        return (self.lin(x).view(x.shape[0], self.h, -1) @ self.w).flatten(1)


def test_products_with_parameters_are_not_generators():
    assert detect_generators(PerHeadProjection()) == {}
