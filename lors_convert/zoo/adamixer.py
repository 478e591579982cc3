"""Reference AdaMixer decoder in plain torch (no mmcv/mmdet), for LORS/LORSA experiments.

Follows MCG-NJU/AdaMixer's ``AdaMixerDecoderStage``, ``AdaptiveSamplingMixing`` and
``AdaptiveMixing`` (module names and parameter shapes as there, so the official state-dict keys of
a decoder stage map one to one: ``attention.attn.in_proj_weight``, ``ffn.layers.0.0.weight``,
``sampling_n_mixing.adaptive_mixing.parameter_generator.0.weight``, ...):

- self-attention on the query contents (sinusoidal position embedding of the boxes, IoF attention
  bias scaled per head by ``iof_tau``), residual inside the attention as mmcv's
  ``MultiheadAttention``, then ``attention_norm``;
- adaptive sampling and mixing: ``sampling_offset_generator`` (``Linear(C, P_in*G*3)``);
  ``parameter_generator = Linear(C, G*(e*e + P_in*P_out))``, ``e = feat/G``, split per group into
  ``M`` (e x e) and ``S`` (P_out x P_in); ``x @ M`` -> layer_norm without affine over the last
  two dims -> ReLU; ``S @ .`` -> layer_norm -> ReLU; ``out_proj = Linear(G*P_out*e, C)``; residual;
  ``norm``;
- FFN with residual (mmcv ``FFN``), ``ffn_norm``; ``cls_fcs``/``reg_fcs`` (Linear, LN, ReLU),
  ``fc_cls`` (sigmoid classification: ``num_classes`` outputs), ``fc_reg`` (4: xyzr delta).

**Difference from the official code:** the 3D feature sampling (``sampling_3d`` over the FPN
levels at the generated offsets) is replaced by features the caller has already sampled:
``features`` of shape ``(B, N, G, P_in, feat/G)``, used by every stage. The offsets are still
generated (and returned as ``sample_points``) but do not move the samples, so
``sampling_offset_generator`` gets no gradient. The code is ``torch.fx``-traceable (no shape
asserts, no data-dependent control flow), which lets :func:`lors_convert.discover.tracing.detect_generators`
find the generator automatically.

Defaults are the official ones (6 stages, C=256, feat=256, 8 heads, FFN 2048, P_in=32, P_out=128,
G=4, 80 classes): 18,378,716 parameters per stage, 110,272,296 for the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AdaMixerConfig:
    num_stages: int = 6
    content_dim: int = 256  # C, query dim
    feat_channels: int = 256  # sampled feature channels (all groups)
    num_heads: int = 8
    feedforward_channels: int = 2048
    in_points: int = 32  # P_in per group
    out_points: int = 128  # P_out
    n_groups: int = 4  # G
    num_classes: int = 80

    @classmethod
    def paper_lors(cls, **kw) -> AdaMixerConfig:
        """The LORS paper's AdaMixer setting: G=2 groups of P_in=64 points."""
        return replace(cls(n_groups=2, in_points=64), **kw)

    @classmethod
    def tiny(cls, **kw) -> AdaMixerConfig:
        """A small decoder for tests (6 stages, C=32, G=2, e=16, P_in=4, P_out=8)."""
        return replace(
            cls(
                content_dim=32,
                feat_channels=32,
                num_heads=4,
                feedforward_channels=64,
                in_points=4,
                out_points=8,
                n_groups=2,
                num_classes=5,
            ),
            **kw,
        )

    @property
    def eff_dim(self) -> int:  # e
        return self.feat_channels // self.n_groups

    @property
    def generator_layout(self) -> str:
        e = self.eff_dim
        return f"{self.n_groups} x [{e}x{e}, {self.out_points}x{self.in_points}]"


def decode_box(xyzr: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` center x/y, log2 scale z, log2 aspect r -> ``(..., 4)`` x1 y1 x2 y2."""
    scale = 2.00 ** xyzr[..., 2:3]
    ratio = 2.00 ** torch.cat([xyzr[..., 3:4] * -0.5, xyzr[..., 3:4] * 0.5], dim=-1)
    wh = scale * ratio
    xy = xyzr[..., 0:2]
    return torch.cat([xy - wh * 0.5, xy + wh * 0.5], dim=-1)


def box_iof(boxes: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Intersection over the first box's area, ``(B, N, 4) -> (B, N, N)`` (mmdet ``mode='iof'``)."""
    lt = torch.max(boxes[..., :, None, :2], boxes[..., None, :, :2])  # (B, N, N, 2)
    rb = torch.min(boxes[..., :, None, 2:], boxes[..., None, :, 2:])  # (B, N, N, 2)
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]  # (B, N, N)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # (B, N)
    return overlap / area[..., :, None].clamp(min=eps)


def position_embedding(token_xyzr: torch.Tensor, num_feats: int, temperature: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the 4 box coordinates: ``(B, N, 4) -> (B, N, 4*num_feats)``."""
    term = token_xyzr.new_tensor([1000, 1000, 1, 1]).view(1, 1, -1)
    token_xyzr = token_xyzr / term
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=token_xyzr.device)
    dim_t = (temperature ** (2 * (dim_t // 2) / num_feats)).view(1, 1, 1, -1)
    pos_x = token_xyzr[..., None] / dim_t  # (B, N, 4, num_feats)
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(2)
    return pos_x


class MultiheadAttention(nn.Module):
    """mmcv's ``MultiheadAttention``: ``nn.MultiheadAttention`` (sequence first) plus the residual."""

    def __init__(self, embed_dims: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout)
        self.proj_drop = nn.Dropout(0.0)
        self.dropout_layer = nn.Identity()

    def forward(self, query: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.attn(query, query, query, attn_mask=attn_mask, need_weights=False)[0]  # (N, B, C)
        return query + self.dropout_layer(self.proj_drop(out))


class FFN(nn.Module):
    """mmcv's ``FFN`` with two fcs: ``x + fc2(drop(relu(fc1(x))))``."""

    def __init__(self, embed_dims: int, feedforward_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(
                nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(dropout)
            ),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(dropout),
        )
        self.dropout_layer = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout_layer(self.layers(x))


class AdaptiveMixing(nn.Module):
    """Adaptive channel mixing (``M``, e x e) then spatial mixing (``S``, P_out x P_in), per group."""

    def __init__(
        self,
        in_dim: int,
        in_points: int,
        n_groups: int,
        query_dim: int | None = None,
        out_dim: int | None = None,
        out_points: int | None = None,
    ) -> None:
        super().__init__()
        out_dim = out_dim if out_dim is not None else in_dim
        out_points = out_points if out_points is not None else in_points
        query_dim = query_dim if query_dim is not None else in_dim
        self.query_dim, self.in_dim, self.out_dim = query_dim, in_dim, out_dim
        self.in_points, self.out_points, self.n_groups = in_points, out_points, n_groups
        self.eff_in_dim = in_dim // n_groups
        self.eff_out_dim = out_dim // n_groups
        self.m_parameters = self.eff_in_dim * self.eff_out_dim
        self.s_parameters = self.in_points * self.out_points
        self.total_parameters = self.m_parameters + self.s_parameters
        self.parameter_generator = nn.Sequential(nn.Linear(query_dim, n_groups * self.total_parameters))
        self.out_proj = nn.Linear(self.eff_out_dim * self.out_points * n_groups, query_dim, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.zeros_(self.parameter_generator[-1].weight)

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        # x: (B, N, G, P_in, e) sampled features; query: (B, N, C)
        B, N = x.shape[0], x.shape[1]
        G, P, C = self.n_groups, x.shape[3], x.shape[4]
        params = self.parameter_generator(query)  # (B, N, G*(e*e + P_in*P_out))
        params = params.reshape(B * N, G, -1)  # (B*N, G, e*e + P_in*P_out)
        out = x.reshape(B * N, G, P, C)  # (B*N, G, P_in, e)
        M, S = params.split([self.m_parameters, self.s_parameters], 2)
        M = M.reshape(B * N, G, self.eff_in_dim, self.eff_out_dim)  # (B*N, G, e, e)
        S = S.reshape(B * N, G, self.out_points, self.in_points)  # (B*N, G, P_out, P_in)
        out = torch.matmul(out, M)  # adaptive channel mixing: (B*N, G, P_in, e)
        out = F.layer_norm(out, [out.size(-2), out.size(-1)])
        out = self.act(out)
        out = torch.matmul(S, out)  # adaptive spatial mixing: (B*N, G, P_out, e)
        out = F.layer_norm(out, [out.size(-2), out.size(-1)])
        out = self.act(out)
        out = out.reshape(B, N, -1)  # (B, N, G*P_out*e)
        out = self.out_proj(out)  # (B, N, C)
        return query + out


class AdaptiveSamplingMixing(nn.Module):
    def __init__(
        self,
        in_points: int = 32,
        out_points: int = 128,
        n_groups: int = 4,
        content_dim: int = 256,
        feat_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.in_points, self.out_points, self.n_groups = in_points, out_points, n_groups
        self.content_dim = content_dim
        self.feat_channels = feat_channels if feat_channels is not None else content_dim
        self.sampling_offset_generator = nn.Sequential(nn.Linear(content_dim, in_points * n_groups * 3))
        self.norm = nn.LayerNorm(content_dim)
        self.adaptive_mixing = AdaptiveMixing(
            self.feat_channels,
            query_dim=content_dim,
            in_points=in_points,
            out_points=out_points,
            n_groups=n_groups,
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.zeros_(self.sampling_offset_generator[-1].weight)
        bias = self.sampling_offset_generator[-1].bias.data.view(self.n_groups, self.in_points, 3)
        if int(self.in_points**0.5) ** 2 == self.in_points:  # regular grid for square point counts
            h = int(self.in_points**0.5)
            y = torch.linspace(-0.5, 0.5, h + 1) + 0.5 / h
            yp = y[:-1]
            y = yp.view(-1, 1).repeat(1, h).flatten()[None, :, None]
            x = yp.view(1, -1).repeat(h, 1).flatten()[None, :, None]
            bias[:, :, 0:2] = torch.cat([y, x], dim=-1)
        else:
            nn.init.uniform_(bias, -0.5, 0.5)
        nn.init.constant_(bias[:, :, 2:3], -1.0)
        self.adaptive_mixing.init_weights()

    def forward(self, features: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = self.sampling_offset_generator(query)  # (B, N, G*P_in*3): where sampling_3d would look
        query = self.adaptive_mixing(features, query)
        return self.norm(query), offsets


class AdaMixerDecoderStage(nn.Module):
    def __init__(self, cfg: AdaMixerConfig = AdaMixerConfig()) -> None:
        super().__init__()
        C = cfg.content_dim
        self.content_dim = C
        self.attention = MultiheadAttention(C, cfg.num_heads)
        self.attention_norm = nn.LayerNorm(C)
        self.ffn = FFN(C, cfg.feedforward_channels)
        self.ffn_norm = nn.LayerNorm(C)
        self.cls_fcs = nn.ModuleList([nn.Linear(C, C), nn.LayerNorm(C), nn.ReLU(inplace=True)])
        self.fc_cls = nn.Linear(C, cfg.num_classes)
        self.reg_fcs = nn.ModuleList([nn.Linear(C, C), nn.LayerNorm(C), nn.ReLU(inplace=True)])
        self.fc_reg = nn.Linear(C, 4)
        self.in_points, self.out_points, self.n_heads = cfg.in_points, cfg.out_points, cfg.n_groups
        self.sampling_n_mixing = AdaptiveSamplingMixing(
            content_dim=C,
            feat_channels=cfg.feat_channels,
            in_points=cfg.in_points,
            out_points=cfg.out_points,
            n_groups=cfg.n_groups,
        )
        self.num_heads = cfg.num_heads
        self.iof_tau = nn.Parameter(torch.ones(cfg.num_heads))

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official init: Xavier on every >= 2-D parameter, focal-loss prior on ``fc_cls``."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.fc_cls.bias, -4.59511985013459)  # bias_init_with_prob(0.01)
        nn.init.zeros_(self.fc_reg.weight)
        nn.init.zeros_(self.fc_reg.bias)
        nn.init.uniform_(self.iof_tau, 0.0, 4.0)
        self.sampling_n_mixing.init_weights()

    def forward(self, features: torch.Tensor, query_xyzr: torch.Tensor, query_content: torch.Tensor):
        """``features (B, N, G, P_in, feat/G)``, ``query_xyzr (B, N, 4)``, ``query_content (B, N, C)``
        -> ``cls_score (B, N, classes)``, ``xyzr_delta (B, N, 4)``, ``query_content (B, N, C)``,
        ``offsets (B, N, G*P_in*3)``."""
        N, n_query = query_content.shape[0], query_content.shape[1]
        rois = decode_box(query_xyzr).detach()  # (B, N, 4)
        iof = (box_iof(rois) + 1e-7).log()[:, None]  # (B, 1, N, N)
        pe = position_embedding(query_xyzr, self.content_dim // 4).detach()  # (B, N, C)
        attn_bias = (iof * self.iof_tau.view(1, -1, 1, 1)).flatten(0, 1)  # (B*heads, N, N)
        query_content = query_content.permute(1, 0, 2)
        pe = pe.permute(1, 0, 2)
        query_content = self.attention(query_content + pe, attn_mask=attn_bias)
        query_content = self.attention_norm(query_content).permute(1, 0, 2)  # (B, N, C)
        query_content, offsets = self.sampling_n_mixing(features, query_content)
        query_content = self.ffn_norm(self.ffn(query_content))
        cls_feat, reg_feat = query_content, query_content
        for layer in self.cls_fcs:
            cls_feat = layer(cls_feat)
        for layer in self.reg_fcs:
            reg_feat = layer(reg_feat)
        cls_score = self.fc_cls(cls_feat).view(N, n_query, -1)
        xyzr_delta = self.fc_reg(reg_feat).view(N, n_query, -1)
        return cls_score, xyzr_delta, query_content.view(N, n_query, -1), offsets

    @staticmethod
    def refine_xyzr(xyzr: torch.Tensor, xyzr_delta: torch.Tensor) -> torch.Tensor:
        z = xyzr[..., 2:3]
        new_xy = xyzr[..., 0:2] + xyzr_delta[..., 0:2] * (2**z)
        new_zr = xyzr[..., 2:4] + xyzr_delta[..., 2:4]
        return torch.cat([new_xy, new_zr], dim=-1)


class AdaMixerDecoder(nn.Module):
    """``num_stages`` decoder stages in ``bbox_head`` (the official roi head's attribute name);
    boxes are refined stage by stage (detached between stages)."""

    def __init__(self, cfg: AdaMixerConfig = AdaMixerConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.bbox_head = nn.ModuleList([AdaMixerDecoderStage(cfg) for _ in range(cfg.num_stages)])

    def init_weights(self) -> None:
        for stage in self.bbox_head:
            stage.init_weights()

    def forward(
        self, features: torch.Tensor, query_xyzr: torch.Tensor, query_content: torch.Tensor
    ) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {"cls_score": [], "xyzr": [], "query": []}
        for stage in self.bbox_head:
            cls_score, delta, query_content, _ = stage(features, query_xyzr, query_content)
            query_xyzr = stage.refine_xyzr(query_xyzr, delta)
            out["cls_score"].append(cls_score)
            out["xyzr"].append(query_xyzr)
            out["query"].append(query_content)
            query_xyzr = query_xyzr.detach()
        return out


def random_inputs(
    cfg: AdaMixerConfig, batch: int = 2, queries: int = 5, generator: torch.Generator | None = None
):
    """``features``, ``query_xyzr``, ``query_content`` of the right shapes (boxes of a 800 px image)."""
    feats = torch.randn(batch, queries, cfg.n_groups, cfg.in_points, cfg.eff_dim, generator=generator)
    xy = torch.rand(batch, queries, 2, generator=generator) * 800
    zr = torch.stack(
        [
            torch.rand(batch, queries, generator=generator) * 3 + 5,
            torch.rand(batch, queries, generator=generator) - 0.5,
        ],
        dim=-1,
    )
    content = torch.randn(batch, queries, cfg.content_dim, generator=generator)
    return feats, torch.cat([xy, zr], dim=-1), content


def build(**overrides) -> AdaMixerDecoder:
    """The default decoder (``--arch lors_convert.zoo.adamixer:build``); keyword overrides as in
    :class:`AdaMixerConfig` (``n_groups=2, in_points=64`` is the paper's LORS setting)."""
    return AdaMixerDecoder(AdaMixerConfig(**overrides))


def build_paper_lors(**overrides) -> AdaMixerDecoder:
    """The LORS paper's dense AdaMixer decoder: G=2, P_in=64 (``--arch ...:build_paper_lors``)."""
    return AdaMixerDecoder(AdaMixerConfig.paper_lors(**overrides))


def build_tiny(**overrides) -> AdaMixerDecoder:
    """A small decoder for tests and examples (``--arch lors_convert.zoo.adamixer:build_tiny``)."""
    return AdaMixerDecoder(AdaMixerConfig.tiny(**overrides))


def decoder_state_dict(state: dict[str, torch.Tensor], prefix: str = "roi_head.") -> dict[str, torch.Tensor]:
    """The decoder's part of an official AdaMixer detector checkpoint (keys ``roi_head.bbox_head.N.*``):
    the keys under ``prefix`` with the prefix removed, ready for ``AdaMixerDecoder.load_state_dict``."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix + "bbox_head.")}


__all__ = [
    "AdaMixerConfig",
    "AdaMixerDecoder",
    "AdaMixerDecoderStage",
    "AdaptiveMixing",
    "build",
    "build_paper_lors",
    "build_tiny",
    "decoder_state_dict",
    "AdaptiveSamplingMixing",
    "decode_box",
    "box_iof",
    "position_embedding",
    "random_inputs",
]
